"""Attack: a site claims just under what the audit recomputes, and the audit's slack lets it pass.

Issue 12, point 8: the audit accepted a claim within 5 % of the independent ε and compared only the
claim with the target, so a recomputed RDP ε of 8.40 passed a target of 8 (reproduced on 740c140).
Now (fedssl.audit.ledgers) a site passes only when max(claimed, independent RDP) <= target, or when
the independent PLD bound is within the target, and then the audit says so.
"""

from __future__ import annotations

from pathlib import Path

from fedssl.audit.ledgers import DEFAULT_TOLERANCE, OVER_BUDGET, EventAudit, SiteAudit, compare_claims, recompute
from ledger_files import dp_event

Event = tuple[float, float, int]


def _borderline(history: list[Event], accountant: str, claim_ratio: float) -> tuple[SiteAudit, float]:
    """The attack on a lenient audit: claim just inside the tolerance below the independent ε, and set
    the target at the claim, so only the tolerance stands between the recomputed ε and the budget."""
    site = SiteAudit(site_id="s", ledger_path=Path("ledger.jsonl"))
    delta = 1e-5
    for i, event in enumerate(history):
        site.events.append(EventAudit.from_record({"seq": i + 2, "body": dp_event(i + 1, event, delta, 0.0, 1e9, accountant)}))
    recompute(site)
    last = site.events[-1]
    claimed = claim_ratio * last.epsilon_reference  # within the 5 % tolerance of the reference
    site.events = [EventAudit.from_record({"seq": e.seq, "body": dp_event(e.recorded.round, e.recorded.event, delta, claimed if e is last
                                                                           else e.epsilon_reference, claimed, accountant)})
                   for e in site.events]
    recompute(site)
    compare_claims(site, DEFAULT_TOLERANCE)
    return site, claimed


def test_a_recomputed_epsilon_above_the_budget_fails_even_within_the_claims_tolerance() -> None:
    # prv-accounted site: the independent reference is PLD. Claimed 0.96 x PLD passes the claim rule,
    # but the recomputed ε is 4 % above the budget: it used to pass on the 5 % slack.
    site, claimed = _borderline([(1.1, 0.05, 50)], "prv", 0.96)
    last = site.events[-1]
    assert last.epsilon_pld > last.recorded.target_epsilon == claimed
    assert {f.kind for f in site.findings} == {OVER_BUDGET}


def test_above_budget_by_rdp_passes_only_by_pld_and_says_so() -> None:
    # rdp-accounted site claiming 0.96 x the independent RDP, target = the claim: RDP is above the
    # budget, PLD (a valid, tighter bound) is within it. It passes, and the audit names PLD as the reason.
    site, claimed = _borderline([(1.1, 0.05, 50)], "rdp", 0.96)
    last = site.events[-1]
    assert last.epsilon_rdp > claimed >= last.epsilon_pld
    assert site.ok
    assert any("only by the independent PLD bound" in note for note in site.notes)
