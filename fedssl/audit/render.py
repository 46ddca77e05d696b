"""What `fedssl audit` shows of an :class:`~fedssl.audit.ledgers.AuditReport`: the table and
terminal text, the markdown report with its ε plot, and the JSON anyone can re-account from.

matplotlib is imported only when the plot is drawn: the text output needs no plotting stack.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedssl.layout import AUDIT_PLOT, AUDIT_REPORT

if TYPE_CHECKING:
    from fedssl.audit.ledgers import AuditReport, EventAudit, Finding, ServerAudit, SiteAudit


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
            str(sum(e.recorded.steps for e in site.events)),
            _span([e.recorded.noise_multiplier for e in site.events], ".3g"),
            _span([e.recorded.sample_rate for e in site.events], ".3g"),
            _span([e.recorded.delta for e in site.events], ".0e"),
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
        "is also accepted); claiming more is conservative. The budget has no tolerance: max(claimed, recomputed ε) "
        "≤ target, or else the independent PLD ε ≤ target, stated as the reason"
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


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def to_json(report: AuditReport, report_files: Sequence[Path] = ()) -> dict[str, Any]:
    """Everything needed to re-account with other tools: every event's σ, q, steps, δ and claimed ε."""
    return {
        "tool": "fedssl audit",
        "format": 1,
        "path": str(report.path),
        "ok": report.ok,
        "tolerance": report.tolerance,
        "acceptance_rule": acceptance_rule(report.tolerance),
        "sites": [_site_json(s) for s in report.sites],
        "server": None if report.server is None else _server_json(report.server),
        "statement": report.statement,
        "report_files": [str(p) for p in report_files],
    }


def _findings_json(findings: Sequence[Finding]) -> list[dict[str, str]]:
    return [{"kind": f.kind, "detail": f.detail} for f in findings]


def _site_json(s: SiteAudit) -> dict[str, Any]:
    return {
        "site_id": s.site_id,
        "ledger": str(s.ledger_path),
        "ok": s.ok,
        "status": s.status,
        "trust": s.trust,
        "fingerprint": s.fingerprint,
        "target_epsilon": s.target_epsilon,
        "epsilon_claimed": s.last.epsilon_claimed if s.last else None,
        "epsilon_rdp": _finite(s.last.epsilon_rdp) if s.last else None,
        "epsilon_pld": _finite(s.last.epsilon_pld) if s.last else None,
        "reference": s.last.reference_kind if s.last else None,
        "findings": _findings_json(s.findings),
        "notes": s.notes,
        "events": [_event_json(e) for e in s.events],
        "budgets": s.budgets,
        "refusals": s.refusals,
        "recoveries": s.recoveries,
    }


def _event_json(e: EventAudit) -> dict[str, Any]:
    r = e.recorded
    return {
        "seq": e.seq, "run_id": r.run_id, "round": r.round, "steps": r.steps,
        "sample_rate": r.sample_rate, "noise_multiplier": r.noise_multiplier,
        "max_grad_norm": r.max_grad_norm, "delta": r.delta, "accountant": r.accountant,
        "status": r.status, "epsilon_claimed": e.epsilon_claimed, "target_epsilon": r.target_epsilon,
        "epsilon_rdp": _finite(e.epsilon_rdp), "epsilon_pld": _finite(e.epsilon_pld),
        "rdp_orders_dropped": e.rdp_orders_dropped,
    }


def _server_json(server: ServerAudit) -> dict[str, Any]:
    return {
        "ledger": str(server.ledger_path),
        "ok": server.ok,
        "trust": server.trust,
        "findings": _findings_json(server.findings),
        "notes": server.notes,
        "round_reports": server.reports,
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
