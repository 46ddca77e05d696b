"""The run directory's layout: every file a run writes, named in one place.

``runs/<name>/`` holds what the coordinator's pipeline, the ServerApp, the simulated sites, the
evaluation, the report and the audit write. Each of them takes its paths from :class:`RunDir`,
so a file cannot be written under one name and looked for under another.

Standard library only, and imports nothing of fedssl: every layer (including the ServerApp,
which must not load training code) may use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONFIG_FILE = "config.yaml"  # the resolved experiment config the whole run uses
METRICS_FILE = "metrics.jsonl"  # per site per round and per round (fedssl.runlog)
SERVER_LEDGER_FILE = "server_ledger.jsonl"  # the server's hash-chained record of what sites reported
FINAL_ENCODER = "encoder.pt"
# The coordinator's resumable checkpoint, replaced durably after every completed round (fedssl.run.checkpoint):
# the global encoder, the round it completed, the run id the sites see, and where metrics.jsonl and the
# server ledger stood. `fedssl simulate --resume RUN_DIR` continues from it.
CHECKPOINT_FILE = "checkpoint.pt"
# The ServerApp's last write, once the final encoder is on disk: the run's results are complete
# from the moment it exists (written atomically, so a reader never sees half of it).
SERVER_DONE = "server_done.json"
# Written instead of SERVER_DONE when the ServerApp stops the run itself (every sampled site failed a round):
# {"reason": one line}. The driver raises that line rather than the last error of Flower's log.
SERVER_FAILED = "server_failed.json"
SUMMARY_FILE = "summary.json"  # timings and facts of the run as a whole
EVALUATION_FILE = "evaluation.json"
CONSENT_FILE = "consent.txt"  # the consent manifest the evaluation used
REPORT_FILE = "report.md"
PRETEXT_PLOT = "pretext_loss.png"  # the report's plots, beside it
EPSILON_PLOT = "epsilon.png"
LABEL_EFFICIENCY_PLOT = "label_efficiency.png"
AUDIT_REPORT = "audit.md"  # `fedssl audit` writes these into the audited directory (or --out)
AUDIT_PLOT = "audit_epsilon.png"
FLWR_LOG = "flwr.log"  # everything `flwr run` printed
WARM_START_FILE = "warm_start.pt"  # weights + provenance
WARM_START_INFO = "warm_start.json"  # provenance only
SITE_LEVEL_STATE = "site_level_accountant.json"  # the server's site-level DP accountant
SITES_DIR = "sites"  # each simulated site's state dir: sites/site-XXX/
FLOWER_HOME = ".flwr"  # the simulation's private FLWR_HOME
HIGHWATER_SUFFIX = ".highwater"  # a site's signed high-water mark (fedssl.privacy.highwater)


@dataclass(frozen=True)
class RunDir:
    """Paths of one run directory."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def server_ledger(self) -> Path:
        return self.path / SERVER_LEDGER_FILE

    @property
    def final_encoder(self) -> Path:
        return self.path / FINAL_ENCODER

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT_FILE

    @property
    def server_done(self) -> Path:
        return self.path / SERVER_DONE

    @property
    def server_failed(self) -> Path:
        return self.path / SERVER_FAILED

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY_FILE

    @property
    def evaluation(self) -> Path:
        return self.path / EVALUATION_FILE

    @property
    def consent(self) -> Path:
        return self.path / CONSENT_FILE

    @property
    def report(self) -> Path:
        return self.path / REPORT_FILE

    @property
    def flwr_log(self) -> Path:
        return self.path / FLWR_LOG

    @property
    def warm_start(self) -> Path:
        return self.path / WARM_START_FILE

    @property
    def warm_start_info(self) -> Path:
        return self.path / WARM_START_INFO

    @property
    def site_level_state(self) -> Path:
        return self.path / SITE_LEVEL_STATE

    @property
    def flower_home(self) -> Path:
        return self.path / FLOWER_HOME

    @property
    def sites(self) -> Path:
        return self.path / SITES_DIR

    def site_state(self, site_id: int) -> Path:
        """A simulated site's own state dir (accountant, ledger, pretext head)."""
        return self.sites / f"site-{site_id:03d}"

    def site_highwater(self, site_id: int) -> Path:
        """A simulated site's signed high-water mark: beside its state dir, not in it, so a deleted or
        rolled-back state dir is caught (its ledger key lives in the state dir in simulation)."""
        return self.sites / f"site-{site_id:03d}{HIGHWATER_SUFFIX}"
