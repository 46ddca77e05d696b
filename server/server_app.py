"""Flower ServerApp: FedAvg over the encoder only, per-site ε records, checkpoint each round.

With ``secure_aggregation.enabled`` the rounds run on Flower's SecAgg+ workflow instead
(server/secagg_app.py); ``site_dp.enabled`` wraps either path in Flower's DP wrappers (server/site_dp.py).

Never imports data loading or DP training: the server builds the initial encoder from
the same factory as the sites (so keys match) and otherwise only moves weights.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedssl.config import load_config
from fedssl.fl.run_keys import RUN_CONFIG_PATH, RUN_DIR, SERVER_DONE
from fedssl.models import build_encoder
from fedssl.phases import mark
from fedssl.privacy.ledger import ServerLedger
from fedssl.runlog import RunLog
from fedssl.training.plan import plan_from_config
from fedssl.warmstart import WARM_START_FILE, load_warm_start
from server.site_dp import message_strategy

FINAL_ENCODER = "encoder.pt"
LATEST_ENCODER = "encoder_latest.pt"

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    mark("server_main")
    config = load_config(str(context.run_config[RUN_CONFIG_PATH]))
    run_dir = Path(str(context.run_config[RUN_DIR]))
    started = time.time()
    encoder = build_encoder(config.model.encoder, config.model.input_shape, width=config.model.width,
                            depth=config.model.depth, seed=config.run.seed)
    if config.warm_start.enabled:
        # Written by the CLI before the run (fedssl.warmstart.prepare_warm_start); checked against this encoder.
        load_warm_start(run_dir / WARM_START_FILE, encoder)
    plan = plan_from_config(config, run_id=str(context.run_id))
    fed = config.federation

    def checkpoint(server_round: int, arrays: ArrayRecord):
        torch.save(arrays.to_torch_state_dict(), run_dir / LATEST_ENCODER)
        return None

    if config.secure_aggregation.enabled:  # Flower's SecAgg+ runs on its legacy workflow: server/secagg_app.py
        from server.secagg_app import run_secure_aggregation

        final = run_secure_aggregation(grid, context, config, plan, encoder.state_dict(), run_dir,
                                       checkpoint=lambda rnd, state: torch.save(state, run_dir / LATEST_ENCODER))
    else:
        strategy = message_strategy(  # FedSSLAvg, or Flower's DP wrapper around it (server/site_dp.py)
            config,
            run_dir,
            run_log=RunLog(run_dir),
            server_ledger=ServerLedger(run_dir),
            num_rounds=fed.rounds,
            fraction_train=fed.fraction_train,
            fraction_evaluate=0.0,
            min_train_nodes=fed.min_sites,
            min_available_nodes=fed.min_sites,
        )
        mark("server_first_round")
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(encoder.state_dict()),
            num_rounds=fed.rounds,
            timeout=fed.round_timeout,
            train_config=ConfigRecord(plan.to_wire()),
            evaluate_fn=checkpoint,
        )
        final = result.arrays.to_torch_state_dict()
    torch.save(final, run_dir / FINAL_ENCODER)
    mark("server_done")
    done = run_dir / (SERVER_DONE + ".tmp")
    done.write_text(json.dumps({"run_id": context.run_id, "rounds": fed.rounds, "seconds": time.time() - started}))
    done.replace(run_dir / SERVER_DONE)  # atomic: the driver starts on the results the moment this name appears
