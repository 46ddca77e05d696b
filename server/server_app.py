"""Flower ServerApp: FedAvg over the encoder only, per-site ε records, checkpoint each round.

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
from fedssl.models import build_encoder
from fedssl.privacy.ledger import ServerLedger
from fedssl.runlog import RunLog
from fedssl.sites import RUN_CONFIG_PATH, RUN_DIR
from fedssl.training.plan import TrainPlan
from server.strategy import FedSSLAvg

FINAL_ENCODER = "encoder.pt"
LATEST_ENCODER = "encoder_latest.pt"
SERVER_DONE = "server_done.json"

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = load_config(str(context.run_config[RUN_CONFIG_PATH]))
    run_dir = Path(str(context.run_config[RUN_DIR]))
    started = time.time()
    encoder = build_encoder(config.model.encoder, config.model.input_shape, width=config.model.width,
                            depth=config.model.depth, seed=config.run.seed)
    plan = TrainPlan(
        run_id=str(context.run_id),
        server_round=1,
        planned_rounds=config.federation.rounds,
        pretext=config.pretext.name,
        pretext_params=config.pretext.params,
        encoder=config.model.encoder,
        width=config.model.width,
        depth=config.model.depth,
        local_steps=config.training.local_steps,
        batch_size=config.training.batch_size,
        lr=config.training.lr,
        optimizer=config.training.optimizer,
        momentum=config.training.momentum,
        seed=config.run.seed,
    )
    fed = config.federation
    strategy = FedSSLAvg(
        run_log=RunLog(run_dir),
        server_ledger=ServerLedger(run_dir),
        num_rounds=fed.rounds,
        fraction_train=fed.fraction_train,
        fraction_evaluate=0.0,
        min_train_nodes=fed.min_sites,
        min_available_nodes=fed.min_sites,
    )

    def checkpoint(server_round: int, arrays: ArrayRecord):
        torch.save(arrays.to_torch_state_dict(), run_dir / LATEST_ENCODER)
        return None

    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(encoder.state_dict()),
        num_rounds=fed.rounds,
        train_config=ConfigRecord(plan.to_wire()),
        evaluate_fn=checkpoint,
    )
    torch.save(result.arrays.to_torch_state_dict(), run_dir / FINAL_ENCODER)
    (run_dir / SERVER_DONE).write_text(json.dumps({"run_id": context.run_id, "rounds": fed.rounds, "seconds": time.time() - started}))
