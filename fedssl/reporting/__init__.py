"""Run reports: report.md, PNG plots and a terminal summary from a run directory."""

from fedssl.reporting.privacy import privacy_statement
from fedssl.reporting.report import (
    describe_gain,
    describe_warm_start_gain,
    pretraining_verdict,
    terminal_summary,
    warm_start_verdict,
    write_report,
)
from fedssl.reporting.run_files import RoundRecord, RunFiles, SiteRound, load_run
from fedssl.reporting.site_budget import SiteBudget, site_budgets

__all__ = [
    "RoundRecord",
    "RunFiles",
    "SiteBudget",
    "SiteRound",
    "describe_gain",
    "describe_warm_start_gain",
    "load_run",
    "pretraining_verdict",
    "privacy_statement",
    "site_budgets",
    "terminal_summary",
    "warm_start_verdict",
    "write_report",
]
