"""The ClientApp, called directly with a real Flower Message and Context, and the server's metric aggregation.

The site's data is a real .npy file in which every 10th row is a canary (one distinctive value
everywhere); nothing in a reply may contain it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict

import clients.client_app as client_app
from fedssl.config import load_config, save_config
from fedssl.data.loaders import load_digits_labeled
from fedssl.experiment import central_data_for, simulated_site
from fedssl.fl import keys
from fedssl.fl.egress import EgressError
from fedssl.models import build_encoder, encoder_state_keys
from fedssl.privacy.analysis import epsilon_of
from fedssl.fl.plan import TrainPlan
from fedssl.layout import RunDir
from fedssl.runlog import read_metrics
from server.strategy import FedSSLAvg, RoundRecorder, aggregate_site_metrics

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "experiments" / "digits-tiny.yaml"
CANARY = np.float32(0.31415927)
NUM_ROWS = 300
SERVER_NODE, SITE_NODE = 0, 4242


def train_message(arrays: dict[str, torch.Tensor], plan: TrainPlan) -> Message:
    """A train instruction as the ServerApp sends it; built outside a run, so with explicit metadata."""
    metadata = Metadata(
        run_id=7,
        message_id=uuid.uuid4().hex,
        src_node_id=SERVER_NODE,
        dst_node_id=SITE_NODE,
        reply_to_message_id="",
        group_id=str(plan.server_round),
        created_at=time.time(),
        ttl=3600.0,
        message_type="train",
    )
    content = RecordDict({keys.ARRAYS: ArrayRecord(arrays), keys.CONFIG: ConfigRecord(plan.to_wire())})
    return Message(content=content, metadata=metadata)


def site_context(config_path: Path, run_dir: Path) -> Context:
    return Context(
        run_id=7,
        node_id=SITE_NODE,
        node_config={"partition-id": 0},
        state=RecordDict(),
        run_config={"config-path": str(config_path), "run-dir": str(run_dir)},
    )


class ClientSetup:
    def __init__(self, root: Path) -> None:
        inputs = load_digits_labeled()[0].inputs[:NUM_ROWS].numpy().copy()
        inputs[::10] = CANARY
        np.save(root / "site-data.npy", inputs)
        config = load_config(
            TINY,
            [
                f"data.source={root / 'site-data.npy'}",
                "data.partition=iid",  # the .npy has no labels
                "privacy.target_epsilon=1",
                "training.local_steps=2",
                f"run.output_dir={root}",
            ],
        )
        # as `fedssl simulate` does: resolve the input shape from the data, save the resolved config
        config.model.input_shape = list(central_data_for(config).train.input_shape)
        self.config = config
        self.run_dir = root / "run"
        self.run_dir.mkdir()
        self.config_path = self.run_dir / "config.yaml"
        save_config(config, self.config_path)
        self.encoder = build_encoder("cnn", config.model.input_shape, width=config.model.width, depth=config.model.depth, seed=0)
        self.expected = encoder_state_keys(self.encoder)
        m, t = config.model, config.training
        self.plan = TrainPlan(
            run_id="7", server_round=1, planned_rounds=config.federation.rounds, pretext=config.pretext.name,
            encoder=m.encoder, width=m.width, depth=m.depth, local_steps=t.local_steps, batch_size=t.batch_size,
            lr=t.lr, optimizer=t.optimizer, momentum=t.momentum, seed=config.run.seed,
        )
        self.site_data, _ = simulated_site(str(self.config_path), str(self.run_dir), 0)
        self.message = train_message(self.encoder.state_dict(), self.plan)
        self.reply = client_app.train(self.message, site_context(self.config_path, self.run_dir))

    def copy_run_dir(self, target: Path) -> Path:
        shutil.copytree(self.run_dir, target)
        return target


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> ClientSetup:
    return ClientSetup(tmp_path_factory.mktemp("client-app"))


# ------------------------------------------------------------------ the reply


def test_reply_answers_the_instruction(setup):
    reply, sent = setup.reply, setup.message
    assert not reply.has_error()
    assert reply.metadata.reply_to_message_id == sent.metadata.message_id
    assert reply.metadata.dst_node_id == SERVER_NODE
    assert reply.metadata.message_type == "train"


def test_reply_holds_exactly_arrays_and_metrics(setup):
    content = setup.reply.content
    assert set(content.keys()) == {keys.ARRAYS, keys.METRICS}
    assert isinstance(content[keys.ARRAYS], ArrayRecord)
    assert isinstance(content[keys.METRICS], MetricRecord)


def test_arrays_are_exactly_the_encoder(setup):
    arrays = setup.reply.content[keys.ARRAYS]
    assert {k: tuple(a.shape) for k, a in arrays.items()} == setup.expected
    state = arrays.to_torch_state_dict()
    assert sum(t.numel() for t in state.values()) == sum(t.numel() for t in setup.encoder.state_dict().values())
    assert any(not torch.equal(state[k], v) for k, v in setup.encoder.state_dict().items())  # it trained


def test_metrics_are_whitelisted_scalars(setup):
    metrics = dict(setup.reply.content[keys.METRICS])
    assert set(metrics) <= keys.ALLOWED_METRICS
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values())
    assert metrics[keys.STATUS] == keys.STATUS_CODES["trained"]
    # Under DP the weight is the plan's (batch size x local steps), never the site's exact count.
    assert metrics[keys.NUM_EXAMPLES] == setup.plan.batch_size * setup.plan.local_steps != len(setup.site_data)
    assert keys.PRETEXT_LOSS not in metrics and keys.TRAIN_SECONDS not in metrics
    assert metrics[keys.SITE_ID] == 0 and metrics[keys.DP_ENABLED] == 1
    assert metrics[keys.STEPS] == setup.config.training.local_steps
    assert 0 < metrics[keys.EPSILON] < metrics[keys.TARGET_EPSILON] == 1.0
    assert metrics[keys.DELTA] == setup.config.privacy.delta


def test_reported_epsilon_is_the_sites_own_accountant(setup):
    state = json.loads((setup.run_dir / "sites" / "site-000" / "accountant.json").read_text())
    history = [tuple(e) for e in state["history"]]
    assert len(history) == 1
    eps = setup.reply.content[keys.METRICS][keys.EPSILON]
    assert eps == pytest.approx(epsilon_of(history, setup.config.privacy.delta), rel=1e-12)


def test_no_raw_data_leaves_the_site(setup):
    rows = setup.site_data.inputs.flatten(1).numpy()
    canary_rows = np.all(rows == CANARY, axis=1)
    assert canary_rows.any(), "test setup: site 0 must hold canary rows"
    row_len = rows.shape[1]
    for name, array in setup.reply.content[keys.ARRAYS].items():
        values = np.asarray(array.numpy(), dtype=np.float32).ravel()
        assert not np.any(values == CANARY), f"{name} holds the canary value"
        if values.size >= row_len:
            windows = np.lib.stride_tricks.sliding_window_view(values, row_len)
            hits = (windows[:, None, :] == rows[None, :, :]).all(axis=2)
            assert not hits.any(), f"{name} contains a raw data row"
    for name, value in setup.reply.content[keys.METRICS].items():
        assert np.float32(value) != CANARY, name


# ------------------------------------------------------------------ refusals and the guard in place


def test_refusing_site_replies_without_arrays(setup, tmp_path):
    """The site's own budget is lowered below round 2's cost: it answers, but sends no weights."""
    run_dir = setup.copy_run_dir(tmp_path / "run")
    eps1 = setup.reply.content[keys.METRICS][keys.EPSILON]
    lowered = copy.deepcopy(setup.config)
    lowered.privacy = dataclasses.replace(lowered.privacy, target_epsilon=eps1 * 1.01)
    lowered_path = tmp_path / "lowered.yaml"
    save_config(lowered, lowered_path)
    message = train_message(setup.reply.content[keys.ARRAYS].to_torch_state_dict(), setup.plan.with_round(2))
    reply = client_app.train(message, site_context(lowered_path, run_dir))
    assert set(reply.content.keys()) == {keys.METRICS}
    metrics = reply.content[keys.METRICS]
    assert metrics[keys.STATUS] == keys.STATUS_CODES["refused"]
    assert metrics[keys.EPSILON] == pytest.approx(eps1, rel=1e-12)
    assert keys.PRETEXT_LOSS not in metrics


def test_client_app_runs_the_egress_guard(setup, tmp_path, monkeypatch):
    """If a reply ever carried more than the encoder (here: a smuggled head weight), the ClientApp refuses to send it."""
    run_dir = setup.copy_run_dir(tmp_path / "run")
    import fedssl.site_round as site_round

    real = site_round.site_reply_records

    def leaky(*args, **kwargs):
        records = real(*args, **kwargs)
        state = records[keys.ARRAYS].to_torch_state_dict()
        state["head.weight"] = torch.zeros(4, 32)
        records[keys.ARRAYS] = ArrayRecord(state)
        return records

    monkeypatch.setattr(site_round, "site_reply_records", leaky)
    message = train_message(setup.reply.content[keys.ARRAYS].to_torch_state_dict(), setup.plan.with_round(2))
    with pytest.raises(EgressError, match="head.weight"):
        client_app.train(message, site_context(setup.config_path, run_dir))


# ------------------------------------------------------------------ the server's side


def metrics_record(epsilon: float, examples: int, loss: float, status: str = "trained", dp: bool = True) -> MetricRecord:
    return MetricRecord({
        keys.NUM_EXAMPLES: examples, keys.STATUS: keys.STATUS_CODES[status], keys.SITE_ID: examples,
        keys.STEPS: 2, keys.EPSILON: epsilon, keys.TARGET_EPSILON: 8.0, keys.DELTA: 1e-5, keys.PRETEXT_LOSS: loss,
        keys.TRAIN_SECONDS: 0.1, keys.LEDGER_SEQ: 3, keys.DP_ENABLED: int(dp),
    })


def test_epsilon_is_aggregated_by_max_not_mean():
    records = [RecordDict({keys.METRICS: metrics_record(1.0, 10, 1.0)}), RecordDict({keys.METRICS: metrics_record(7.0, 30, 3.0)})]
    aggregated = aggregate_site_metrics(records, keys.NUM_EXAMPLES)
    assert aggregated[keys.EPSILON] == 7.0
    assert aggregated[keys.NUM_EXAMPLES] == 40
    assert aggregated[keys.PRETEXT_LOSS] == pytest.approx(2.5)  # (10 x 1 + 30 x 3) / 40


def test_a_site_without_dp_makes_the_aggregate_epsilon_infinite():
    """A non-DP site sends epsilon=-1 with dp-enabled=0; the federation then has no finite epsilon."""
    mixed = [RecordDict({keys.METRICS: metrics_record(3.0, 10, 1.0)}), RecordDict({keys.METRICS: metrics_record(-1.0, 30, 1.0, dp=False)})]
    assert aggregate_site_metrics(mixed, keys.NUM_EXAMPLES)[keys.EPSILON] == math.inf
    no_dp = [RecordDict({keys.METRICS: metrics_record(-1.0, 30, 1.0, dp=False)})]
    assert aggregate_site_metrics(no_dp, keys.NUM_EXAMPLES)[keys.EPSILON] == math.inf


def test_dp_replies_without_loss_or_exact_count_average_uniformly(tmp_path):
    """What DP sites now send (no loss, no time, the plan's weight): the server still averages and
    records them, weighting sites with 40 and 400 records alike, and logs their loss as unknown."""
    from fedssl.fl.records import RoundResult
    from fedssl.fl.site_reply import site_reply_records

    plan = TrainPlan(run_id="7", server_round=1, planned_rounds=2, pretext="rotation", encoder="cnn", width=8, depth=2,
                     local_steps=3, batch_size=16, lr=0.1)

    def released(site: int, examples: int) -> MetricRecord:
        result = RoundResult(status="trained", encoder_state=None, num_examples=examples, steps=3, pretext_loss=1.0,
                             epsilon=0.5, target_epsilon=8.0, delta=1e-5, train_seconds=0.2, ledger_seq=1)
        return site_reply_records(result, site, dp_enabled=True, plan=plan)[keys.METRICS]

    arrays, metrics = _strategy(tmp_path).aggregate_train(1, [site_reply(1, released(0, 40), 1.0), site_reply(2, released(1, 400), 3.0)])
    assert torch.allclose(arrays.to_torch_state_dict()["w"], torch.full((3,), 2.0))  # not 400:40 weighted (2.82)
    assert metrics[keys.NUM_EXAMPLES] == 2 * 16 * 3 and math.isnan(metrics[keys.PRETEXT_LOSS])
    sites, (round_record,) = read_metrics(RunDir(tmp_path).metrics)
    assert all(math.isnan(r.pretext_loss) and math.isnan(r.train_seconds) and r.num_examples == 48 for r in sites)
    assert math.isnan(round_record.mean_pretext_loss) and round_record.num_trained == 2


def site_reply(node: int, metrics: MetricRecord, fill: float | torch.Tensor | None) -> Message:
    """A site's reply to a round-1 train instruction, as the strategy receives it."""
    content = RecordDict({keys.CONFIG: ConfigRecord({"server-round": 1})})
    instruction = Message(content=content, metadata=Metadata(
        run_id=7, message_id=uuid.uuid4().hex, src_node_id=SERVER_NODE, dst_node_id=node, reply_to_message_id="",
        group_id="1", created_at=time.time(), ttl=3600.0, message_type="train"))
    records = {keys.METRICS: metrics}
    if fill is not None:
        records[keys.ARRAYS] = ArrayRecord({"w": fill if isinstance(fill, torch.Tensor) else torch.full((3,), fill)})
    return Message(content=RecordDict(records), reply_to=instruction)


def _strategy(path: Path) -> FedSSLAvg:
    from fedssl.privacy.ledger import ServerLedger
    from fedssl.runlog import RunLog

    return FedSSLAvg(recorder=RoundRecorder(run_log=RunLog(path), server_ledger=ServerLedger(RunDir(path).server_ledger), num_rounds=1))


def test_the_average_does_not_depend_on_the_order_replies_arrive(tmp_path):
    # Float addition is not associative: summed in arrival order, the same seeds gave a different
    # encoder run to run. Summed in site order, any arrival order gives the same bits.
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(1000, generator=generator) * 10.0 ** e for e in range(-3, 4)]
    replies = [(node, metrics_record(1.0, 10 + 7 * node, 1.0), w) for node, w in enumerate(weights, start=1)]
    results = []
    for order in (replies, replies[::-1], replies[3:] + replies[:3]):
        arrays, _ = _strategy(tmp_path / str(len(results))).aggregate_train(1, [site_reply(*r) for r in order])
        results.append(arrays.to_torch_state_dict()["w"])
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_strategy_averages_trained_sites_and_records_every_site(tmp_path):
    reply = site_reply

    strategy = _strategy(tmp_path)
    recorder = strategy.recorder
    replies = [
        reply(1, metrics_record(1.0, 10, 1.0), 1.0),
        reply(2, metrics_record(7.0, 30, 3.0), 3.0),
        reply(3, metrics_record(7.5, 50, math.nan, status="refused"), None),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert torch.allclose(arrays.to_torch_state_dict()["w"], torch.full((3,), 2.5))  # refused site left out
    # One rule for every round figure: a refused site still bounds the federation with what it spent.
    assert metrics[keys.EPSILON] == 7.5 and metrics[keys.NUM_EXAMPLES] == 40
    sites, rounds = read_metrics(RunDir(tmp_path).metrics)
    assert sorted((r.node_id, r.status, r.epsilon) for r in sites) == [(1, "trained", 1.0), (2, "trained", 7.0), (3, "refused", 7.5)]
    (round_record,) = rounds
    assert (round_record.num_sites, round_record.num_trained, round_record.max_epsilon) == (3, 2, 7.5)

    # A failed reply carries no site id; the record names the site that node last answered as.
    recorder.failure(2, 2, "NODE_UNAVAILABLE")
    recorder.failure(2, 99, "NODE_UNAVAILABLE")
    site_of_node_2 = next(r.site_id for r in sites if r.node_id == 2)
    failed = {r.node_id: r for r in read_metrics(RunDir(tmp_path).metrics)[0] if r.status == "failed"}
    assert failed[2].site_id == -1 and failed[2].last_site_id == site_of_node_2
    assert failed[99].last_site_id == -1


def test_the_first_message_times_the_training_stack_import(tmp_path):
    """A worker's first message imports fedssl.site_round between two phase marks (federation_overhead reads them
    to say where start-up goes). In a fresh interpreter, as a Ray worker is: another import path that loaded it
    first (clients.secagg_app does) left both marks unwritten."""
    log = tmp_path / "phases.jsonl"
    script = (
        "import sys, time, uuid\n"
        "from flwr.app import Context, Message, Metadata, RecordDict\n"
        "import clients.client_app as client_app\n"
        "assert 'fedssl.site_round' not in sys.modules, 'imported before the first message'\n"
        "meta = Metadata(run_id=7, message_id=uuid.uuid4().hex, src_node_id=0, dst_node_id=1, reply_to_message_id='',\n"
        "                group_id='1', created_at=time.time(), ttl=60.0, message_type='train')\n"
        "try:\n"
        "    client_app.train(Message(content=RecordDict({}), metadata=meta),\n"
        "                     Context(run_id=7, node_id=1, node_config={}, state=RecordDict(), run_config={}))\n"
        "except Exception:\n"
        "    pass  # an empty instruction: only the import before it matters here\n"
    )
    env = {**os.environ, "FEDSSL_PHASE_LOG": str(log)}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    marks = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    assert [m["phase"] for m in marks][:2] == ["client_modules_loading", "client_modules_loaded"], marks
    assert marks[1]["t"] > marks[0]["t"]
