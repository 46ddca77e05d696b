"""Site-level (central) differential privacy: what one whole site can change in the released model.

The mechanism is DP-FedAvg (McMahan et al., ICLR 2018), as Flower's fixed-clipping DP wrappers
implement it: each round ``m`` of the ``N`` sites are sampled; each site's update
``Δ_i = θ_i − θ`` is clipped to L2 norm ``C``; the server releases

    θ + (1/m) · (Σ_i Δ_i + N(0, σ²C²·I))

The denominator is the fixed ``m``: a site that refuses (budget spent) or drops out adds a zero
update, so whatever one site does moves the released mean by at most ``C/m`` (add/remove) and
the noise ``σC/m`` on the mean is a Gaussian mechanism with noise multiplier ``σ``.

Accounting over rounds and client sampling (RDP, Google's dp-accounting):

- ``m == N`` (every site every round): no amplification; add/remove-one-site neighbours;
  each round is a Gaussian mechanism with multiplier ``σ``.
- ``m < N``: Flower samples a fixed-size subset uniformly *without replacement*. The matching
  analysis (Wang, Balle, Kasiviswanathan, AISTATS 2019) is for replace-one-site neighbours, under
  which the sum of clipped updates moves by up to ``2C``; each round is therefore a
  without-replacement-sampled Gaussian with multiplier ``σ/2``. (Poisson-sampling accounting
  would be wrong here: Flower does not sample that way.)

Pure functions plus one small stateful class (:class:`SiteLevelAccountant`) that persists the
rounds it charged *before* the release (write-ahead), like the sites' own accountants.
Flower-free: the server's strategies call it.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedssl.errors import BudgetExhaustedError, PrivacyError

STATE_VERSION = 1
# Bisection bounds for calibrating sigma to a target epsilon.
SIGMA_LOW, SIGMA_HIGH = 1e-3, 1e4

# Extra fields of the server ledger's round_report records (extra fields are allowed and hashed).
FIELD_EPSILON = "site_level_epsilon"
FIELD_DELTA = "site_level_delta"
FIELD_SIGMA = "site_level_noise_multiplier"
FIELD_CLIP = "site_level_clipping_norm"
FIELD_SAMPLED = "site_level_sites_per_round"
FIELD_POPULATION = "site_level_sites"
FIELD_SIDE = "site_level_clipping_side"
FIELD_ROUNDS = "site_level_rounds"
AGGREGATION_SECAGG = "secaggplus"


@dataclass(frozen=True)
class SiteLevelMechanism:
    noise_multiplier: float  # σ: noise std on the sum of clipped updates is σ·C
    clipping_norm: float  # C
    sample_size: int  # m sites per round
    population: int  # N sites in the federation
    delta: float
    side: str = "client"  # where updates are clipped (client: fixedclipping_mod; server: the DP wrapper)

    def __post_init__(self) -> None:
        if not (0 < self.noise_multiplier < math.inf and self.clipping_norm > 0 and 0 < self.delta < 1):
            raise ValueError(f"invalid site-level mechanism {self}")
        if not 1 <= self.sample_size <= self.population:
            raise ValueError(f"sites per round ({self.sample_size}) must be in [1, {self.population}]")

    @property
    def amplified(self) -> bool:
        return self.sample_size < self.population

    @property
    def noise_std_on_mean(self) -> float:
        """What Flower's wrapper adds to the averaged weights: σ·C/m."""
        return self.noise_multiplier * self.clipping_norm / self.sample_size

    def describe(self, rounds: int | None = None) -> str:
        sampling = (
            f"{self.sample_size} of {self.population} sites sampled per round without replacement "
            "(replace-one-site accounting)"
            if self.amplified
            else f"all {self.population} sites every round (add/remove-one-site accounting)"
        )
        spent = f" over {rounds} round(s)" if rounds is not None else ""
        return (
            f"DP-FedAvg: each site's round update clipped to L2 norm {self.clipping_norm:g} ({self.side}-side), "
            f"Gaussian noise σ = {self.noise_multiplier:.3g} × the clipping norm added to their sum by the coordinator, "
            f"{sampling}, RDP{spent}; the coordinator is trusted to add that noise"
        )


def _accountant(mech: SiteLevelMechanism):
    from dp_accounting import dp_event
    from dp_accounting.privacy_accountant import NeighboringRelation
    from dp_accounting.rdp import RdpAccountant

    if mech.amplified:
        event = dp_event.SampledWithoutReplacementDpEvent(
            mech.population, mech.sample_size, dp_event.GaussianDpEvent(mech.noise_multiplier / 2)
        )
        return RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE), event
    return RdpAccountant(neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE), dp_event.GaussianDpEvent(mech.noise_multiplier)


def epsilon_after(mech: SiteLevelMechanism, rounds: int) -> float:
    """Site-level ε after ``rounds`` releases (0 for none)."""
    if rounds <= 0:
        return 0.0
    accountant, event = _accountant(mech)
    accountant.compose(event, int(rounds))
    return float(accountant.get_epsilon(mech.delta))


def noise_for_target(target_epsilon: float, delta: float, rounds: int, sample_size: int, population: int,
                     clipping_norm: float = 1.0, side: str = "client") -> float:
    """The smallest σ (to 0.1%) for which ``rounds`` releases spend at most ``target_epsilon``."""
    def eps(sigma: float) -> float:
        return epsilon_after(SiteLevelMechanism(sigma, clipping_norm, sample_size, population, delta, side), rounds)

    low, high = SIGMA_LOW, SIGMA_HIGH
    if eps(high) > target_epsilon:
        raise PrivacyError(f"site_dp.target_epsilon: {target_epsilon:g} is out of reach for {rounds} rounds even at sigma={high:g}")
    if eps(low) <= target_epsilon:
        return low
    while high / low > 1.001:
        mid = math.sqrt(low * high)
        low, high = (low, mid) if eps(mid) <= target_epsilon else (mid, high)
    return high


def mechanism_from_config(site_dp: Any, federation: Any) -> SiteLevelMechanism:
    """The run's mechanism from the ``site_dp`` and ``federation`` config sections."""
    sampled, population = federation.sites_per_round, int(federation.num_sites)
    sigma = site_dp.noise_multiplier
    if sigma is None:
        sigma = noise_for_target(site_dp.target_epsilon, site_dp.delta, federation.rounds, sampled, population,
                                 site_dp.clipping_norm, site_dp.side)
    return SiteLevelMechanism(float(sigma), float(site_dp.clipping_norm), sampled, population, float(site_dp.delta), site_dp.side)


class SiteLevelAccountant:
    """The server's site-level budget: charge a round before releasing it, refuse when spent."""

    def __init__(self, mechanism: SiteLevelMechanism, target_epsilon: float | None = None, path: Path | None = None) -> None:
        self.mechanism = mechanism
        self.target_epsilon = target_epsilon
        self.path = Path(path) if path is not None else None
        self.rounds: list[int] = []
        if self.path is not None and self.path.exists():
            self._load()

    @property
    def epsilon(self) -> float:
        return epsilon_after(self.mechanism, len(self.rounds))

    def epsilon_if_charged(self, extra_rounds: int = 1) -> float:
        return epsilon_after(self.mechanism, len(self.rounds) + extra_rounds)

    def charge(self, server_round: int) -> float:
        """Record one release (durably, before it happens); returns ε after it."""
        after = self.epsilon_if_charged()
        if self.target_epsilon is not None and after > self.target_epsilon * (1 + 1e-9):
            raise BudgetExhaustedError(
                f"site-level budget: round {server_round} would raise epsilon from {self.epsilon:.3f} to {after:.3f}, "
                f"above site_dp.target_epsilon={self.target_epsilon:g}"
            )
        self.rounds.append(int(server_round))
        self._save()
        return after

    def statement_entry(self) -> dict[str, Any]:
        """What :func:`fedssl.privacy.statement.privacy_statement` takes as ``site_level``."""
        return {"epsilon": self.epsilon, "delta": self.mechanism.delta, "mechanism": self.mechanism.describe(len(self.rounds))}

    def ledger_fields(self, epsilon: float | None = None) -> dict[str, Any]:
        mech = self.mechanism
        return {
            FIELD_EPSILON: self.epsilon if epsilon is None else epsilon,
            FIELD_DELTA: mech.delta,
            FIELD_SIGMA: mech.noise_multiplier,
            FIELD_CLIP: mech.clipping_norm,
            FIELD_SAMPLED: mech.sample_size,
            FIELD_POPULATION: mech.population,
            FIELD_SIDE: mech.side,
            FIELD_ROUNDS: len(self.rounds),
        }

    def _save(self) -> None:
        if self.path is None:
            return
        state = {"version": STATE_VERSION, "mechanism": asdict(self.mechanism), "target_epsilon": self.target_epsilon,
                 "rounds": self.rounds, "epsilon": self.epsilon}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".site-level-", suffix=".tmp")
        with os.fdopen(fd, "w") as handle:
            json.dump(state, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)

    def _load(self) -> None:
        assert self.path is not None
        try:
            state = json.loads(self.path.read_text())
            saved = SiteLevelMechanism(**state["mechanism"])
            rounds = [int(r) for r in state["rounds"]]
        except (ValueError, KeyError, TypeError) as err:
            raise PrivacyError(f"{self.path}: site-level accountant state is unreadable ({err})") from None
        if saved != self.mechanism:
            raise PrivacyError(f"{self.path}: was charged under {saved}, not {self.mechanism}; start a new run directory")
        self.rounds = rounds


# --------------------------------------------------------------- reading it back (audit, report)

def privacy_facts_from_reports(reports: Iterable[Mapping[str, Any]]) -> tuple[bool | None, dict[str, Any] | None]:
    """(secure_aggregation, site_level) from the server ledger's round_report bodies.

    secure_aggregation is True only if *every* recorded round used SecAgg+ (one plain round means
    the server saw individual updates), None if there are no reports. site_level is the last
    recorded site-level ε with its mechanism, or None.
    """
    reports = [r for r in reports if isinstance(r, Mapping)]
    if not reports:
        return None, None
    secure = all(r.get("aggregation") == AGGREGATION_SECAGG for r in reports)
    with_dp = [r for r in reports if isinstance(r.get(FIELD_EPSILON), (int, float))]
    if not with_dp:
        return secure, None
    last = max(with_dp, key=lambda r: (int(r.get("round", 0)), float(r[FIELD_EPSILON])))
    try:
        mech = SiteLevelMechanism(float(last[FIELD_SIGMA]), float(last[FIELD_CLIP]), int(last[FIELD_SAMPLED]),
                                  int(last[FIELD_POPULATION]), float(last[FIELD_DELTA]), str(last.get(FIELD_SIDE, "client")))
        mechanism = mech.describe(int(last.get(FIELD_ROUNDS, last.get("round", 0))))
    except (KeyError, TypeError, ValueError):
        mechanism = "site-level DP (mechanism fields missing from the server ledger)"
    return secure, {"epsilon": float(last[FIELD_EPSILON]), "delta": float(last[FIELD_DELTA]), "mechanism": mechanism}


def privacy_facts(server_ledger: Path) -> dict[str, Any]:
    """``{"secure_aggregation": ..., "site_level": ...}`` of a run, from its server ledger file."""
    from fedssl.privacy.ledger import ServerLedger

    if not Path(server_ledger).exists():
        return {"secure_aggregation": None, "site_level": None}
    secure, site_level = privacy_facts_from_reports(ServerLedger(server_ledger).round_reports())
    return {"secure_aggregation": secure, "site_level": site_level}
