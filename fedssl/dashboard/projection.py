"""When a site's privacy budget runs out, projected from its ledger.

The rule (stated on the page): the site's recorded history of DP events is re-accounted with the
audit's independent accountant (dp-accounting RDP for ``rdp`` sites, PLD for ``prv``/``gdp``, as
`fedssl audit` does), extended by rounds identical to its last ``dp_event`` (same σ, q, steps, δ).
The first extended round whose cumulative ε would exceed the target is the round the site will
refuse: its budget runs out there. Beyond the horizon the answer is "not within N rounds".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fedssl.audit.ledgers import EPSILON_SLACK
from fedssl.privacy.independent import pld_trajectory, rdp_trajectory
from fedssl.privacy.records import DPEvent, Event

RULE = (
    "ε re-accounted by the audit's independent accountant (dp-accounting) for the ledger's events plus more rounds "
    "like the last one (same σ, q, steps, δ); the first round whose ε would exceed the budget is the one the site refuses"
)
MIN_HORIZON, MAX_HORIZON = 10, 100


@dataclass(frozen=True)
class Projection:
    refuses_round: int | None  # the first round the site cannot afford; None: not within the horizon
    epsilon_then: float | None  # the ε that round would bring it to
    horizon_round: int  # the last round looked at
    next_round_epsilon: float | None  # ε after one more round like the last

    def to_dict(self) -> dict[str, float | int | None]:
        return {"refuses_round": self.refuses_round, "epsilon_then": self.epsilon_then,
                "horizon_round": self.horizon_round, "next_round_epsilon": self.next_round_epsilon}


def horizon(last_round: int, planned_rounds: int | None) -> int:
    """How many rounds past the last to look: the rest of the plan and some, within bounds."""
    remaining = max(0, (planned_rounds or 0) - last_round)
    return max(MIN_HORIZON, min(MAX_HORIZON, remaining + MIN_HORIZON))


def _merged(events: Sequence[Event]) -> list[Event]:
    """Composition is commutative and steps of one (σ, q) add up: one event per (σ, q), so that each
    look ahead costs one composition per distinct mechanism, not one per round."""
    steps: dict[tuple[float, float], int] = {}
    for sigma, q, n in events:
        steps[(sigma, q)] = steps.get((sigma, q), 0) + n
    return [(sigma, q, n) for (sigma, q), n in steps.items()]


def _epsilon_after(history: Sequence[Event], last: DPEvent, rounds: int) -> float:
    """Cumulative ε after ``history`` and ``rounds`` more rounds like ``last``, at its δ."""
    events = _merged([*history, (last.noise_multiplier, last.sample_rate, last.steps * rounds)])
    deltas = [last.delta] * len(events)
    if last.accountant == "rdp":
        return rdp_trajectory(events, deltas)[-1].epsilon
    return pld_trajectory(events, deltas)[-1]


def project(events: Sequence[DPEvent], planned_rounds: int | None = None) -> Projection | None:
    """None when there is nothing to project from (no DP event, or no positive target).

    ε only grows with more rounds, so the first round over the target is found by doubling the look
    ahead and then bisecting: a handful of accountant calls however long the run."""
    if not events or not events[-1].target_epsilon > 0 or events[-1].steps <= 0:
        return None
    last, history = events[-1], [e.event for e in events]
    extra = horizon(last.round, planned_rounds)
    limit = last.target_epsilon * (1 + EPSILON_SLACK)
    seen: dict[int, float] = {}

    def epsilon(k: int) -> float:
        if k not in seen:
            seen[k] = _epsilon_after(history, last, k)
        return seen[k]

    low, high = 0, 1  # ε(low) within the target (or low = 0), probe high
    while high <= extra and epsilon(high) <= limit:
        low, high = high, min(2 * high, extra) if high < extra else extra + 1
    if high > extra:
        return Projection(None, None, last.round + extra, epsilon(1))
    while high - low > 1:  # ε(high) over the target, ε(low) not
        middle = (low + high) // 2
        low, high = (middle, high) if epsilon(middle) <= limit else (low, middle)
    return Projection(last.round + high, epsilon(high), last.round + extra, epsilon(1))
