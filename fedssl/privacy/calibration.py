"""A site's noise calibration: Opacus' search for σ, with its RDP sums done by numpy, and Opacus' exact ε as judge.

A site fixes σ once, the first time it trains: the σ at which its whole planned run spends its target ε.
Opacus' ``get_noise_multiplier`` bisects σ and asks the RDP accountant for ε at each candidate (~17 times).
Each ask sums the sampled Gaussian mechanism's series (Mironov, Talwar & Zhang, "Rényi Differential Privacy
of the Sampled Gaussian Mechanism", 2019, §3.3) term by term in Python at 151 orders, 0.1-0.4 s at a time,
so every site process paid 1-6 CPU-seconds before its first step (the demo: ten of them).

:func:`calibrated_sigma` runs the same search (the same start, doubling, halving, tolerance and comparisons)
on :func:`fast_rdp`, the same series summed as numpy arrays (the same terms and stopping rule; only the
order of the additions differs, so the two agree to ~1e-12). Opacus' own ε stays the judge:

* a comparison whose fast ε lies within ``DECISION_MARGIN`` of its threshold is decided on Opacus' exact ε,
  so the search takes Opacus' path, and returns Opacus' σ, whenever the two sums agree that closely
  (tests/privacy/test_calibration.py compares them over a grid of sample rates and σ);
* the σ found is checked on Opacus' exact ε, the value the site's ledger then charges: if it spends more than
  the target, or more than the tolerance less, Opacus' own search is run instead.

So a wrong fast sum could cost time, never budget, and never a refusal Opacus would not make.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
from opacus.accountants.analysis.rdp import get_privacy_spent
from scipy import special

# Opacus' get_noise_multiplier: its first σ (doubled before the first ask), the σ past which it refuses the
# budget as too low, and the tolerance it is called with (the site's ε ends within this much under its target).
FIRST_SIGMA, MAX_SIGMA, EPSILON_TOLERANCE = 10.0, 1e6, 0.01
# A fast ε this close to a threshold is recomputed exactly before the search acts on it (~800 times the
# largest disagreement measured between the two sums: 1.3e-8, at q = 1e-4 and σ = 0.3 over 10,000 steps).
DECISION_MARGIN = 1e-5
# The series of a fractional order is summed until a term falls under e^-30 (Opacus' rule): it is evaluated in
# blocks growing from FIRST_TERMS, and given up on (for Opacus' own search) past MAX_TERMS.
STOP_LOG_TERM, FIRST_TERMS, MAX_TERMS = -30.0, 64, 1 << 20


class FastSumFailed(ArithmeticError):
    """The numpy sum could not reproduce Opacus' series here (no stopping term, a non-positive sum)."""


def fast_rdp(sample_rate: float, noise_multiplier: float, orders: Sequence[float]) -> np.ndarray:
    """One step's RDP at each order: Opacus' ``compute_rdp(q, σ, steps=1, orders)``, summed with numpy."""
    q, sigma = float(sample_rate), float(noise_multiplier)
    alphas = np.asarray(orders, dtype=float)
    if q == 0:
        return np.zeros(len(alphas))
    if sigma == 0:
        return np.full(len(alphas), math.inf)
    if q == 1.0:
        return alphas / (2 * sigma**2)
    rdp = np.full(len(alphas), math.inf)  # an infinite order stays infinite
    integer = np.isfinite(alphas) & (alphas == np.round(alphas))
    fractional = np.isfinite(alphas) & ~integer
    for rows, log_a in ((np.flatnonzero(integer), _log_a_integer_orders), (np.flatnonzero(fractional), _log_a_fractional_orders)):
        if rows.size:
            rdp[rows] = log_a(q, sigma, tuple(alphas[rows])) / (alphas[rows] - 1)
    return rdp


def _log_a_integer_orders(q: float, sigma: float, alphas: tuple[float, ...]) -> np.ndarray:
    """log A_α at integer orders: finite sums of positive terms (the binomial expansion), one row per order."""
    base = _IntegerParts.of(q, alphas)
    log_terms = base.log_terms + base.i2_minus_i / (2 * sigma**2)
    top = np.max(log_terms, axis=1, keepdims=True)
    return (np.log(np.sum(np.exp(log_terms - top), axis=1, keepdims=True)) + top)[:, 0]


def _log_a_fractional_orders(q: float, sigma: float, alphas: tuple[float, ...]) -> np.ndarray:
    """log A_α at fractional orders: two alternating series each, cut after the first term under e^-30.

    Every order's first FIRST_TERMS terms at once; the orders not yet cut get 4x as many, and so on."""
    log_a = np.empty(len(alphas))
    pending, count = np.arange(len(alphas)), FIRST_TERMS
    while pending.size:
        if count > MAX_TERMS:
            raise FastSumFailed(f"no term under e^{STOP_LOG_TERM:g} in {MAX_TERMS} (q={q}, sigma={sigma})")
        series = _SeriesParts.of(q, tuple(alphas[k] for k in pending), count)
        log_s0, log_s1 = series.log_terms(sigma)
        small = np.maximum(log_s0, log_s1) < STOP_LOG_TERM
        cut = small.any(axis=1)
        last = np.argmax(small, axis=1)  # Opacus adds the first small term, then stops
        for row in np.flatnonzero(cut):
            terms = slice(0, int(last[row]) + 1)
            signs = series.signs[row, terms]
            log_a[pending[row]] = np.logaddexp(_signed_log_sum(log_s0[row, terms], signs),
                                               _signed_log_sum(log_s1[row, terms], signs))
        pending, count = pending[~cut], count * 4
    return log_a


class _IntegerParts:
    """What the integer orders' terms owe to q and α alone (terms past i = α are -inf), kept across σs."""

    def __init__(self, q: float, alphas: tuple[float, ...]) -> None:
        i = np.arange(int(max(alphas)) + 1, dtype=float)[None, :]
        alpha = np.asarray(alphas)[:, None]
        with np.errstate(divide="ignore"):  # log of binom(α, i > α) = 0: a term that is not there
            self.log_terms = np.log(special.binom(alpha, i)) + i * math.log(q) + np.abs(alpha - i) * math.log(1 - q)
        self.log_terms[np.broadcast_to(i > alpha, self.log_terms.shape)] = -math.inf
        self.i2_minus_i = i * i - i

    @classmethod
    @functools.lru_cache(maxsize=64)  # a process calibrates at a few sample rates, each again across a search
    def of(cls, q: float, alphas: tuple[float, ...]) -> _IntegerParts:
        return cls(q, alphas)


class _SeriesParts:
    """What the fractional orders' terms owe to q and α alone, kept across the search's σs."""

    def __init__(self, q: float, alphas: tuple[float, ...], count: int) -> None:
        i = np.arange(count, dtype=float)[None, :]
        alpha = np.asarray(alphas)[:, None]
        j = alpha - i
        coef = special.binom(alpha, i)
        log_coef = np.log(np.abs(coef))
        self.signs = np.sign(coef)
        self.i, self.j, self.z0_log = i, j, math.log(1 / q - 1)
        self.base0 = log_coef + i * math.log(q) + j * math.log(1 - q) + math.log(0.5)
        self.base1 = log_coef + j * math.log(q) + i * math.log(1 - q) + math.log(0.5)

    @classmethod
    @functools.lru_cache(maxsize=64)
    def of(cls, q: float, alphas: tuple[float, ...], count: int) -> _SeriesParts:
        return cls(q, alphas, count)

    def log_terms(self, sigma: float) -> tuple[np.ndarray, np.ndarray]:
        """The two series' log terms at σ (the part of them that is the Gaussian's)."""
        z0 = sigma**2 * self.z0_log + 0.5
        i, j, scale = self.i, self.j, math.sqrt(2) * sigma
        log_s0 = self.base0 + (i * i - i) / (2 * sigma**2) + _log_erfc((i - z0) / scale)
        log_s1 = self.base1 + (j * j - j) / (2 * sigma**2) + _log_erfc((z0 - j) / scale)
        return log_s0, log_s1


def _log_erfc(x: np.ndarray) -> np.ndarray:
    """log erfc(x), accurate for large x (Opacus' helper, on arrays)."""
    return math.log(2) + special.log_ndtr(-x * 2**0.5)


def _signed_log_sum(log_terms: np.ndarray, signs: np.ndarray) -> float:
    """log Σ sign·e^term, for a sum that must come out positive (Opacus raises otherwise)."""
    top = float(np.max(log_terms))
    if top == -math.inf:
        return -math.inf
    total = float(np.sum(signs * np.exp(log_terms - top)))
    if not total > 0:
        raise FastSumFailed("a fractional order's series summed to a non-positive value")
    return math.log(total) + top


def calibrated_sigma(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                     exact_epsilon: Callable[[float], float], orders: Sequence[float]) -> float | None:
    """The σ Opacus' ``get_noise_multiplier`` returns (RDP accountant, tolerance 0.01), or None when the fast
    sums could not find one that ``exact_epsilon`` (Opacus' ε of ``steps`` steps at σ) accepts, or found
    none under Opacus' bound (a budget Opacus refuses as too low, or sums that overstate ε).

    The σ returned always spends at most ``target_epsilon``, and at most EPSILON_TOLERANCE less, by
    ``exact_epsilon``.
    """
    orders_vector = np.asarray(orders, dtype=float)
    thresholds = (target_epsilon, target_epsilon - EPSILON_TOLERANCE)

    def epsilon(sigma: float) -> float:
        try:
            with warnings.catch_warnings():  # overflow at absurd σ and "optimal order is the largest alpha"
                warnings.simplefilter("ignore")
                rdp = fast_rdp(sample_rate, sigma, orders) * steps
                fast = float(_epsilon_from_rdp(orders_vector, rdp, delta))
        except FastSumFailed:
            return exact_epsilon(sigma)
        if not math.isfinite(fast) or any(abs(fast - t) <= DECISION_MARGIN for t in thresholds):
            return exact_epsilon(sigma)
        return fast

    eps_high, sigma_low, sigma_high = math.inf, 0.0, FIRST_SIGMA
    while eps_high > target_epsilon:
        sigma_high = 2 * sigma_high
        eps_high = epsilon(sigma_high)
        if sigma_high > MAX_SIGMA:  # Opacus' search decides (and refuses the budget as too low)
            return None
    while target_epsilon - eps_high > EPSILON_TOLERANCE:
        sigma = (sigma_low + sigma_high) / 2
        eps = epsilon(sigma)
        if eps < target_epsilon:
            sigma_high, eps_high = sigma, eps
        else:
            sigma_low = sigma
    spent = exact_epsilon(sigma_high)
    return sigma_high if spent <= target_epsilon and not target_epsilon - spent > EPSILON_TOLERANCE else None


def _epsilon_from_rdp(orders: np.ndarray, rdp: np.ndarray, delta: float) -> float:
    """Opacus' own conversion from RDP to (ε, δ) (Balle et al. 2020, Theorem 21), minimised over the orders."""
    return float(get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0])
