"""A run directory (or one site's state dir) read into one JSON-able snapshot for the dashboard.

Every file is read by the project's own reader: metrics.jsonl by fedssl.runlog, the ledgers by
exactly what `fedssl audit` runs (fedssl.audit.ledgers.audit_path, statement included), the
evaluation by fedssl.evaluation.results; names come from fedssl.layout. Only metrics, ledgers,
results and the config are read, never site data. A run still being written is normal: a file
that cannot be read yet is a note in ``errors``, and the next change of the files reads it again.

Torch- and Flower-free, so the dashboard starts in well under a second.
"""

from __future__ import annotations

import base64
import json
import math
import time
from pathlib import Path
from typing import Any

import yaml

from fedssl.audit.discovery import same_site
from fedssl.audit.ledgers import AuditReport, SiteAudit, audit_path
from fedssl.dashboard.projection import RULE, project
from fedssl.errors import DataError, FedSSLError
from fedssl.evaluation.results import EvalResults, format_fraction
from fedssl.layout import EPSILON_PLOT, LABEL_EFFICIENCY_PLOT, PRETEXT_PLOT, SITES_DIR, RunDir
from fedssl.privacy.ledger import LEDGER_FILE
from fedssl.runlog import FAILED, RoundRecord, SiteRound, group_by_site, read_metrics

SCHEMA = 1
PLOTS = (LABEL_EFFICIENCY_PLOT, PRETEXT_PLOT, EPSILON_PLOT)
RUN, SITE = "run", "site"


class NotARunError(DataError):
    """The path is neither a run directory nor a site state dir: one line, exit 2."""


def kind_of(path: Path) -> str:
    """RUN for a run directory, SITE for a site state dir; NotARunError otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise NotARunError(f"{path}: no such directory; give a run directory (runs/NAME) or a site state dir")
    if (path / LEDGER_FILE).is_file():
        return SITE
    layout = RunDir(path)
    if layout.config.is_file() or layout.metrics.is_file() or layout.server_ledger.is_file() or layout.sites.is_dir():
        return RUN
    raise NotARunError(f"{path}: neither a run directory (no {layout.config.name}, {layout.metrics.name} or "
                       f"{SITES_DIR}/) nor a site state dir (no {LEDGER_FILE}); give runs/NAME or the site's state_dir")


def watched_files(path: Path) -> list[Path]:
    """The files whose change means a new snapshot: metrics, ledgers, results, plots."""
    layout = RunDir(path)
    fixed = [layout.config, layout.metrics, layout.server_ledger, layout.server_done, layout.summary,
             layout.evaluation, path / LEDGER_FILE, *(path / name for name in PLOTS)]
    ledgers = sorted(layout.sites.glob(f"*/{LEDGER_FILE}")) if layout.sites.is_dir() else []
    return fixed + [p for ledger in ledgers for p in (ledger, ledger.with_suffix(".head"))] + [(path / LEDGER_FILE).with_suffix(".head")]


def signature(path: Path) -> tuple[tuple[str, int, int], ...]:
    """(name, mtime, size) of every watched file that exists: equal signatures, equal snapshots."""
    found = []
    for file in watched_files(path):
        try:
            stat = file.stat()
        except OSError:
            continue
        found.append((str(file), stat.st_mtime_ns, stat.st_size))
    return tuple(found)


def _number(value: float | None) -> float | None:
    """JSON has no NaN: a missing number is null."""
    return None if value is None or not math.isfinite(value) else float(value)


def _config(layout: RunDir, errors: list[str]) -> dict[str, Any]:
    if not layout.config.is_file():
        return {}
    try:
        config = yaml.safe_load(layout.config.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        errors.append(f"{layout.config}: cannot be read yet ({type(err).__name__})")
        return {}
    return config if isinstance(config, dict) else {}


def _section(config: dict[str, Any], name: str) -> dict[str, Any]:
    section = config.get(name)
    return section if isinstance(section, dict) else {}


def _read_json(path: Path, errors: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        errors.append(f"{path}: cannot be read yet ({type(err).__name__})")
        return None
    return value if isinstance(value, dict) else None


def _metrics(layout: RunDir, errors: list[str]) -> tuple[list[SiteRound], list[RoundRecord]]:
    if not layout.metrics.is_file():
        return [], []
    try:
        return read_metrics(layout.metrics)
    except DataError as err:  # e.g. a line being written right now
        errors.append(str(err))
        return [], []


def _audit(path: Path, errors: list[str]) -> AuditReport | None:
    try:
        return audit_path(path)
    except (FedSSLError, OSError) as err:  # nothing to audit yet, or an unreadable file
        errors.append(f"ledger audit: {err}")
        return None


def _rounds(rounds: list[RoundRecord], planned: int | None, finished: bool) -> dict[str, Any]:
    rounds = sorted(rounds, key=lambda r: r.round)
    done = len({r.round for r in rounds})
    seconds = [r.seconds for r in rounds if math.isfinite(r.seconds)]
    mean = sum(seconds) / len(seconds) if seconds else None
    remaining = max(0, planned - done) if planned is not None else None
    eta = None if finished or mean is None or remaining is None else mean * remaining
    return {
        "done": done, "planned": planned, "mean_seconds": mean, "eta_seconds": eta,
        "records": [{"round": r.round, "num_sites": r.num_sites, "num_trained": r.num_trained,
                     "mean_pretext_loss": _number(r.mean_pretext_loss), "max_epsilon": _number(r.max_epsilon),
                     "seconds": _number(r.seconds)} for r in rounds],
    }


def _round_cell(record: SiteRound) -> dict[str, Any]:
    return {"round": record.round, "status": record.status, "reason": record.reason,
            "epsilon": _number(record.epsilon) if record.has_epsilon else None,
            "pretext_loss": _number(record.pretext_loss)}


def _ledger_view(audit: SiteAudit | None, pending: bool = False) -> dict[str, Any]:
    if audit is None:
        return {"ok": None, "status": "verifying…" if pending else "no ledger", "findings": [], "notes": [], "trust": None}
    return {"ok": audit.ok, "status": "verified" if audit.ok else audit.status,
            "findings": [str(f) for f in audit.findings], "notes": list(audit.notes), "trust": audit.trust}


def _ledger_rounds(audit: SiteAudit) -> list[dict[str, Any]]:
    """A site state dir has no metrics: its ledger's DP events and refusals are its rounds."""
    cells = [{"round": e.recorded.round, "status": "trained", "reason": "", "epsilon": _number(e.epsilon_claimed),
              "pretext_loss": None} for e in audit.events]
    cells += [{"round": r.get("round"), "status": "refused", "reason": str(r.get("reason", "")),
               "epsilon": None, "pretext_loss": None} for r in audit.refusals if isinstance(r.get("round"), int)]
    return sorted(cells, key=lambda c: c["round"])


def _site(name: str, records: list[SiteRound] | None, audit: SiteAudit | None, planned: int | None,
          pending: bool = False) -> dict[str, Any]:
    cells = [_round_cell(r) for r in records] if records is not None else (_ledger_rounds(audit) if audit else [])
    last = cells[-1] if cells else {}
    reported = [c["epsilon"] for c in cells if c["epsilon"] is not None]
    events = [e.recorded for e in audit.events] if audit is not None else []
    projection = project(events, planned) if events else None
    epsilon = events[-1].epsilon_after if events else (max(reported) if reported else None)
    target = audit.target_epsilon if audit is not None and audit.target_epsilon else (
        next((r.target_epsilon for r in reversed(records or []) if r.has_epsilon), None))
    return {
        "name": name,
        "status": last.get("status", "waiting"), "reason": last.get("reason", ""), "last_round": last.get("round"),
        "counts": {s: sum(c["status"] == s for c in cells) for s in ("trained", "refused", "failed")},
        "rounds": cells,
        "epsilon": _number(epsilon),
        "epsilon_reported": reported[-1] if reported else None,
        "epsilon_independent": _number(audit.last.epsilon_reference) if audit is not None and audit.last else None,
        "target_epsilon": _number(target),
        "delta": events[-1].delta if events else None,
        "accountant": events[-1].accountant if events else None,
        "epsilon_series": [{"round": e.round, "epsilon": e.epsilon_after} for e in events]
        or [{"round": c["round"], "epsilon": c["epsilon"]} for c in cells if c["epsilon"] is not None],
        "projection": projection.to_dict() if projection is not None else None,
        "ledger": _ledger_view(audit, pending),
    }


def _sites(site_rounds: list[SiteRound], report: AuditReport | None, planned: int | None, pending: bool) -> list[dict[str, Any]]:
    by_id = group_by_site(site_rounds)
    audits = list(report.sites) if report is not None else []
    sites = []
    for site_id, records in by_id.items():
        audit = next((a for a in audits if same_site(a.site_id, site_id)), None)
        if audit is not None:
            audits.remove(audit)
        sites.append(_site(audit.site_id if audit is not None else f"site-{site_id:03d}", records, audit, planned, pending))
    sites += [_site(a.site_id, None, a, planned) for a in audits]  # a ledger with no metrics (yet, or a state dir)
    return sites


def _evaluation(data: dict[str, Any] | None, errors: list[str]) -> dict[str, Any] | None:
    if data is None:
        return None
    try:
        results = EvalResults.from_dict(data)
    except (KeyError, TypeError, ValueError) as err:
        errors.append(f"evaluation.json: cannot be read ({type(err).__name__}: {err})")
        return None
    header = ["row"] + [f"{format_fraction(i.fraction)} ({i.num_labels} labels)" for i in results.fractions]
    table, series = [], {}
    for row in results.rows:
        cells = [None if i.skipped else results.cell(row, i.fraction) for i in results.fractions]
        # Titled as report.md titles it (the baseline rows name their features); the plot's series keep the row names.
        table.append([results.row_title(row)] + ["skipped" if c is None else f"{c.mean:.3f} ± {c.std:.3f}" for c in cells])
        series[row] = [None if c is None else c.mean for c in cells]
    return {"header": header, "rows": table, "notes": results.skip_notes() + results.scored_set_notes(),
            "fractions": [i.fraction for i in results.fractions], "series": series, "scored_on": results.scored_set,
            "labels": f"{results.num_consented_train} of {results.num_train} train examples consented; "
                      f"{results.num_test} {results.scored_set}"}


def _plots(path: Path) -> dict[str, str]:
    """The report's PNG plots that exist, as data URIs (the export must be self-contained)."""
    found = {}
    for name in PLOTS:
        file = path / name
        if file.is_file():
            found[name] = "data:image/png;base64," + base64.b64encode(file.read_bytes()).decode("ascii")
    return found


def _unattributed(site_rounds: list[SiteRound]) -> list[dict[str, Any]]:
    return [{"round": r.round, "node_id": r.node_id, "reason": r.reason, "last_site_id": r.last_site_id}
            for r in site_rounds if r.site_id < 0 and r.status == FAILED]


def _state(layout: RunDir, kind: str, rounds: dict[str, Any]) -> str:
    if kind == SITE:
        return "site state dir"
    if layout.server_done.is_file():
        return "finished"
    return "running" if rounds["done"] or layout.metrics.is_file() else "starting"


def _statement(config: dict[str, Any], report: AuditReport | None) -> str:
    if not _section(config, "privacy").get("enabled", True):
        return "No differential privacy: this run trained without DP-SGD (privacy.enabled: false); any ε shown is not a bound."
    return report.statement.removeprefix("## Privacy statement").lstrip("\n") if report is not None else ""


def build_snapshot(path: Path, *, audit: bool = True) -> dict[str, Any]:
    """Everything the page shows, as plain JSON values. Raises NotARunError for a path that is neither.

    ``audit=False`` is the quick first look after a change (metrics, config, results: milliseconds): ledger
    verification, the independent ε, the projection and the statement are left pending (``audit.pending``)
    for the full snapshot, whose re-accounting takes seconds. A site state dir has only ledgers: always audited."""
    path = Path(path)
    kind = kind_of(path)
    pending = not audit and kind == RUN
    layout, errors = RunDir(path), []
    config = _config(layout, errors)
    site_rounds, round_records = _metrics(layout, errors)
    planned = _section(config, "federation").get("rounds")
    planned = planned if isinstance(planned, int) else None
    report = None if pending else _audit(path, errors)
    rounds = _rounds(round_records, planned, finished=layout.server_done.is_file())
    summary = _read_json(layout.summary, errors) or {}
    server = report.server if report is not None else None
    return {
        "schema": SCHEMA,
        "kind": kind,
        "path": str(path.resolve()),
        "run_name": str(summary.get("run_name") or _section(config, "run").get("name") or path.name),
        "generated_at": time.time(),
        "state": _state(layout, kind, rounds),
        "rounds": rounds,
        "sites": _sites(site_rounds, report, planned, pending),
        "unattributed_failures": _unattributed(site_rounds),
        "audit": {"ok": report.ok if report is not None else None, "pending": pending,
                  "server": None if server is None else {"ok": server.ok, "trust": server.trust,
                                                          "findings": [str(f) for f in server.findings]}},
        "projection_rule": RULE,
        "statement": _statement(config, report),
        "evaluation": _evaluation(_read_json(layout.evaluation, errors), errors),
        "plots": _plots(path),
        "errors": errors,
    }
