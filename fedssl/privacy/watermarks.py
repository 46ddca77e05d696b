"""The coordinator's record of each site's last (ledger seq, ε): ``<state_dir>/site_watermarks.json``.

A site's ledger only grows and its ε only rises, across rounds and runs. A site whose state dir was
rolled back or reset is locally consistent (fedssl.privacy.ledger cannot see it); this record,
kept by the coordinator across runs, can: the ServerApp drops a reply that goes backwards
(server/guard.py). Written atomically after every accepted report; an unreadable file stops the
coordinator with its path (`fedssl server start` checks it before Flower starts) rather than
starting over, which would accept any rolled-back site.

Standard library only (and fedssl.errors): the ServerApp and the coordinator both load it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedssl.errors import ConfigError

if TYPE_CHECKING:
    from fedssl.fl.records import SiteReport

WATERMARKS_FILE = "site_watermarks.json"
# ε is a float written by the site's accountant; equal values may differ in the last bits.
EPSILON_BACKWARDS_SLACK = 1e-9


@dataclass
class Watermark:
    ledger_seq: int
    epsilon: float


class SiteWatermarks:
    """Each site's last accepted (ledger seq, ε), on disk when ``path`` is set (else for this process only)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._marks: dict[str, Watermark] = self._load()

    def _load(self) -> dict[str, Watermark]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            raw = json.loads(self.path.read_text())
            return {str(site): Watermark(int(m["ledger_seq"]), float(m["epsilon"])) for site, m in raw["sites"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            # Refuse rather than start over: an empty record would accept any rolled-back site.
            raise ConfigError(f"{self.path}: unreadable coordinator record of site budgets ({err}); restore it from a backup "
                              "(deleting it forgets every site's last ledger seq and epsilon)") from None

    def problem(self, report: SiteReport) -> str | None:
        """Why this report goes backwards against the site's watermark, or None."""
        mark = self._marks.get(str(report.site_id))
        if mark is None:
            return None
        if report.ledger_seq >= 0 and report.ledger_seq <= mark.ledger_seq:
            return f"ledger seq {report.ledger_seq} is not after its last reported seq {mark.ledger_seq} (rolled back or replayed)"
        if math.isfinite(report.epsilon) and report.epsilon < mark.epsilon - EPSILON_BACKWARDS_SLACK:
            return f"epsilon {report.epsilon:.6g} is below its last reported {mark.epsilon:.6g} (budget reset or rolled back)"
        return None

    def advance(self, report: SiteReport) -> None:
        """Record an accepted report (durably, before the round's result is used)."""
        old = self._marks.get(str(report.site_id), Watermark(-1, 0.0))
        epsilon = max(old.epsilon, report.epsilon) if math.isfinite(report.epsilon) else old.epsilon
        new = Watermark(max(old.ledger_seq, report.ledger_seq), epsilon)
        if new == old and str(report.site_id) in self._marks:
            return
        self._marks[str(report.site_id)] = new
        self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = {"sites": {site: {"ledger_seq": m.ledger_seq, "epsilon": m.epsilon} for site, m in sorted(self._marks.items())}}
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w") as handle:
            json.dump(body, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
