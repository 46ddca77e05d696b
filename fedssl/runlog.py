"""The run directory's metrics.jsonl: its one writer and its one reader.

One JSON object per line: a ``site_round`` per site per round and a ``round`` per round,
written by the server and read by the report and the privacy statement. Non-finite floats are
written as null (JSON has no infinity) and read back as NaN: ε is null for a site that trains
without DP. A site that trains without DP reports ε = -1, and a reply the server could not use
is a ``failed`` site_round carrying only round, site_id (-1 when unknown), node_id, status and
reason (and ``last_site_id``, the site that node last answered as, when known).

Standard library only: the ServerApp writes it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fedssl.errors import DataError
from fedssl.layout import RunDir

KIND_SITE_ROUND = "site_round"
KIND_ROUND = "round"
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
    last_site_id: int = -1  # for a failed reply: the site this node last answered as (-1: unknown)

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
OPTIONAL = ("reason", "last_site_id")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunLog:
    """Appends records to a run directory's metrics.jsonl."""

    def __init__(self, run_dir: Path) -> None:
        self.path = RunDir(run_dir).metrics
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, kind: str, **fields: Any) -> None:
        line = json.dumps({"kind": kind, **{k: _finite(v) for k, v in fields.items()}}, sort_keys=False)
        with self.path.open("a") as handle:
            handle.write(line + "\n")


def _parse_record(line: str, where: str) -> SiteRound | RoundRecord | None:
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: not valid JSON ({error.msg}); each line must be one JSON object") from None
    record_type = RECORD_TYPES.get(raw.get("kind")) if isinstance(raw, dict) else None
    if record_type is None:
        return None  # kinds this reader does not know (future additions) are not an error
    names = [f.name for f in fields(record_type)]
    required = FAILED_REQUIRED if raw.get("status") == FAILED else [n for n in names if n not in OPTIONAL]
    missing = [name for name in required if name not in raw]
    if missing:
        raise DataError(f"{where}: {raw['kind']} record lacks {', '.join(missing)}")
    # Non-finite floats were written as null; NaN keeps them numeric and out of every max/mean.
    values = {name: NAN if raw[name] is None else raw[name] for name in names if name in raw}
    return record_type(**values)


def read_metrics(path: Path) -> tuple[list[SiteRound], list[RoundRecord]]:
    """Every site_round and round record of a metrics.jsonl, in file order."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found; it is written by the server of a finished or running run")
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


def group_by_site(site_rounds: list[SiteRound]) -> dict[int, list[SiteRound]]:
    """Each known site's records in round order, sites in id order (unattributed failures left out)."""
    grouped: dict[int, list[SiteRound]] = {}
    for record in sorted(site_rounds, key=lambda r: (r.site_id, r.round)):
        if record.site_id >= 0:
            grouped.setdefault(record.site_id, []).append(record)
    return grouped
