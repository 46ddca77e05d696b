"""The report's privacy statement: the same text `fedssl audit` prints, fed with this run's facts.

One statement serves both (fedssl.privacy.statement); here we only gather its inputs:
each site's last reported ε, whether SecAgg+ hid individual updates and any site-level ε
(from the server ledger), and what public data a warm start used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedssl.privacy.site_level import run_privacy_facts
from fedssl.privacy.statement import privacy_statement as canonical_statement
from fedssl.runlog import KIND_SITE_ROUND, read_run_log
from fedssl.warmstart import public_pretraining_description

NO_DP = (
    "**No differential privacy.** This run trained without DP-SGD (`privacy.enabled: false`): "
    "the encoder updates sites sent carry no formal privacy guarantee, and any ε shown is not a bound."
)


def privacy_statement(config: dict[str, Any], run_dir: Path) -> str:
    """What the run's guarantee covers and what it does not, without the statement's own heading."""
    privacy = config.get("privacy") if isinstance(config.get("privacy"), dict) else {}
    if not privacy.get("enabled", True):
        return NO_DP
    facts = run_privacy_facts(run_dir)
    text = canonical_statement(
        sample_level=_sample_level(run_dir, privacy),
        site_level=facts["site_level"],
        secure_aggregation=facts["secure_aggregation"],
        public_pretraining=public_pretraining_description(run_dir),
    )
    return text.removeprefix("## Privacy statement").lstrip("\n")


def _sample_level(run_dir: Path, privacy: dict[str, Any]) -> list[dict[str, Any]]:
    last: dict[int, float | None] = {}
    for entry in read_run_log(run_dir):
        if entry.get("kind") == KIND_SITE_ROUND and entry.get("site_id", -1) >= 0 and entry.get("status") != "failed":
            last[int(entry["site_id"])] = entry.get("epsilon")
    return [
        {"site_id": site, "epsilon": eps, "delta": privacy.get("delta"), "accountant": privacy.get("accountant", "rdp")}
        for site, eps in sorted(last.items())
    ]
