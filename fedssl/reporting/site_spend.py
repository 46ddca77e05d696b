"""Per-site privacy spend as the server recorded it: the numbers behind the report's ε table.

(A site's own budget, which it enforces, is fedssl.privacy.budget.SiteBudget.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedssl.runlog import SiteRound, group_by_site


@dataclass(frozen=True)
class SiteSpend:
    site_id: int
    rounds_trained: int
    final_epsilon: float | None  # None: the site recorded no DP spend (no DP, or only failures)
    budget: float | None
    last_status: str
    last_round: int

    @property
    def percent_used(self) -> float | None:
        if self.final_epsilon is None or self.budget is None:
            return None
        return 100.0 * self.final_epsilon / self.budget


def _positive(value: float) -> float | None:
    return value if math.isfinite(value) and value > 0 else None


def site_spends(site_rounds: list[SiteRound]) -> list[SiteSpend]:
    """One row per known site, in site order."""
    budgets = []
    for site_id, records in group_by_site(site_rounds).items():
        accounted = [record for record in records if record.has_epsilon]
        budgets.append(
            SiteSpend(
                site_id=site_id,
                rounds_trained=sum(record.status == "trained" for record in records),
                # Spent ε only grows, so the largest reported value is the final spend.
                final_epsilon=max((record.epsilon for record in accounted), default=None),
                budget=_positive(accounted[-1].target_epsilon) if accounted else None,
                last_status=records[-1].status,
                last_round=records[-1].round,
            )
        )
    return budgets


def format_optional(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"
