"""Reading the files the server leaves in a run directory into typed records.

metrics.jsonl is written by `fedssl.runlog`: non-finite floats arrive as null, a site that
trains without DP reports ε = -1, and a reply the server could not use is a `failed`
site_round carrying only round, site_id (-1 when unknown), node_id, status and reason.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from fedssl.errors import DataError
from fedssl.evaluation.results import EvalResults
from fedssl.runlog import KIND_ROUND, KIND_SITE_ROUND, METRICS_FILE

CONFIG_FILE = "config.yaml"
EVALUATION_FILE = "evaluation.json"
SUMMARY_FILE = "summary.json"
FAILED = "failed"
NAN = math.nan


@dataclass(frozen=True)
class SiteRound:
    """One site's outcome in one round (`kind: site_round`)."""

    round: int
    site_id: int  # -1: the server could not tell which site a failed reply came from
    node_id: int
    status: str  # trained | refused | failed
    epsilon: float = NAN  # cumulative spend; NaN when not recorded, negative when trained without DP
    target_epsilon: float = NAN
    delta: float = NAN
    pretext_loss: float = NAN
    num_examples: int = 0
    steps: int = 0
    train_seconds: float = NAN
    reason: str = ""

    @property
    def has_epsilon(self) -> bool:
        return math.isfinite(self.epsilon) and self.epsilon >= 0


@dataclass(frozen=True)
class RoundRecord:
    """The server's aggregate view of one round (`kind: round`)."""

    round: int
    num_sites: int
    num_trained: int
    mean_pretext_loss: float
    max_epsilon: float
    seconds: float


RECORD_TYPES: dict[str, type[SiteRound] | type[RoundRecord]] = {KIND_SITE_ROUND: SiteRound, KIND_ROUND: RoundRecord}
# A failed reply has no training metrics, so only these are required of it.
FAILED_REQUIRED = ("round", "site_id", "node_id", "status")


def group_by_site(site_rounds: list[SiteRound]) -> dict[int, list[SiteRound]]:
    """Each known site's records in round order, sites in id order (unattributed failures left out)."""
    grouped: dict[int, list[SiteRound]] = {}
    for record in sorted(site_rounds, key=lambda r: (r.site_id, r.round)):
        if record.site_id >= 0:
            grouped.setdefault(record.site_id, []).append(record)
    return grouped


@dataclass(frozen=True)
class RunFiles:
    run_dir: Path
    site_rounds: list[SiteRound]
    rounds: list[RoundRecord]
    config: dict[str, Any]
    evaluation: EvalResults | None
    summary: dict[str, Any]

    @property
    def site_ids(self) -> list[int]:
        return list(group_by_site(self.site_rounds))

    @property
    def failures(self) -> list[SiteRound]:
        return [record for record in self.site_rounds if record.status == FAILED]

    @property
    def run_name(self) -> str:
        run_section = self.config.get("run")
        name = run_section.get("name") if isinstance(run_section, dict) else None
        return str(self.summary.get("run_name") or name or self.run_dir.name)


def _parse_record(line: str, where: str) -> SiteRound | RoundRecord | None:
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: not valid JSON ({error.msg}); each line must be one JSON object") from None
    record_type = RECORD_TYPES.get(raw.get("kind")) if isinstance(raw, dict) else None
    if record_type is None:
        return None  # kinds this report does not draw (future additions) are not an error
    names = [f.name for f in fields(record_type)]
    required = FAILED_REQUIRED if raw.get("status") == FAILED else [n for n in names if n != "reason"]
    missing = [name for name in required if name not in raw]
    if missing:
        raise DataError(f"{where}: {raw['kind']} record lacks {', '.join(missing)}")
    # runlog writes non-finite floats as null; NaN keeps them numeric and out of every max/mean.
    values = {name: NAN if raw[name] is None else raw[name] for name in names if name in raw}
    return record_type(**values)


def read_metrics(path: Path) -> tuple[list[SiteRound], list[RoundRecord]]:
    if not path.is_file():
        raise DataError(f"{path} not found; write_report needs the metrics.jsonl of a finished or running run")
    site_rounds: list[SiteRound] = []
    rounds: list[RoundRecord] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        record = _parse_record(line, f"{path}:{number}")
        if isinstance(record, SiteRound):
            site_rounds.append(record)
        elif isinstance(record, RoundRecord):
            rounds.append(record)
    return site_rounds, rounds


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def load_run(run_dir: Path) -> RunFiles:
    """Everything the report needs; config, evaluation and summary are optional."""
    run_dir = Path(run_dir)
    site_rounds, rounds = read_metrics(run_dir / METRICS_FILE)
    config_path = run_dir / CONFIG_FILE
    config = yaml.safe_load(config_path.read_text(encoding="utf-8")) if config_path.is_file() else None
    evaluation = _read_json(run_dir / EVALUATION_FILE)
    return RunFiles(
        run_dir=run_dir,
        site_rounds=sorted(site_rounds, key=lambda r: (r.round, r.site_id)),
        rounds=sorted(rounds, key=lambda r: r.round),
        config=config if isinstance(config, dict) else {},
        evaluation=EvalResults.from_dict(evaluation) if evaluation is not None else None,
        summary=_read_json(run_dir / SUMMARY_FILE) or {},
    )
