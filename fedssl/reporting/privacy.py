"""The report's privacy statement: the same text `fedssl audit` prints, fed with this run's facts.

One statement serves both (fedssl.privacy.statement); here we only gather its inputs:
each site's last reported ε, whether SecAgg+ hid individual updates and any site-level ε
(from the server ledger), and what public data a warm start used.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fedssl.layout import RunDir
from fedssl.privacy.site_level import privacy_facts
from fedssl.privacy.statement import privacy_statement as canonical_statement
from fedssl.runlog import FAILED, read_metrics
from fedssl.warmstart.checkpoint import public_pretraining_description

NO_DP = (
    "**No differential privacy.** This run trained without DP-SGD (`privacy.enabled: false`): "
    "the encoder updates sites sent carry no formal privacy guarantee, and any ε shown is not a bound."
)


def privacy_statement(config: dict[str, Any], run_dir: Path) -> str:
    """What the run's guarantee covers and what it does not, without the statement's own heading."""
    privacy = config.get("privacy") if isinstance(config.get("privacy"), dict) else {}
    if not privacy.get("enabled", True):
        return NO_DP
    layout = RunDir(run_dir)
    facts = privacy_facts(layout.server_ledger)
    text = canonical_statement(
        sample_level=_sample_level(layout, privacy),
        site_level=facts["site_level"],
        secure_aggregation=facts["secure_aggregation"],
        public_pretraining=public_pretraining_description(layout.warm_start_info),
    )
    return text.removeprefix("## Privacy statement").lstrip("\n")


def _sample_level(layout: RunDir, privacy: dict[str, Any]) -> list[dict[str, Any]]:
    last: dict[int, float | None] = {}
    site_rounds = read_metrics(layout.metrics)[0] if layout.metrics.is_file() else []
    for record in site_rounds:
        if record.site_id >= 0 and record.status != FAILED:
            last[record.site_id] = record.epsilon if math.isfinite(record.epsilon) else None
    return [
        {"site_id": site, "epsilon": eps, "delta": privacy.get("delta"), "accountant": privacy.get("accountant", "rdp")}
        for site, eps in sorted(last.items())
    ]
