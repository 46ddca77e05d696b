"""A site's privacy budget and its last rounds, from its own state (``fedssl site status``).

Read-only: nothing here writes the accountant, the ledger or the event log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedssl.deploy.site.config import SiteConfig
from fedssl.deploy.site.events import read_events
from fedssl.deploy.site.pinning import APP_REFUSED
from fedssl.privacy.records import DP_EVENT, REFUSAL, dp_events


@dataclass(frozen=True)
class BudgetView:
    enabled: bool
    target_epsilon: float
    delta: float
    spent: float
    steps: int
    rounds: int
    next_round_epsilon: float | None  # ε after one more round like the last one; None before the first

    @property
    def left(self) -> float:
        return max(0.0, self.target_epsilon - self.spent)

    @property
    def exhausted(self) -> bool:
        from fedssl.privacy.budget import EPSILON_SLACK

        if not self.enabled or self.next_round_epsilon is None:
            return False
        return self.next_round_epsilon > self.target_epsilon * (1 + EPSILON_SLACK)


def budget_view(config: SiteConfig) -> BudgetView:
    """The site's budget from its own state (read-only; never writes the ledger)."""
    from fedssl.privacy.accountant import load_accountant

    from fedssl.privacy.analysis import epsilon_of

    p = config.privacy
    state = load_accountant(config.state_path) if config.state_path.exists() else None
    if state is not None:
        history, delta, accountant = list(state.history), state.mechanism.delta, state.mechanism.accountant
    else:
        # No accountant file: the signed write-ahead ledger still says what was spent (the
        # next training round rebuilds the file from it); never report 0 while it holds events.
        from fedssl.privacy.ledger import Ledger

        events = dp_events(Ledger(config.state_path).records())
        if not events:
            return BudgetView(p.enabled, p.target_epsilon, p.delta, 0.0, 0, 0, None)
        history = [e.event for e in events]
        delta, accountant = events[0].delta, events[0].accountant
    spent = epsilon_of(history, delta, accountant)
    nxt = epsilon_of([*history, history[-1]], delta, accountant) if history else None
    # The site's own target decides (site.yaml), even if the state was created with another.
    return BudgetView(p.enabled, p.target_epsilon, delta, spent, sum(n for _, _, n in history), len(history), nxt)


def ledger_rounds(config: SiteConfig, last: int = 5) -> tuple[list[dict[str, Any]], str]:
    """The last DP rounds and refusals from the site's ledger, plus its verification status."""
    from fedssl.privacy.keys import load_signing_key
    from fedssl.privacy.ledger import LEDGER_FILE, Ledger

    if not (config.state_path / LEDGER_FILE).exists():
        return [], "no ledger yet (the site has not trained)"
    ledger = Ledger(config.state_path)
    trusted = load_signing_key(config.ledger_key_path).public_key() if config.ledger_key_path and config.ledger_key_path.exists() else None
    report = ledger.verify(trusted_public_key=trusted)
    verdict = "verified" + (" against the site's key" if trusted else " (trust on first use)") if report.ok else (
        f"PROBLEM: {report.problems[0]} ({len(report.problems)} problem(s)); run `fedssl audit {config.state_dir}`"
    )
    records = [r for r in report.records if r["kind"] in (DP_EVENT, REFUSAL)]
    return records[-last:], verdict


def status_text(config: SiteConfig, last: int = 5) -> str:
    budget = budget_view(config)
    lines = [f"site {config.site.name} (id {config.site.id}), state {config.state_dir}"]
    if budget.enabled:
        state = "SPENT (the next round would exceed the target)" if budget.exhausted else "available"
        lines.append(
            f"privacy budget: eps spent {budget.spent:.3f} of {budget.target_epsilon:g} (delta {budget.delta:g}), "
            f"left {budget.left:.3f}; {budget.rounds} DP round(s), {budget.steps} steps; {state}"
        )
        if budget.next_round_epsilon is not None:
            lines.append(f"  one more round like the last would bring eps to {budget.next_round_epsilon:.3f}")
    else:
        lines.append("privacy: DISABLED in site.yaml (no differential privacy)")
    records, verdict = ledger_rounds(config, last)
    lines.append(f"ledger: {verdict}")
    for r in records:
        b = r["body"]
        if r["kind"] == DP_EVENT:
            lines.append(f"  {r['time'][:19]}  run {b['run_id']} round {b['round']}: {b['steps']} steps, eps after {b['epsilon_after']:.3f}")
        else:
            lines.append(f"  {r['time'][:19]}  run {b['run_id']} round {b['round']}: REFUSED ({b['reason']})")
    refusals = [e for e in read_events(config) if e.get("kind") == APP_REFUSED]
    if refusals:
        e = refusals[-1]
        lines.append(f"app pinning: {len(refusals)} refusal(s); last {e['time']}: {e['app_hash']}")
    return "\n".join(lines)
