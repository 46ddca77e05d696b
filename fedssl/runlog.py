"""The run directory's metrics.jsonl: one JSON object per line, per site per round and per round.

Written by the server, read by reporting and audit. Non-finite floats are written as
null (JSON has no infinity): ε is null for a site that trains without DP.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
KIND_SITE_ROUND = "site_round"
KIND_ROUND = "round"


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunLog:
    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, kind: str, **fields: Any) -> None:
        line = json.dumps({"kind": kind, **{k: _finite(v) for k, v in fields.items()}}, sort_keys=False)
        with self.path.open("a") as handle:
            handle.write(line + "\n")


def read_run_log(run_dir: Path) -> Iterator[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return
    with path.open() as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)
