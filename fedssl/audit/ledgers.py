"""`fedssl audit`: verify the ledgers, re-account ε independently, compare, report.

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

The reference is the dp-accounting RDP ε for sites using the ``rdp`` accountant and the
PLD ε for ``prv``/``gdp``. Claiming *more* ε than the reference is conservative and always
accepted. One exception, stated in the output when used: where dp-accounting's RDP had to
drop orders it could not evaluate, it is looser than Opacus's (up to ~20% at ε ≈ 50); a
claim that fails the rule but is still ≥ the PLD ε is accepted, since PLD is itself a
valid (tighter) upper bound on ε.

Exit codes of :func:`audit_main`: 0 clean, 1 any tamper / mismatch / over-budget, 2 usage.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedssl.errors import ConfigError
from fedssl.privacy import chain
from fedssl.privacy.independent import Event, pld_trajectory, rdp_trajectory
from fedssl.privacy.keys import PUBLIC_SUFFIX, load_verify_key
from fedssl.layout import AUDIT_PLOT, AUDIT_REPORT, SERVER_LEDGER_FILE
from fedssl.privacy.chain import VerifyReport
from fedssl.privacy.ledger import LEDGER_FILE, ChainedLog, Ledger, ServerLedger
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


class AuditUsageError(ConfigError):
    """Bad command-line input: exit code 2, one line, no traceback."""


@dataclass(frozen=True)
class Finding:
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"


@dataclass
class EventAudit:
    """One dp_event: what the site recorded and what the independent accountants say."""

    seq: int
    run_id: str
    round: int
    steps: int
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    delta: float
    accountant: str
    status: str
    epsilon_claimed: float
    target_epsilon: float
    epsilon_rdp: float = math.nan
    epsilon_pld: float = math.nan
    rdp_orders_dropped: bool = False

    @property
    def reference_kind(self) -> str:
        return "rdp" if self.accountant == "rdp" else "pld"

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
        """The independent ε this claim is held to (and the budget checked against)."""
        return self.epsilon_pld if self.accepted_by_pld_fallback(tolerance) else self.epsilon_reference

    def accepted(self, tolerance: float) -> bool:
        return self.epsilon_claimed >= (1 - tolerance) * self.bound(tolerance)

    @property
    def mechanism(self) -> Event:
        return (self.noise_multiplier, self.sample_rate, self.steps)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> EventAudit:
        body = record["body"]
        return cls(
            seq=int(record["seq"]),
            run_id=str(body["run_id"]),
            round=int(body["round"]),
            steps=int(body["steps"]),
            sample_rate=float(body["sample_rate"]),
            noise_multiplier=float(body["noise_multiplier"]),
            max_grad_norm=float(body["max_grad_norm"]),
            delta=float(body["delta"]),
            accountant=str(body["accountant"]),
            status=str(body["status"]),
            epsilon_claimed=float(body["epsilon_after"]),
            target_epsilon=float(body["target_epsilon"]),
        )


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
            return self.events[-1].target_epsilon
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


# ---------------------------------------------------------------- discovery and keys

def discover(path: Path) -> tuple[list[Path], Path | None]:
    """Site state dirs to audit and the run's server ledger (None for a single site)."""
    if path.is_file() and path.name == LEDGER_FILE:
        return [path.parent], None
    if not path.is_dir():
        raise AuditUsageError(f"{path}: no such directory (give a site state dir or a run dir)")
    if (path / LEDGER_FILE).exists():
        return [path], None
    sites = sorted(p.parent for p in path.glob(f"sites/*/{LEDGER_FILE}"))
    server = path / SERVER_LEDGER_FILE
    if not sites and not server.exists():
        raise AuditUsageError(f"{path}: no {LEDGER_FILE} here nor under sites/*/, and no {SERVER_LEDGER_FILE}; nothing to audit")
    return sites, server if server.exists() else None


def load_trusted_keys(key_dir: Path) -> dict[str, Ed25519PublicKey]:
    """``<name>.ed25519.pub`` files → {name: key}."""
    if not key_dir.is_dir():
        raise AuditUsageError(f"--trusted-keys {key_dir}: not a directory")
    return {p.name[: -len(PUBLIC_SUFFIX)]: load_verify_key(p) for p in sorted(key_dir.glob(f"*{PUBLIC_SUFFIX}"))}


_SITE_NUMBER = re.compile(r"^(?:site-?)?0*(\d+)$")


def same_site(a: object, b: object) -> bool:
    """Server reports name a site by number (0), state dirs and ledgers by name ("site-000")."""
    if str(a) == str(b):
        return True
    ma, mb = _SITE_NUMBER.match(str(a)), _SITE_NUMBER.match(str(b))
    return bool(ma and mb and int(ma.group(1)) == int(mb.group(1)))


def _trusted_key_for(names: Sequence[str], trusted: Mapping[str, Ed25519PublicKey]) -> Ed25519PublicKey | None:
    return next((trusted[n] for n in names if n in trusted), None)


# ---------------------------------------------------------------- auditing

def _verify(log: ChainedLog, key: Ed25519PublicKey | None, findings: list[Finding], notes: list[str]) -> VerifyReport:
    report = log.verify(trusted_public_key=key)
    findings.extend(Finding(p.kind, str(p)) for p in report.problems)
    notes.extend(report.notes)
    return report


def audit_site(state_dir: Path, *, trusted: Mapping[str, Ed25519PublicKey] | None, tolerance: float) -> SiteAudit:
    ledger = Ledger(state_dir)
    records = ledger.records()
    init = records[0]["body"] if records and records[0].get("kind") == "site_init" and isinstance(records[0].get("body"), dict) else {}
    site_id = str(init.get("site_id", state_dir.name))
    site = SiteAudit(site_id=site_id, ledger_path=ledger.path)
    key = None
    if trusted is not None:
        # By the ledger's own site name, then by directory name: a forger who renames the
        # site in its init record still meets the key registered for this directory.
        key = _trusted_key_for([site_id, state_dir.name], trusted)
        if key is None:
            wanted = f"{site_id}{PUBLIC_SUFFIX} (or {state_dir.name}{PUBLIC_SUFFIX})"
            site.findings.append(Finding(chain.UNTRUSTED_KEY, f"no {wanted} among the trusted keys"))
    report = _verify(ledger, key, site.findings, site.notes)
    site.trust, site.fingerprint, site.records = report.trust, report.fingerprint, report.records
    if site.trust == chain.TRUST_ON_FIRST_USE:
        site.notes.append("key trusted on first use: the ledger's own site_init key; pass --trusted-keys to check it against a registered key")

    by_kind = _bodies_by_kind(report.records)
    site.refusals, site.budgets, site.recoveries = by_kind["refusal"], by_kind["budget"], by_kind["recovery"]
    for record in report.records:
        if record.get("kind") != "dp_event":
            continue
        try:
            site.events.append(EventAudit.from_record(record))
        except (KeyError, TypeError, ValueError) as err:
            site.findings.append(Finding(INVALID_MECHANISM, f"dp_event seq {record.get('seq')}: unreadable ({err})"))
    recompute(site)
    compare_claims(site, tolerance)
    return site


def _bodies_by_kind(records: Sequence[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {"refusal": [], "budget": [], "recovery": []}
    for record in records:
        if record.get("kind") in grouped and isinstance(record.get("body"), dict):
            grouped[record["kind"]].append({"seq": record.get("seq"), **record["body"]})
    return grouped


def recompute(site: SiteAudit) -> None:
    """Cumulative ε after every event, from the recorded (σ, q, steps, δ) alone."""
    if not site.events:
        return
    mechanisms = [e.mechanism for e in site.events]
    deltas = [e.delta for e in site.events]
    try:
        rdp = rdp_trajectory(mechanisms, deltas)
        pld = pld_trajectory(mechanisms, deltas)
    except ValueError as err:
        site.findings.append(Finding(INVALID_MECHANISM, f"cannot re-account: {err}"))
        return
    for event, r, p in zip(site.events, rdp, pld):
        event.epsilon_rdp, event.rdp_orders_dropped, event.epsilon_pld = r.epsilon, r.orders_dropped, p
    if len({e.delta for e in site.events}) > 1:
        site.notes.append("δ changed between events; each event's ε is evaluated at its own δ")


def compare_claims(site: SiteAudit, tolerance: float) -> None:
    """Claims against the independent reference, and against the budget; one finding per kind."""
    scored = [e for e in site.events if not math.isnan(e.epsilon_reference)]
    under = [e for e in scored if not e.accepted(tolerance)]
    if under:
        e = under[0]
        site.findings.append(Finding(
            EPSILON_MISMATCH,
            f"{len(under)} event(s) claim less ε than recomputed; first seq {e.seq} (round {e.round}): claimed "
            f"{e.epsilon_claimed:.4f} < (1 - {tolerance:g}) x {e.reference_kind.upper()} {e.epsilon_reference:.4f}",
        ))
    fallback = [e for e in scored if e.accepted_by_pld_fallback(tolerance)]
    if fallback:
        site.notes.append(
            f"{len(fallback)} event(s) claim less than dp-accounting's RDP, which had to drop orders it could not "
            "evaluate (large q/σ) and is looser than Opacus there; accepted because they are at least the PLD ε, "
            "itself a valid upper bound"
        )
    over = [
        e for e in site.events
        if e.epsilon_claimed > e.target_epsilon * (1 + EPSILON_SLACK)
        or (1 - tolerance) * e.bound(tolerance) > e.target_epsilon * (1 + EPSILON_SLACK)
    ]
    if over:
        e = over[0]
        site.findings.append(Finding(
            OVER_BUDGET,
            f"{len(over)} event(s) exceed the budget; first seq {e.seq} (round {e.round}): claimed {e.epsilon_claimed:.4f}, "
            f"recomputed {e.bound(tolerance):.4f}, target {e.target_epsilon:g}",
        ))


def audit_server(path: Path, *, trusted: Mapping[str, Ed25519PublicKey] | None) -> ServerAudit:
    log = ServerLedger(path)
    key = trusted.get(SERVER_KEY_NAME) if trusted is not None else None
    audit = ServerAudit(ledger_path=path, trust=chain.TRUST_ON_FIRST_USE)
    report = _verify(log, key, audit.findings, audit.notes)
    audit.trust = report.trust
    if report.trust == chain.UNSIGNED:
        audit.notes.append("the server record is chained but unsigned: it detects accidental damage, not a forger with write access")
    audit.reports = [
        {"seq": r.get("seq"), **r["body"]}
        for r in report.records
        if r.get("kind") == "round_report" and isinstance(r.get("body"), dict)
    ]
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
        if record.get("kind") != "dp_event" or body.get("round") != report.get("round") or not same_eps:
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
            {"site_id": s.site_id, "epsilon": s.epsilon_stated, "delta": s.last.delta if s.last else None,
             "accountant": s.last.accountant if s.last else None}
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
            missing = SiteAudit(site_id=site_id, ledger_path=path / "sites")
            detail = f"the server recorded DP rounds from site {site_id} but no ledger of it is under {path / 'sites'}"
            missing.findings.append(Finding(chain.MISSING_LEDGER, detail))
            sites.append(missing)


# ---------------------------------------------------------------- rendering

def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _span(values: Sequence[float], spec: str) -> str:
    if not values:
        return "-"
    low, high = min(values), max(values)
    return format(low, spec) if low == high else f"{format(low, spec)}..{format(high, spec)}"


TABLE_HEADER = ("site", "rounds", "steps", "σ", "q", "δ", "ε claimed", "ε recomputed (RDP)", "ε PLD", "budget", "status")


def table_rows(report: AuditReport) -> list[tuple[str, ...]]:
    rows = []
    for site in report.sites:
        last = site.last
        rows.append((
            site.site_id,
            str(len(site.events)),
            str(sum(e.steps for e in site.events)),
            _span([e.noise_multiplier for e in site.events], ".3g"),
            _span([e.sample_rate for e in site.events], ".3g"),
            _span([e.delta for e in site.events], ".0e"),
            _fmt(last.epsilon_claimed if last else None, ".3f"),
            _fmt(last.epsilon_rdp if last else None, ".3f"),
            _fmt(last.epsilon_pld if last else None, ".3f"),
            _fmt(site.target_epsilon, "g"),
            site.status,
        ))
    return rows


def format_table(report: AuditReport) -> str:
    rows = [TABLE_HEADER, *table_rows(report)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_HEADER))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def acceptance_rule(tolerance: float) -> str:
    return (
        f"a claim is accepted when claimed ε ≥ (1 - {tolerance:g}) x recomputed ε (dp-accounting RDP for "
        "rdp-accounted sites, PLD for prv/gdp; where dp-accounting's RDP dropped orders, a claim ≥ the PLD ε "
        "is also accepted); claiming more is conservative"
    )


def _details(report: AuditReport) -> list[str]:
    lines = []
    for site in report.sites:
        for finding in site.findings:
            lines.append(f"{site.site_id}: {finding}")
        for note in site.notes:
            lines.append(f"{site.site_id}: note: {note}")
    if report.server is not None:
        lines.extend(f"server: {f}" for f in report.server.findings)
        lines.extend(f"server: note: {n}" for n in report.server.notes)
    return lines


def format_terminal(report: AuditReport) -> str:
    verdict = "PASSED" if report.ok else "FAILED"
    parts = [
        f"fedssl audit of {report.path}: {verdict}",
        "",
        format_table(report),
        "",
        f"tolerance: {acceptance_rule(report.tolerance)}",
        *_details(report),
    ]
    return "\n".join(parts + ["", report.statement])


def to_json(report: AuditReport, report_files: Sequence[Path] = ()) -> dict[str, Any]:
    """Everything needed to re-account with other tools: every event's σ, q, steps, δ and claimed ε."""
    def finite(x: float) -> float | None:
        return x if math.isfinite(x) else None

    return {
        "tool": "fedssl audit",
        "format": 1,
        "path": str(report.path),
        "ok": report.ok,
        "tolerance": report.tolerance,
        "acceptance_rule": acceptance_rule(report.tolerance),
        "sites": [
            {
                "site_id": s.site_id,
                "ledger": str(s.ledger_path),
                "ok": s.ok,
                "status": s.status,
                "trust": s.trust,
                "fingerprint": s.fingerprint,
                "target_epsilon": s.target_epsilon,
                "epsilon_claimed": s.last.epsilon_claimed if s.last else None,
                "epsilon_rdp": finite(s.last.epsilon_rdp) if s.last else None,
                "epsilon_pld": finite(s.last.epsilon_pld) if s.last else None,
                "reference": s.last.reference_kind if s.last else None,
                "findings": [{"kind": f.kind, "detail": f.detail} for f in s.findings],
                "notes": s.notes,
                "events": [
                    {
                        "seq": e.seq, "run_id": e.run_id, "round": e.round, "steps": e.steps,
                        "sample_rate": e.sample_rate, "noise_multiplier": e.noise_multiplier,
                        "max_grad_norm": e.max_grad_norm, "delta": e.delta, "accountant": e.accountant,
                        "status": e.status, "epsilon_claimed": e.epsilon_claimed, "target_epsilon": e.target_epsilon,
                        "epsilon_rdp": finite(e.epsilon_rdp), "epsilon_pld": finite(e.epsilon_pld),
                        "rdp_orders_dropped": e.rdp_orders_dropped,
                    }
                    for e in s.events
                ],
                "budgets": s.budgets,
                "refusals": s.refusals,
                "recoveries": s.recoveries,
            }
            for s in report.sites
        ],
        "server": None if report.server is None else {
            "ledger": str(report.server.ledger_path),
            "ok": report.server.ok,
            "trust": report.server.trust,
            "findings": [{"kind": f.kind, "detail": f.detail} for f in report.server.findings],
            "notes": report.server.notes,
            "round_reports": report.server.reports,
        },
        "statement": report.statement,
        "report_files": [str(p) for p in report_files],
    }


def plot_epsilon(report: AuditReport, path: Path) -> Path | None:
    """ε after each charged round per site (claimed solid, recomputed dashed) against its budget (dotted)."""
    from matplotlib.figure import Figure  # imported here: the audit's text output needs no plotting stack
    from matplotlib.ticker import MaxNLocator

    sites = [s for s in report.sites if s.events]
    if not sites:
        return None
    figure = Figure(figsize=(7.0, 4.2))
    axes = figure.add_subplot()
    for index, site in enumerate(sites):
        color = f"C{index % 10}"
        x = list(range(1, len(site.events) + 1))
        axes.plot(x, [e.epsilon_claimed for e in site.events], color=color, marker=".", label=f"{site.site_id} claimed")
        axes.plot(x, [e.epsilon_reference for e in site.events], color=color, linestyle="--", alpha=0.7)
        if site.target_epsilon is not None:
            axes.axhline(site.target_epsilon, color=color, linestyle=":", alpha=0.8)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylim(bottom=0)
    axes.set(xlabel="charged round (ledger order)", ylabel="cumulative ε",
             title="ε per site: claimed (solid), recomputed (dashed), budget (dotted)")
    axes.legend(fontsize="small", loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def format_markdown(report: AuditReport, plot: Path | None) -> str:
    rows = [TABLE_HEADER, *table_rows(report)]
    table = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(TABLE_HEADER)]
    table += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows[1:]]
    details = _details(report)
    parts = [
        f"# Privacy audit of `{report.path}`",
        "",
        f"**Result: {'PASSED' if report.ok else 'FAILED'}.** Signatures, hash chains and heads verified; ε re-accounted "
        "from the recorded mechanism parameters with Google's dp-accounting, independent of the Opacus code used in training.",
        "",
        *table,
        "",
        f"Tolerance: {acceptance_rule(report.tolerance)}.",
        "",
    ]
    if details:
        parts += ["## Findings and notes", "", *(f"- {line}" for line in details), ""]
    if plot is not None:
        parts += [f"![ε per site over rounds]({plot.name})", ""]
    parts += [
        "Re-account it yourself: `fedssl audit --json` lists every event's σ (noise_multiplier), q (sample_rate), "
        "steps and δ with the ε the site claimed.",
        "",
        report.statement,
    ]
    return "\n".join(parts)


def write_reports(report: AuditReport, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    plot = plot_epsilon(report, out_dir / AUDIT_PLOT)
    markdown = out_dir / AUDIT_REPORT
    markdown.write_text(format_markdown(report, plot))
    return [markdown] + ([plot] if plot is not None else [])


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedssl audit",
        description="Verify privacy ledgers and re-account epsilon independently. Exit 0 clean, 1 on any "
        "tamper/mismatch/over-budget, 2 on usage errors.",
        epilog="fedssl audit --empirical CONFIG [--with-baseline]: test the mechanism itself with a canary "
        "membership attack that gives a lower bound on epsilon (see fedssl audit --empirical --help).",
    )
    parser.add_argument("path", type=Path, help="a site state dir (has ledger.jsonl) or a run dir (has sites/*/ledger.jsonl)")
    parser.add_argument("--trusted-keys", type=Path, metavar="DIR", help="registered public keys: <site>.ed25519.pub, server.ed25519.pub")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="relative tolerance for claimed vs recomputed ε (default 0.05)")
    parser.add_argument("--server-ledger", type=Path, metavar="FILE", help="the server's server_ledger.jsonl, to check a single site against")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of the table")
    parser.add_argument("--out", type=Path, metavar="DIR", help=f"where to write {AUDIT_REPORT} and {AUDIT_PLOT} (default: the audited dir)")
    return parser


def audit_main(argv: Sequence[str]) -> int:
    if "--empirical" in argv:
        from fedssl.audit.empirical import empirical_main

        return empirical_main([a for a in argv if a != "--empirical"])
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exit_:  # argparse already printed its one-line message (or --help)
        return 0 if exit_.code == 0 else 2
    try:
        report = audit_path(
            args.path, trusted_keys_dir=args.trusted_keys, tolerance=args.tolerance, server_ledger=args.server_ledger
        )
    except ConfigError as err:
        print(f"fedssl audit: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # unreadable ledger or key file: name it, no traceback
        print(f"fedssl audit: cannot read {err.filename or args.path}: {err.strerror or err}", file=sys.stderr)
        return 2
    out_dir = args.out or (args.path.parent if args.path.is_file() else args.path)
    try:
        files = write_reports(report, out_dir)
    except OSError as err:
        print(f"fedssl audit: could not write the report to {out_dir}: {err}", file=sys.stderr)
        files = []
    if args.json:
        print(json.dumps(to_json(report, files), indent=1))
    else:
        print(format_terminal(report))
        if files:
            print("report: " + ", ".join(str(p) for p in files))
    return 0 if report.ok else 1
