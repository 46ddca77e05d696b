"""Flower ServerApp: FedAvg over the encoder only, per-site ε records, checkpoint each round.

With ``secure_aggregation.enabled`` the rounds run on Flower's SecAgg+ workflow instead
(server/secagg_app.py); ``site_dp.enabled`` wraps either path in Flower's DP wrappers (server/site_dp.py).
Both paths record every site's reply through one RoundRecorder (server/strategy.py).

Never imports data loading, pretext tasks or DP training (tests/test_import_rules.py): the server
builds the initial encoder from the same factory as the sites (so keys match) and otherwise only
moves weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedssl.config import ExperimentConfig, load_config
from fedssl.errors import ConfigError
from fedssl.fl.keys import RUN_COORDINATOR_DIR, RUN_RESUME
from fedssl.fl.plan import TrainPlan, plan_from_config
from fedssl.layout import RunDir
from fedssl.models import encoder_for
from fedssl.phases import mark
from fedssl.privacy.ledger import ServerLedger
from fedssl.privacy.site_level import AGGREGATION_SECAGG
from fedssl.privacy.watermarks import WATERMARKS_FILE, SiteWatermarks
from fedssl.run.checkpoint import checkpoint_now, load_checkpoint, reconcile_logs
from fedssl.run.server_marks import ServerDone, write_done, write_failed
from fedssl.run.stock import POST_RUN_COMMAND, Launch, prepare_stock_run, resolve_launch
from fedssl.runlog import RunLog
from fedssl.warmstart.checkpoint import load_warm_start
from server.grid import PromptGrid
from server.resume import RoundOffset
from server.site_dp import SiteLevelBook, message_strategy
from server.strategy import AllSitesFailed, RoundRecorder

INFO, ERROR = 20, 40  # logging levels
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    mark("server_main")
    launch = _launch(context)
    if launch is None:
        return
    config = load_config(str(launch.config_path))
    run_dir = RunDir(launch.run_dir)
    started = time.time()
    book = SiteLevelBook(config, run_dir.path) if config.site_dp.enabled else None
    recorder = round_recorder(config, run_dir, Path(str(context.run_config.get(RUN_COORDINATOR_DIR) or run_dir.path)), book)
    start = _starting_point(context, config, run_dir, recorder)
    plan = plan_from_config(config, run_id=start.run_id)
    try:
        final = _run_rounds(PromptGrid(grid), context, config, plan, start, recorder, book, run_dir)
    except AllSitesFailed as err:  # a clean stop: the driver raises this line (fedssl.run.flower_runtime)
        log(ERROR, "fedssl: %s", err)
        write_failed(run_dir, str(context.run_id), str(err))
        return
    torch.save(final, run_dir.final_encoder)
    mark("server_done")
    write_done(run_dir, ServerDone(run_id=start.run_id, rounds=config.federation.rounds,
                                   resumed_after=start.round if start.resumed else None, seconds=time.time() - started))
    if launch.stock:  # nobody waits for the results: say what evaluates and reports them
        log(INFO, "fedssl: federated rounds done; evaluate and write the report with: %s %s", POST_RUN_COMMAND, run_dir.path)


def _launch(context: Context) -> Launch | None:
    """The run's config and directory; a run started by stock `flwr run` gets its run dir prepared here
    (fedssl.run.stock). A config that cannot run that way is one logged line, and nothing starts."""
    try:
        launch = resolve_launch(context.run_config, context.run_id)
        if launch.stock and str(context.run_config.get(RUN_RESUME, "")).lower() != "true":
            prepare_stock_run(launch)
            log(INFO, "fedssl: run %s from %s -> %s", context.run_id, launch.source, launch.run_dir)
    except ConfigError as err:
        log(ERROR, "fedssl: error: %s", err)
        return None
    return launch


@dataclass(frozen=True)
class Start:
    """Where the rounds start: the encoder, the rounds already completed and the run id the sites see."""

    encoder: dict[str, torch.Tensor]
    round: int
    run_id: str
    resumed: bool


def _starting_point(context: Context, config: ExperimentConfig, run_dir: RunDir, recorder: RoundRecorder) -> Start:
    """A fresh run: the initial (or warm-start) encoder, Flower's run id. A resumed one: its checkpoint's."""
    if str(context.run_config.get(RUN_RESUME, "")).lower() == "true":
        checkpoint = load_checkpoint(run_dir)
        superseded = reconcile_logs(run_dir, checkpoint, recorder.server_ledger)
        log(INFO, "fedssl: resuming run %s after round %d of %d (%d server-ledger record(s) of the interrupted round kept)",
            checkpoint.run_id, checkpoint.round, checkpoint.planned_rounds, superseded)
        return Start(checkpoint.encoder, checkpoint.round, checkpoint.run_id, resumed=True)
    encoder = encoder_for(config.model, seed=config.run.seed)
    if config.warm_start.enabled:
        # Written by the coordinator before the run (fedssl.warmstart.pretrain); checked against this encoder.
        load_warm_start(run_dir.warm_start, encoder)
    return Start(encoder.state_dict(), 0, str(context.run_id), resumed=False)


def round_recorder(config: ExperimentConfig, run_dir: RunDir, state_dir: Path, book: SiteLevelBook | None = None) -> RoundRecorder:
    """The run's recorder. ``state_dir`` outlives runs (the coordinator's, in a deployment): it holds the
    server ledger's signing key and each site's last (ledger seq, ε), so a site rolled back between runs is refused."""
    return RoundRecorder(
        run_log=RunLog(run_dir.path),
        server_ledger=ServerLedger.open(run_dir.server_ledger, state_dir),
        watermarks=SiteWatermarks(state_dir / WATERMARKS_FILE),
        max_num_examples=config.federation.max_num_examples,
        num_rounds=config.federation.rounds,
        aggregation=AGGREGATION_SECAGG if config.secure_aggregation.enabled else config.federation.strategy,
        report_fields=book.fields if book is not None else lambda server_round: {},
    )


def _run_rounds(grid: Grid, context: Context, config: ExperimentConfig, plan: TrainPlan, start: Start,
                recorder: RoundRecorder, book: SiteLevelBook | None, run_dir: RunDir) -> dict[str, torch.Tensor]:
    """The rounds after ``start.round`` on the configured path; returns the final encoder, checkpointing after each round."""
    fed = config.federation
    latest = {"encoder": start.encoder}

    def checkpoint(server_round: int, state: dict[str, torch.Tensor]) -> None:
        latest["encoder"] = state
        if server_round > start.round or not start.resumed:  # the resumed-from checkpoint is on disk already
            checkpoint_now(run_dir, recorder.server_ledger, completed=server_round, planned_rounds=fed.rounds,
                           run_id=plan.run_id, encoder=state, strategy={"aggregation": recorder.aggregation})

    remaining = fed.rounds - start.round
    if remaining <= 0:  # killed after the last round's checkpoint, before the final encoder was written
        return start.encoder
    if config.secure_aggregation.enabled:  # Flower's SecAgg+ runs on its legacy workflow: server/secagg_app.py
        from server.secagg_app import run_secure_aggregation

        if start.resumed:
            raise RuntimeError("resuming a SecAgg+ run is not supported yet; start it again with --overwrite")
        return run_secure_aggregation(grid, context, config, plan, start.encoder, recorder, book, checkpoint)
    strategy = message_strategy(  # FedSSLAvg, or Flower's DP wrapper around it (server/site_dp.py)
        config,
        book,
        recorder=recorder,
        fraction_train=fed.fraction_train,
        fraction_evaluate=0.0,
        min_train_nodes=fed.min_sites,
        min_available_nodes=fed.min_sites,
    )
    mark("server_first_round")
    RoundOffset(strategy, start.round).start(
        grid=grid,
        initial_arrays=ArrayRecord(start.encoder),
        num_rounds=remaining,
        timeout=fed.round_timeout,
        train_config=ConfigRecord(plan.to_wire()),
        evaluate_fn=lambda server_round, arrays: checkpoint(server_round + start.round, arrays.to_torch_state_dict()),
    )
    return latest["encoder"]
