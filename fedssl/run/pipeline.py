"""The run pipeline: the one sequence `fedssl simulate` and `fedssl server start` both go through.

    preflight (the config against its data) → check the config → fill model.input_shape → run directory → warm start → header
    → start the federation (the launcher) → results (summary) → evaluation, overlapping
    Flower's shutdown → finish → final summary → report and terminal summary

What differs between a simulation and a deployment is the launcher (:class:`Launcher`):
fedssl.run.simulation.Simulation (a private in-memory SuperLink, simulated sites) and
fedssl.deploy.coordinator.Coordinator (a TLS SuperLink, registered sites). Heavy imports (torch,
Flower) happen inside the steps, so a caller can load and check a config first, cheaply: the
preflight (fedssl.preflight) lists every mismatch of the config with its data before torch is imported.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from fedssl.config import ExperimentConfig, save_config
from fedssl.errors import ConfigError, FedSSLError
from fedssl.layout import RunDir
from fedssl.preflight import require_preflight
from fedssl.progress import ProgressDisplay
from fedssl.run.server_marks import read_done, stop_reason

Echo = Callable[[str], None]


class Federation(Protocol):
    """A started federated run (fedssl.run.flower_runtime.FlwrRun)."""

    def wait_for_results(self, timeout: float | None = None) -> float:
        """Seconds until the run's results were complete; raises if the run failed."""

    def finish(self):
        """Wait for Flower to exit and clean up; returns an outcome with ``flwr_exit_seconds``."""

    def abort(self) -> None:
        """Stop everything at once (the caller failed or was interrupted before the results)."""


class Launcher(Protocol):
    """What a way of running a federation supplies to the pipeline."""

    evaluation_optional: bool  # True: an evaluation without labels here is skipped with a message, not an error
    simulates_sites: bool  # True: data.source is the sites' data (its shape, labels and size are theirs); False: each site holds its own
    results_timeout: float | None  # seconds to wait for the results; None: no limit

    def input_shape(self, config: ExperimentConfig) -> list[int]:
        """model.input_shape when the config does not set it (or a ConfigError saying to set it)."""

    def describe(self, config: ExperimentConfig) -> str:
        """The header line's middle part: sites, rounds, pretext, privacy."""

    def summary_fields(self) -> dict:
        """Extra facts for summary.json (e.g. ``deployment``, ``registered_sites``)."""

    def start(self, config: ExperimentConfig, run_dir: Path, resume: bool = False) -> Federation:
        """Start the federated run of a prepared run directory (``resume``: from its checkpoint); returns at once."""


def say(message: str) -> None:
    print(message, flush=True)


def run_pipeline(config: ExperimentConfig, launcher: Launcher, *, overwrite: bool = False, evaluate: bool = True,
                 echo: Echo = say) -> Path:
    """Run ``config`` through ``launcher`` from the checks to the report; returns the run directory."""
    started = time.perf_counter()
    # Every problem of the config with its data, before torch and Flower load (they take seconds).
    require_preflight(config, simulated_sites=launcher.simulates_sites, evaluate=evaluate,
                      evaluation_optional=launcher.evaluation_optional)
    from fedssl.models.private import check_encoder
    from fedssl.pretext import check_config

    check_config(config)  # the pretext registry's part of the config, at the edge
    if not config.model.input_shape:
        config.model.input_shape = list(launcher.input_shape(config))
    m = config.model
    check_encoder(m.encoder, m.input_shape, m.width, m.depth)  # a brought-your-own encoder, before Flower starts
    run_dir = prepare_run_dir(config, overwrite=overwrite)
    from fedssl.warmstart.pretrain import prepare_warm_start

    # Public/synthetic pretraining on the coordinator, before any site is contacted: no site data, no ε.
    prepare_warm_start(config, run_dir, progress=ProgressDisplay(echo, prefix="fedssl: "))
    echo(f"fedssl: run {config.run.name}: {launcher.describe(config)} -> {run_dir}")
    return _federate(config, launcher, run_dir, evaluate=evaluate, echo=echo, started=started)


def resume_pipeline(run_dir: Path, launcher: Launcher, *, evaluate: bool = True, echo: Echo = say) -> Path:
    """Continue a killed run from its checkpoint (fedssl.run.checkpoint) with the config saved in it:
    the remaining rounds under the same run id, then evaluation and report as usual.

    Checked before Flower starts, reading only: a directory that is not a run dir, has no readable
    checkpoint or has finished is one :class:`ResumeError` line, and nothing in it is changed."""
    started = time.perf_counter()
    from fedssl.config import load_config
    from fedssl.run.checkpoint import ResumeError, check_resumable

    run_dir = Path(run_dir).resolve()
    checkpoint = check_resumable(run_dir)
    config = load_config(str(RunDir(run_dir).config))
    if config.federation.rounds != checkpoint.planned_rounds:
        raise ResumeError(f"{run_dir}: config.yaml plans {config.federation.rounds} rounds, its checkpoint {checkpoint.planned_rounds}; "
                          "the run's config was changed after it started. Restore it, or start a new run")
    if config.secure_aggregation.enabled:
        raise ResumeError(f"{run_dir}: resuming a SecAgg+ run is not supported yet (its checkpoint is kept); "
                          f"start it again: fedssl simulate {RunDir(run_dir).config} --overwrite")
    require_preflight(config, simulated_sites=launcher.simulates_sites, evaluate=evaluate,
                      evaluation_optional=launcher.evaluation_optional)
    RunDir(run_dir).server_failed.unlink(missing_ok=True)  # a stale stop marker would end the resumed run at once
    echo(f"fedssl: run {config.run.name}: resuming after round {checkpoint.round} of {checkpoint.planned_rounds} "
         f"(run id {checkpoint.run_id}): {launcher.describe(config)} -> {run_dir}")
    return _federate(config, launcher, run_dir, evaluate=evaluate, echo=echo, started=started, resume=True)


def _federate(config: ExperimentConfig, launcher: Launcher, run_dir: Path, *, evaluate: bool, echo: Echo, started: float,
              resume: bool = False) -> Path:
    """From the prepared run dir: the federation, summary, evaluation overlapping Flower's shutdown, report."""
    federation = launcher.start(config, run_dir, resume=True) if resume else launcher.start(config, run_dir)
    seconds = wait_or_abort(federation, launcher.results_timeout)
    write_summary(run_dir, run_name=config.run.name, federation_seconds=seconds, **launcher.summary_fields(),
                  **({"resumed": True} if resume else {}))
    try:
        # The evaluation reads only the finished run's files: it overlaps Flower's shutdown.
        if evaluate and config.evaluation.enabled:
            evaluate_run_dir(run_dir, echo, optional=launcher.evaluation_optional)
    finally:
        outcome = federation.finish()
    write_summary(run_dir, flwr_exit_seconds=outcome.flwr_exit_seconds, wall_seconds=time.perf_counter() - started)
    report(run_dir, echo)
    return run_dir


def wait_or_abort(federation: Federation, timeout: float | None = None) -> float:
    """Seconds until the run's results; a run that fails or is interrupted before them is aborted."""
    try:
        return federation.wait_for_results(timeout)
    except BaseException:
        federation.abort()
        raise


def prepare_run_dir(config: ExperimentConfig, overwrite: bool) -> Path:
    """A fresh run directory holding the resolved config (model.input_shape filled in)."""
    run_dir = config.run_dir().resolve()
    if run_dir.exists():
        if not overwrite:
            raise FedSSLError(
                f"run dir {run_dir} exists; pick another run.name (--set run.name=...) or pass --overwrite to replace it"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    save_config(config, RunDir(run_dir).config)
    return run_dir


def write_summary(run_dir: Path, **fields) -> None:
    """Merge ``fields`` into the run's summary.json."""
    path = RunDir(run_dir).summary
    current = json.loads(path.read_text()) if path.exists() else {}
    current.update(fields)
    path.write_text(json.dumps(current, indent=1))


def finish_run_dir(run_dir: Path) -> None:
    """Before `fedssl evaluate RUN_DIR`: the run must have finished its rounds. A run nobody waited on
    (stock `flwr run .`, fedssl.run.stock) gets its summary.json here, from the ServerApp's done marker."""
    paths = RunDir(run_dir)
    if not paths.config.is_file():
        raise FedSSLError(f"{run_dir}: not a run directory (no {paths.config.name}); give the run dir the run printed")
    if not paths.server_done.is_file():
        stopped = stop_reason(paths)
        why = f": {stopped}" if stopped is not None else "; see `flwr log <run id>`"
        raise FedSSLError(f"{run_dir}: the federated run did not finish (no {paths.server_done.name}){why}")
    if not paths.summary.exists():
        from fedssl.config import load_config

        write_summary(run_dir, run_name=load_config(str(paths.config)).run.name, federation_seconds=read_done(paths).seconds,
                      launcher="flwr run")


def evaluate_run_dir(run_dir: Path, echo: Echo = say, *, optional: bool = False) -> None:
    """Central evaluation on consented labels; ``optional``: without them, say so and go on."""
    from fedssl.evaluation.central import evaluate_run

    echo("fedssl: central evaluation on consented labels ...")
    try:
        evaluate_run(run_dir, progress=ProgressDisplay(echo, prefix="fedssl: "))
    except ConfigError as err:
        if not optional:
            raise
        echo(f"fedssl: evaluation skipped: {err}")


def report(run_dir: Path, echo: Echo = say) -> Path:
    """Write report.md and print the terminal summary."""
    from fedssl.reporting import terminal_summary, write_report

    path = write_report(run_dir)
    echo(terminal_summary(run_dir))
    echo(f"fedssl: report written to {path}")
    return path
