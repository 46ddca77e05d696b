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
from fedssl.privacy.records import DPEvent

RULE = (
    "ε re-accounted by the audit's independent accountant for the ledger's events plus more rounds like the "
    "last one (same σ, q, steps, δ); the first round whose ε would exceed the budget is the one the site refuses"
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


def project(events: Sequence[DPEvent], planned_rounds: int | None = None) -> Projection | None:
    """None when there is nothing to project from (no DP event, or no positive target)."""
    if not events or not events[-1].target_epsilon > 0 or events[-1].steps <= 0:
        return None
    last = events[-1]
    extra = horizon(last.round, planned_rounds)
    mechanisms = [e.event for e in events] + [last.event] * extra
    deltas = [e.delta for e in events] + [last.delta] * extra
    if last.accountant == "rdp":
        trajectory = [r.epsilon for r in rdp_trajectory(mechanisms, deltas)]
    else:
        trajectory = pld_trajectory(mechanisms, deltas)
    future = trajectory[len(events):]
    limit = last.target_epsilon * (1 + EPSILON_SLACK)
    for k, epsilon in enumerate(future, start=1):
        if epsilon > limit:
            return Projection(last.round + k, epsilon, last.round + extra, future[0])
    return Projection(None, None, last.round + extra, future[0])
