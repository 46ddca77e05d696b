"""A site's noise calibration (fedssl.privacy.calibration): Opacus' σ, found on numpy sums, judged by Opacus' ε."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants.rdp import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from fedssl.privacy import calibration
from fedssl.privacy.analysis import epsilon_of, noise_for_budget

ORDERS = RDPAccountant.DEFAULT_ALPHAS
DELTA = 1e-5
# (target ε, δ, sample rate, planned steps): the demo's and the tests' sites, large and tiny rates, long and
# short plans, a strict and a loose budget.
PLANS = [
    (8.0, DELTA, 16 / 898, 6),
    (8.0, DELTA, 32 / 150, 2),
    (8.0, DELTA, 256 / 6000, 50),
    (1.0, DELTA, 1 / 8, 4),
    (2.0, 1e-6, 1 / 40, 6),
    (0.5, 1e-6, 0.001, 10_000),
    (64.0, DELTA, 0.3, 3),
    (3.0, 1 / 50_000, 0.9, 20),
]


@functools.lru_cache(maxsize=None)
def _opacus_sigma(target: float, delta: float, sample_rate: float, steps: int) -> float:
    """Opacus' own calibration, the reference (computed once per plan: seconds each)."""
    return get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=sample_rate, steps=steps)


def _opacus_epsilon(rdp: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(get_privacy_spent(orders=ORDERS, rdp=rdp, delta=DELTA)[0])


@pytest.mark.parametrize("sample_rate", [1e-4, 0.003, 0.0178, 0.1, 0.5, 0.9])
def test_the_numpy_sums_give_opacus_epsilon(sample_rate):
    """Per order the two sums agree to 1e-11 (the additions' order differs: Opacus' is sequential), and the ε
    they give over 1 to 10,000 steps agrees 100 times more closely than the margin the search decides within."""
    for sigma in (0.3, 0.6, 1.0, 3.0, 40.0):
        exact = compute_rdp(q=sample_rate, noise_multiplier=sigma, steps=1, orders=ORDERS)
        fast = calibration.fast_rdp(sample_rate, sigma, ORDERS)
        np.testing.assert_allclose(fast, exact, rtol=0, atol=1e-11)
        for steps in (1, 100, 10_000):
            assert abs(_opacus_epsilon(fast * steps) - _opacus_epsilon(exact * steps)) < calibration.DECISION_MARGIN / 100


def test_the_edge_cases_are_opacus_own():
    assert calibration.fast_rdp(0.0, 1.0, ORDERS).tolist() == [0.0] * len(ORDERS)
    assert np.isinf(calibration.fast_rdp(0.1, 0.0, ORDERS)).all()
    np.testing.assert_array_equal(calibration.fast_rdp(1.0, 2.0, ORDERS), compute_rdp(q=1.0, noise_multiplier=2.0, steps=1, orders=ORDERS))
    assert calibration.fast_rdp(0.1, 1.0, [2.5, float("inf")])[1] == float("inf")


@pytest.mark.parametrize("plan", PLANS, ids=lambda plan: "eps{}-q{:.3g}-steps{}".format(plan[0], plan[2], plan[3]))
def test_the_site_calibrates_to_opacus_sigma(plan):
    target, delta, sample_rate, steps = plan
    sigma = noise_for_budget.__wrapped__(target, delta, sample_rate, steps)
    assert sigma == _opacus_sigma(*plan)  # bit for bit: the same search, the same decisions
    spent = epsilon_of([(sigma, sample_rate, steps)], delta)
    assert target - calibration.EPSILON_TOLERANCE <= spent <= target


def test_a_budget_too_small_is_refused_as_opacus_refuses_it():
    with pytest.raises(ValueError, match="The privacy budget is too low"):
        get_noise_multiplier(target_epsilon=1e-6, target_delta=DELTA, sample_rate=0.001, steps=1)
    with pytest.raises(ValueError, match="The privacy budget is too low"):
        noise_for_budget.__wrapped__(1e-6, DELTA, 0.001, 1)


@pytest.mark.parametrize("error", [0.1, 10.0], ids=["understates-epsilon", "overstates-epsilon"])
def test_wrong_fast_sums_cost_time_never_budget(monkeypatch, error):
    """The attack on the shortcut: sums that under- or overstate every order's RDP tenfold. Trusted, the first
    would pick a σ that spends 1.6 times the budget, the second one that spends a third of it; Opacus' exact ε
    rejects both and the site ends with Opacus' own σ."""
    target, delta, sample_rate, steps = PLANS[3]
    honest = calibration.fast_rdp
    monkeypatch.setattr(calibration, "fast_rdp", lambda q, sigma, orders: honest(q, sigma, orders) * error)
    accept = lambda sigma: target - calibration.EPSILON_TOLERANCE / 2  # noqa: E731  (a judge that accepts any σ)
    trusted = calibration.calibrated_sigma(target, delta, sample_rate, steps, orders=ORDERS, exact_epsilon=accept)
    spent_if_trusted = epsilon_of([(trusted, sample_rate, steps)], delta)
    assert (spent_if_trusted > 1.5 * target) if error < 1 else (spent_if_trusted < target / 2)  # the harm it would do
    assert noise_for_budget.__wrapped__(target, delta, sample_rate, steps) == _opacus_sigma(target, delta, sample_rate, steps)


def test_a_decision_too_close_to_call_is_taken_on_opacus_epsilon(monkeypatch):
    """Fast sums that differ from Opacus' by less than the margin can still flip a comparison: each one that
    close is decided on the exact ε, so the search keeps Opacus' path."""
    target, delta, sample_rate, steps = PLANS[3]
    expected = _opacus_sigma(target, delta, sample_rate, steps)
    exact_calls = []

    def exact(sigma: float) -> float:
        exact_calls.append(sigma)
        return epsilon_of([(sigma, sample_rate, steps)], delta)

    honest = calibration._epsilon_from_rdp
    # Every fast ε lands just past the target (by half the margin): decided on it, every step would go wrong.
    monkeypatch.setattr(calibration, "_epsilon_from_rdp", lambda orders, rdp, d: target + calibration.DECISION_MARGIN / 2)
    assert calibration.calibrated_sigma(target, delta, sample_rate, steps, orders=ORDERS, exact_epsilon=exact) == expected
    assert len(exact_calls) > 10  # every decision went to Opacus' ε, and the σ found was checked on it
    monkeypatch.setattr(calibration, "_epsilon_from_rdp", honest)
    exact_calls.clear()
    assert calibration.calibrated_sigma(target, delta, sample_rate, steps, orders=ORDERS, exact_epsilon=exact) == expected
    assert len(exact_calls) == 1  # honest sums: only the final check


def test_a_series_the_numpy_sums_cannot_cut_is_summed_by_opacus(monkeypatch):
    target, delta, sample_rate, steps = PLANS[3]
    monkeypatch.setattr(calibration, "MAX_TERMS", calibration.FIRST_TERMS // 4)  # no fractional order fits
    with pytest.raises(calibration.FastSumFailed):
        calibration.fast_rdp(sample_rate, 1.0, ORDERS)
    assert noise_for_budget.__wrapped__(target, delta, sample_rate, steps) == _opacus_sigma(target, delta, sample_rate, steps)


def test_sums_that_never_fit_the_budget_do_not_refuse_it(monkeypatch):
    """Sums claiming every σ up to Opacus' bound overspends would, trusted, refuse a budget Opacus accepts."""
    target, delta, sample_rate, steps = PLANS[3]
    monkeypatch.setattr(calibration, "_epsilon_from_rdp", lambda orders, rdp, d: target + 1.0)
    assert calibration.calibrated_sigma(target, delta, sample_rate, steps, orders=ORDERS, exact_epsilon=lambda s: 0.0) is None
    assert noise_for_budget.__wrapped__(target, delta, sample_rate, steps) == _opacus_sigma(target, delta, sample_rate, steps)
