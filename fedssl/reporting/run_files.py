"""Reading the files a finished run leaves in its directory into typed records, for the report.

metrics.jsonl has its one reader in fedssl.runlog; here it is gathered with the config,
evaluation and summary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedssl.evaluation.results import EvalResults
from fedssl.layout import RunDir
from fedssl.runlog import FAILED, RoundRecord, SiteRound, group_by_site, read_metrics


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


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def load_run(run_dir: Path) -> RunFiles:
    """Everything the report needs; config, evaluation and summary are optional."""
    layout = RunDir(run_dir)
    site_rounds, rounds = read_metrics(layout.metrics)
    config = yaml.safe_load(layout.config.read_text(encoding="utf-8")) if layout.config.is_file() else None
    evaluation = _read_json(layout.evaluation)
    return RunFiles(
        run_dir=layout.path,
        site_rounds=sorted(site_rounds, key=lambda r: (r.round, r.site_id)),
        rounds=sorted(rounds, key=lambda r: r.round),
        config=config if isinstance(config, dict) else {},
        evaluation=EvalResults.from_dict(evaluation) if evaluation is not None else None,
        summary=_read_json(layout.summary) or {},
    )
