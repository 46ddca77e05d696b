"""Run reports: report.md, PNG plots and a terminal summary from a run directory."""

from fedssl.reporting.privacy import privacy_statement
from fedssl.reporting.report import terminal_summary, write_report
from fedssl.reporting.verdicts import (
    ONE_RUN_IS_ONE_DRAW,
    describe_gain,
    describe_warm_start_gain,
    handcrafted_verdict,
    headline,
    pretraining_verdict,
    raw_input_verdict,
    warm_start_verdict,
)
from fedssl.reporting.run_files import RunFiles, load_run
from fedssl.runlog import RoundRecord, SiteRound
from fedssl.reporting.site_spend import SiteSpend, site_spends

__all__ = [
    "ONE_RUN_IS_ONE_DRAW",
    "RoundRecord",
    "RunFiles",
    "SiteSpend",
    "SiteRound",
    "describe_gain",
    "describe_warm_start_gain",
    "handcrafted_verdict",
    "headline",
    "load_run",
    "pretraining_verdict",
    "privacy_statement",
    "raw_input_verdict",
    "site_spends",
    "terminal_summary",
    "warm_start_verdict",
    "write_report",
]
