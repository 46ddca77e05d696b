"""The ledger audit: verify the ledgers, re-account ε independently, compare.

For a site state dir (``ledger.jsonl``) or a run dir (``sites/*/ledger.jsonl`` plus the
server's ``server_ledger.jsonl``):

1. verify every ledger's hash chain, signatures and head (optionally against registered
   public keys, ``--trusted-keys DIR`` holding ``<site>.ed25519.pub`` / ``server.ed25519.pub``);
2. recompute each site's cumulative ε after every ``dp_event`` from the recorded mechanism
   parameters alone with Google's dp-accounting (:mod:`fedssl.privacy.independent`);
3. compare with the ε the site claimed, check the budget, and cross-check the server's
   per-round record (which also exposes records cut off the end of a site's ledger).

Acceptance rule for a claim (``tol`` = ``--tolerance``, default 0.05)::

    claimed ≥ (1 − tol) · reference

and for the budget, with no tolerance: ``max(claimed, reference) ≤ target``; an event above it
passes only when the independent PLD ε is within the target, and the audit says that this is why.

The reference is the dp-accounting RDP ε for sites using the ``rdp`` accountant and the
PLD ε for ``prv``/``gdp``. Claiming *more* ε than the reference is conservative and always
accepted. One exception, stated in the output when used: where dp-accounting's RDP had to
drop orders it could not evaluate, it is looser than Opacus's (up to ~20% at ε ≈ 50); a
claim that fails the rule but is still ≥ the PLD ε is accepted, since PLD is itself a
valid (tighter) upper bound on ε.

Verification only: the result is an :class:`AuditReport`; fedssl.audit.render turns it into
text, markdown, JSON and a plot, and fedssl.audit.cli is the command line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedssl.audit.discovery import AuditUsageError, discover, load_trusted_keys, same_site, trusted_key_for
from fedssl.layout import RunDir
from fedssl.privacy import chain
from fedssl.privacy.chain import VerifyReport
from fedssl.privacy.independent import pld_trajectory, rdp_trajectory
from fedssl.privacy.keys import PUBLIC_SUFFIX
from fedssl.privacy.ledger import ChainedLog, Ledger, ServerLedger
from fedssl.privacy.records import BUDGET, DP_EVENT, RECOVERY, REFUSAL, ROUND_REPORT, SITE_INIT, DPEvent, bodies
from fedssl.privacy.site_level import privacy_facts_from_reports
from fedssl.privacy.statement import privacy_statement

DEFAULT_TOLERANCE = 0.05
EPSILON_SLACK = 1e-9  # float noise only, as in the site's own budget check
SERVER_KEY_NAME = "server"

# Finding kinds the audit adds to the ledger's own problem kinds.
EPSILON_MISMATCH = "epsilon_mismatch"
OVER_BUDGET = "over_budget"
SERVER_MISMATCH = "server_mismatch"
MISSING_RECORD = "missing_record"
INVALID_MECHANISM = "invalid_mechanism"
UNSIGNED_SERVER_LEDGER = "unsigned_server_ledger"


@dataclass(frozen=True)
class Finding:
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"


@dataclass
class EventAudit:
    """One dp_event: what the site recorded (seq and body) and what the independent accountants say."""

    seq: int
    recorded: DPEvent
    epsilon_rdp: float = math.nan
    epsilon_pld: float = math.nan
    rdp_orders_dropped: bool = False

    @property
    def epsilon_claimed(self) -> float:
        return self.recorded.epsilon_after

    @property
    def reference_kind(self) -> str:
        return "rdp" if self.recorded.accountant == "rdp" else "pld"

    @property
    def epsilon_reference(self) -> float:
        return self.epsilon_rdp if self.reference_kind == "rdp" else self.epsilon_pld

    def accepted_by_pld_fallback(self, tolerance: float) -> bool:
        """Fails the RDP rule only because dp-accounting's RDP dropped orders, yet is a sound bound."""
        return (
            self.epsilon_claimed < (1 - tolerance) * self.epsilon_reference
            and self.reference_kind == "rdp"
            and self.rdp_orders_dropped
            and self.epsilon_claimed >= self.epsilon_pld
        )

    def bound(self, tolerance: float) -> float:
        """The independent ε this claim is held to."""
        return self.epsilon_pld if self.accepted_by_pld_fallback(tolerance) else self.epsilon_reference

    def accepted(self, tolerance: float) -> bool:
        return self.epsilon_claimed >= (1 - tolerance) * self.bound(tolerance)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> EventAudit:
        """Raises KeyError, TypeError or ValueError for a record that does not hold a dp_event."""
        return cls(seq=int(record["seq"]), recorded=DPEvent.from_body(record["body"]))


@dataclass
class SiteAudit:
    site_id: str
    ledger_path: Path
    trust: str = chain.TRUST_ON_FIRST_USE
    fingerprint: str | None = None
    events: list[EventAudit] = field(default_factory=list)
    refusals: list[dict[str, Any]] = field(default_factory=list)
    budgets: list[dict[str, Any]] = field(default_factory=list)
    recoveries: list[dict[str, Any]] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def status(self) -> str:
        return "ok" if self.ok else "FAIL: " + ", ".join(sorted({f.kind for f in self.findings}))

    @property
    def last(self) -> EventAudit | None:
        return self.events[-1] if self.events else None

    @property
    def target_epsilon(self) -> float | None:
        if self.events:
            return self.events[-1].recorded.target_epsilon
        return float(self.budgets[-1]["target_epsilon"]) if self.budgets else None

    @property
    def epsilon_stated(self) -> float | None:
        """What the privacy statement quotes: the larger of claim and independent recomputation."""
        last = self.last
        return None if last is None else max(last.epsilon_claimed, last.epsilon_reference)


@dataclass
class ServerAudit:
    ledger_path: Path
    trust: str
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    reports: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings


@dataclass
class AuditReport:
    path: Path
    tolerance: float
    sites: list[SiteAudit]
    server: ServerAudit | None
    statement: str = ""

    @property
    def ok(self) -> bool:
        return all(site.ok for site in self.sites) and (self.server is None or self.server.ok)


# ---------------------------------------------------------------- auditing

def _verify(log: ChainedLog, key: Ed25519PublicKey | None, findings: list[Finding], notes: list[str]) -> VerifyReport:
    report = log.verify(trusted_public_key=key)
    findings.extend(Finding(p.kind, str(p)) for p in report.problems)
    notes.extend(report.notes)
    return report


def audit_site(state_dir: Path, *, trusted: Mapping[str, Ed25519PublicKey] | None, tolerance: float) -> SiteAudit:
    ledger = Ledger(state_dir)
    records = ledger.records()
    init = records[0]["body"] if records and records[0].get("kind") == SITE_INIT and isinstance(records[0].get("body"), dict) else {}
    site_id = str(init.get("site_id", state_dir.name))
    site = SiteAudit(site_id=site_id, ledger_path=ledger.path)
    key = None
    if trusted is not None:
        # By the ledger's own site name, then by directory name: a forger who renames the
        # site in its init record still meets the key registered for this directory.
        key = trusted_key_for([site_id, state_dir.name], trusted)
        if key is None:
            wanted = f"{site_id}{PUBLIC_SUFFIX} (or {state_dir.name}{PUBLIC_SUFFIX})"
            site.findings.append(Finding(chain.UNTRUSTED_KEY, f"no {wanted} among the trusted keys"))
    report = _verify(ledger, key, site.findings, site.notes)
    site.trust, site.fingerprint, site.records = report.trust, report.fingerprint, report.records
    if site.trust == chain.TRUST_ON_FIRST_USE:
        site.notes.append("key trusted on first use: the ledger's own site_init key; pass --trusted-keys to check it against a registered key")

    site.refusals, site.budgets, site.recoveries = (bodies(report.records, k, with_seq=True) for k in (REFUSAL, BUDGET, RECOVERY))
    for record in report.records:
        if record.get("kind") != DP_EVENT:
            continue
        try:
            site.events.append(EventAudit.from_record(record))
        except (KeyError, TypeError, ValueError) as err:
            site.findings.append(Finding(INVALID_MECHANISM, f"dp_event seq {record.get('seq')}: unreadable ({err})"))
    recompute(site)
    compare_claims(site, tolerance)
    return site


def recompute(site: SiteAudit) -> None:
    """Cumulative ε after every event, from the recorded (σ, q, steps, δ) alone."""
    if not site.events:
        return
    mechanisms = [e.recorded.event for e in site.events]
    deltas = [e.recorded.delta for e in site.events]
    try:
        rdp = rdp_trajectory(mechanisms, deltas)
        pld = pld_trajectory(mechanisms, deltas)
    except ValueError as err:
        site.findings.append(Finding(INVALID_MECHANISM, f"cannot re-account: {err}"))
        return
    for event, r, p in zip(site.events, rdp, pld):
        event.epsilon_rdp, event.rdp_orders_dropped, event.epsilon_pld = r.epsilon, r.orders_dropped, p
    if len({e.recorded.delta for e in site.events}) > 1:
        site.notes.append("δ changed between events; each event's ε is evaluated at its own δ")


def compare_claims(site: SiteAudit, tolerance: float) -> None:
    """Claims against the independent reference, and against the budget; one finding per kind."""
    scored = [e for e in site.events if not math.isnan(e.epsilon_reference)]
    under = [e for e in scored if not e.accepted(tolerance)]
    if under:
        e = under[0]
        site.findings.append(Finding(
            EPSILON_MISMATCH,
            f"{len(under)} event(s) claim less ε than recomputed; first seq {e.seq} (round {e.recorded.round}): claimed "
            f"{e.epsilon_claimed:.4f} < (1 - {tolerance:g}) x {e.reference_kind.upper()} {e.epsilon_reference:.4f}",
        ))
    fallback = [e for e in scored if e.accepted_by_pld_fallback(tolerance)]
    if fallback:
        site.notes.append(
            f"{len(fallback)} event(s) claim less than dp-accounting's RDP, which had to drop orders it could not "
            "evaluate (large q/σ) and is looser than Opacus there; accepted because they are at least the PLD ε, "
            "itself a valid upper bound"
        )
    compare_with_budget(site)


def _within(epsilon: float, target: float) -> bool:
    return epsilon <= target * (1 + EPSILON_SLACK)  # float noise only: no tolerance against the budget


def compare_with_budget(site: SiteAudit) -> None:
    """Within budget means max(claimed, independent reference) <= target, without the claims' tolerance;
    an event whose claim is within it but whose RDP is not passes only if the independent PLD bound is
    within the target, and that is said."""
    above = [e for e in site.events if not _within(max(e.epsilon_claimed, e.epsilon_reference), e.recorded.target_epsilon)]
    # The site's own claim above its target is always a finding; a recomputed RDP above it may be
    # answered by the tighter PLD bound.
    by_pld = [e for e in above if e.reference_kind == "rdp" and _within(e.epsilon_claimed, e.recorded.target_epsilon)
              and _within(e.epsilon_pld, e.recorded.target_epsilon)]
    over = [e for e in above if e not in by_pld]
    if by_pld:
        e = by_pld[-1]
        site.notes.append(
            f"{len(by_pld)} event(s) are within the budget only by the independent PLD bound: last seq {e.seq} "
            f"(round {e.recorded.round}) claimed {e.epsilon_claimed:.4f}, RDP {e.epsilon_rdp:.4f}, PLD {e.epsilon_pld:.4f} "
            f"<= target {e.recorded.target_epsilon:g}; the PLD accountant's ε is why they pass"
        )
    if over:
        e = over[0]
        site.findings.append(Finding(
            OVER_BUDGET,
            f"{len(over)} event(s) exceed the budget; first seq {e.seq} (round {e.recorded.round}): claimed {e.epsilon_claimed:.4f}, "
            f"recomputed {e.reference_kind.upper()} {e.epsilon_reference:.4f} (PLD {e.epsilon_pld:.4f}), target {e.recorded.target_epsilon:g}",
        ))


def audit_server(path: Path, *, trusted: Mapping[str, Ed25519PublicKey] | None) -> ServerAudit:
    log = ServerLedger(path)
    key = trusted.get(SERVER_KEY_NAME) if trusted is not None else None
    audit = ServerAudit(ledger_path=path, trust=chain.TRUST_ON_FIRST_USE)
    report = _verify(log, key, audit.findings, audit.notes)
    audit.trust = report.trust
    if report.trust == chain.UNSIGNED:
        # fedssl's ServerApp always signs it (ServerLedger.open): an unsigned one was not written by it, or was rewritten.
        audit.findings.append(Finding(UNSIGNED_SERVER_LEDGER, "the server ledger is unsigned; the coordinator signs every record "
                                      "with <state_dir>/server.ed25519, so this record cannot witness any site's epsilon"))
    audit.reports = bodies(report.records, ROUND_REPORT, with_seq=True)
    return audit


def cross_check(site: SiteAudit, reports: Sequence[Mapping[str, Any]]) -> None:
    """Every round the server saw from this site must be in the site's ledger, with the same ε."""
    by_seq = {r["seq"]: r for r in site.records if isinstance(r.get("seq"), int)}
    last_seq = max(by_seq, default=-1)
    for report in reports:
        seq = report.get("ledger_seq")
        if not same_site(report.get("site_id"), site.site_id) or not isinstance(seq, int) or seq < 0:
            continue
        record = by_seq.get(seq)
        where = f"server recorded round {report.get('round')} with ledger seq {seq} (ε {report.get('epsilon')})"
        if record is None and seq > last_seq:
            site.findings.append(Finding(chain.TRUNCATED, f"{where}, but the site's ledger ends at seq {last_seq}"))
            continue
        if record is None:
            site.findings.append(Finding(MISSING_RECORD, f"{where}, but the site's ledger lacks it"))
            continue
        body = record.get("body") if isinstance(record.get("body"), dict) else {}
        claimed, reported = body.get("epsilon_after"), report.get("epsilon")
        same_eps = reported is None or (
            isinstance(claimed, (int, float)) and math.isclose(claimed, reported, rel_tol=1e-9, abs_tol=1e-12)
        )
        if record.get("kind") != DP_EVENT or body.get("round") != report.get("round") or not same_eps:
            found = f"a {record.get('kind')} for round {body.get('round')} with ε {claimed}"
            site.findings.append(Finding(SERVER_MISMATCH, f"{where}; the ledger's seq {seq} is {found}"))


def audit_path(
    path: Path,
    *,
    trusted_keys_dir: Path | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    server_ledger: Path | None = None,
    secure_aggregation: bool | None = None,
) -> AuditReport:
    """Audit a site state dir or a run dir. Raises :class:`AuditUsageError` for bad input only."""
    if not 0 <= tolerance < 1:
        raise AuditUsageError(f"--tolerance {tolerance}: must be in [0, 1)")
    path = Path(path)
    site_dirs, run_server = discover(path)
    server_path = Path(server_ledger) if server_ledger is not None else run_server
    if server_path is not None and not server_path.is_file():
        raise AuditUsageError(f"--server-ledger {server_path}: no such file")
    trusted = load_trusted_keys(Path(trusted_keys_dir)) if trusted_keys_dir is not None else None

    sites = [audit_site(d, trusted=trusted, tolerance=tolerance) for d in site_dirs]
    server = audit_server(server_path, trusted=trusted) if server_path is not None else None
    if server is not None:
        for site in sites:
            cross_check(site, server.reports)
        if run_server is not None:  # a run dir: every site the server heard from must be here
            _sites_without_ledger(path, sites, server)
    report = AuditReport(path=path, tolerance=tolerance, sites=sites, server=server)
    # What the server ledger records about aggregation: SecAgg+ rounds and a site-level (central) DP ε.
    seen_secure, site_level = privacy_facts_from_reports(server.reports) if server is not None else (None, None)
    report.statement = privacy_statement(
        sample_level=[
            {"site_id": s.site_id, "epsilon": s.epsilon_stated, "delta": s.last.recorded.delta if s.last else None,
             "accountant": s.last.recorded.accountant if s.last else None}
            for s in sites
        ],
        site_level=site_level,
        secure_aggregation=seen_secure if secure_aggregation is None else secure_aggregation,
    )
    return report


def _sites_without_ledger(path: Path, sites: list[SiteAudit], server: ServerAudit) -> None:
    """A site the server heard DP results from must have a ledger: a deleted ledger is a finding."""
    reported = {str(r.get("site_id")) for r in server.reports if isinstance(r.get("ledger_seq"), int) and r["ledger_seq"] >= 0}
    for site_id in sorted(reported):
        if not any(same_site(site_id, s.site_id) for s in sites):
            missing = SiteAudit(site_id=site_id, ledger_path=RunDir(path).sites)
            detail = f"the server recorded DP rounds from site {site_id} but no ledger of it is under {RunDir(path).sites}"
            missing.findings.append(Finding(chain.MISSING_LEDGER, detail))
            sites.append(missing)
