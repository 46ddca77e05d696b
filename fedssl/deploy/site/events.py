"""The site's own event log: refusals, SuperNode starts, joins, stops and exits.

One JSON object per line in ``<state_dir>/site_events.jsonl``, each with its ``time`` (UTC)
and ``kind``. It is the operator's record, separate from the signed privacy ledger.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedssl.deploy.site.config import SiteConfig

EVENTS_FILE = "site_events.jsonl"


def record_event(config: SiteConfig, kind: str, **fields: Any) -> None:
    """Append one line to the site's own event log (refusals, starts, rejoins)."""
    state = config.state_path
    state.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "kind": kind, **fields})
    with open(state / EVENTS_FILE, "a") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_events(config: SiteConfig) -> list[dict[str, Any]]:
    path = config.state_path / EVENTS_FILE
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events
