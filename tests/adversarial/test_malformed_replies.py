"""Attack: one malicious site among honest ones sends a malformed or lying reply to the server.

Driven through the real strategy with real Flower Messages: ``configure_train`` builds the round's
instructions (it only asks the grid for node ids), each site answers its instruction with
``Message(reply_to=...)`` as a ClientApp does, honest sites with the records fedssl's own site code
builds (fedssl.fl.site_reply), and ``aggregate_train`` gets them all. Round 1 is honest everywhere
(each node answers as its own site); in round 2 the malicious node (node 104, site 3) attacks.

Each attack must be dropped with a reason (metrics.jsonl and the server ledger), the round must
complete, and the new global model must be finite and equal to the honest-only FedAvg of round 2.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedssl.fl import keys
from fedssl.fl.records import RoundResult
from site_replies import dp_reply_records
from fedssl.layout import RunDir
from fedssl.privacy.ledger import ServerLedger
from fedssl.runlog import RunLog, read_metrics
from server.strategy import FedSSLAvg, RoundRecorder

NODES = {101: 0, 102: 1, 103: 2, 104: 3}  # node id -> the site it is
MALICIOUS = 104
EXAMPLES = {0: 40, 1: 60, 2: 100, 3: 80}


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch):
    """The identity Flower's ServerApp runtime sets before a strategy builds its instructions."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 7), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


class NodeList:
    """The one thing FedAvg.configure_train asks of a Grid: which nodes are connected."""

    def get_node_ids(self):
        return list(NODES)


def global_model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"conv.weight": rng.normal(size=(4, 1, 3, 3)).astype(np.float32), "conv.bias": rng.normal(size=(4,)).astype(np.float32),
            "fc.weight": rng.normal(size=(8, 4)).astype(np.float32)}


def honest_arrays(current: dict[str, np.ndarray], site: int, server_round: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 * server_round + site)
    return {k: (v + 0.01 * rng.normal(size=v.shape)).astype(np.float32) for k, v in current.items()}


def honest_reply(instruction: Message, site: int, server_round: int) -> Message:
    current = {k: a.numpy() for k, a in instruction.content[keys.ARRAYS].items()}
    trained = {k: torch.from_numpy(v) for k, v in honest_arrays(current, site, server_round).items()}
    result = RoundResult(status=keys.STATUS_TRAINED, encoder_state=trained, num_examples=EXAMPLES[site],
                         steps=4, pretext_loss=1.0, epsilon=0.5 * server_round, target_epsilon=8.0, delta=1e-5,
                         train_seconds=0.1, ledger_seq=10 * server_round)
    return Message(content=RecordDict(dp_reply_records(result, site)), reply_to=instruction)


def _metrics(reply: Message, **changes) -> None:
    for name, value in changes.items():
        reply.content[keys.METRICS][name] = value


def _arrays(reply: Message, change) -> None:
    arrays = {k: a.numpy().copy() for k, a in reply.content[keys.ARRAYS].items()}
    change(arrays)
    reply.content[keys.ARRAYS] = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def _set(name: str, index: tuple, value: float):
    def change(arrays):
        arrays[name][index] = value
    return change


ATTACKS = {
    "nan": lambda r: _arrays(r, _set("fc.weight", (0, 0), math.nan)),
    "inf": lambda r: _arrays(r, _set("conv.bias", (1,), math.inf)),
    "huge_1e30": lambda r: _arrays(r, _set("fc.weight", (2, 3), 1e30)),
    "broadcast_shape_1": lambda r: _arrays(r, lambda a: a.update({"conv.bias": np.array([50.0], np.float32)})),
    "extra_key": lambda r: _arrays(r, lambda a: a.update({"probe": np.zeros(3, np.float32)})),
    "missing_key": lambda r: _arrays(r, lambda a: a.pop("conv.bias")),
    "wrong_dtype": lambda r: _arrays(r, lambda a: a.update({"fc.weight": a["fc.weight"].astype(np.float64)})),
    "num_examples_1e9": lambda r: _metrics(r, **{keys.NUM_EXAMPLES: 10**9}),
    "num_examples_0": lambda r: _metrics(r, **{keys.NUM_EXAMPLES: 0}),
    "num_examples_negative": lambda r: _metrics(r, **{keys.NUM_EXAMPLES: -80}),
    "another_sites_id": lambda r: _metrics(r, **{keys.SITE_ID: 0}),
    "fake_epsilon_negative": lambda r: _metrics(r, **{keys.EPSILON: -1.0}),
    "fake_epsilon_backwards": lambda r: _metrics(r, **{keys.EPSILON: 0.1}),  # it reported 0.5 in round 1
    "fake_epsilon_nan": lambda r: _metrics(r, **{keys.EPSILON: math.nan}),
    "unknown_metric": lambda r: _metrics(r, **{"labels-seen": 3}),
}


def run_round(strategy: FedSSLAvg, current: dict[str, np.ndarray], server_round: int, attack=None):
    instructions = strategy.configure_train(server_round, ArrayRecord({k: Array(v) for k, v in current.items()}),
                                            ConfigRecord({}), NodeList())
    replies = []
    for instruction in instructions:
        node = instruction.metadata.dst_node_id
        reply = honest_reply(instruction, NODES[node], server_round)
        if node == MALICIOUS and attack is not None:
            attack(reply)
        replies.append(reply)
    return strategy.aggregate_train(server_round, replies)


def honest_fedavg(current: dict[str, np.ndarray], server_round: int) -> dict[str, np.ndarray]:
    sites = [s for n, s in NODES.items() if n != MALICIOUS]
    total = sum(EXAMPLES[s] for s in sites)
    out = {}
    for name in current:
        out[name] = sum(EXAMPLES[s] / total * honest_arrays(current, s, server_round)[name].astype(np.float64) for s in sites)
    return out


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_malformed_or_lying_reply_is_dropped_and_the_round_is_the_honest_average(tmp_path: Path, attack: str) -> None:
    strategy = FedSSLAvg(recorder=RoundRecorder(run_log=RunLog(tmp_path), server_ledger=ServerLedger(RunDir(tmp_path).server_ledger),
                                                num_rounds=2), min_train_nodes=2, min_available_nodes=2)
    model = global_model()
    arrays, _ = run_round(strategy, model, 1)
    model = {k: a.numpy() for k, a in arrays.items()}

    arrays, metrics = run_round(strategy, model, 2, ATTACKS[attack])  # must not raise

    assert arrays is not None, "the round must complete on the honest replies"
    got = {k: a.numpy() for k, a in arrays.items()}
    expected = honest_fedavg(model, 2)
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name].shape == value.shape and got[name].dtype == np.float32
        assert np.all(np.isfinite(got[name]))
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    assert metrics[keys.NUM_EXAMPLES] == sum(EXAMPLES[s] for n, s in NODES.items() if n != MALICIOUS)

    sites, _ = read_metrics(RunDir(tmp_path).metrics)
    dropped = [r for r in sites if r.round == 2 and r.node_id == MALICIOUS]
    assert len(dropped) == 1 and dropped[0].status == "failed" and "dropped" in dropped[0].reason, dropped
    ledger = ServerLedger(RunDir(tmp_path).server_ledger).records()
    drops = [r["body"] for r in ledger if r["kind"] == "reply_dropped"]
    assert [(d["round"], d["node_id"]) for d in drops] == [(2, MALICIOUS)] and drops[0]["reason"]
    # Nothing of the dropped reply is recorded as the site's report: its ε and id claims are not facts.
    reports = [b for b in ServerLedger(RunDir(tmp_path).server_ledger).round_reports() if b["round"] == 2]
    assert sorted(b["node_id"] for b in reports) == [101, 102, 103]


def test_two_unbound_nodes_claiming_one_site_are_both_dropped(tmp_path: Path) -> None:
    """Without a binding yet, the server cannot tell which claimant is the site: it binds neither."""
    strategy = FedSSLAvg(recorder=RoundRecorder(run_log=RunLog(tmp_path), server_ledger=ServerLedger(RunDir(tmp_path).server_ledger),
                                                num_rounds=1), min_train_nodes=2, min_available_nodes=2)
    arrays, _ = run_round(strategy, global_model(), 1, ATTACKS["another_sites_id"])
    assert arrays is not None
    sites, _ = read_metrics(RunDir(tmp_path).metrics)
    assert sorted(r.node_id for r in sites if r.status == "failed") == [101, MALICIOUS]
    assert sorted(r.node_id for r in sites if r.status == "trained") == [102, 103]


def test_too_few_valid_replies_fail_the_round_and_keep_the_model(tmp_path: Path, caplog) -> None:
    strategy = FedSSLAvg(recorder=RoundRecorder(run_log=RunLog(tmp_path), server_ledger=ServerLedger(RunDir(tmp_path).server_ledger),
                                                num_rounds=1), min_train_nodes=4, min_available_nodes=4)
    with caplog.at_level("INFO", logger="flwr"):
        arrays, metrics = run_round(strategy, global_model(), 1, ATTACKS["nan"])
    assert arrays is None and metrics is None  # Flower keeps the previous global model
    assert "round 1 failed: 3 valid repl(ies), federation.min_sites needs 4" in caplog.text
    _, rounds = read_metrics(RunDir(tmp_path).metrics)
    assert [(r.num_sites, r.num_trained) for r in rounds] == [(3, 3)]


@pytest.mark.parametrize("attack", ["broadcast_shape_1", "missing_key", "nan"])
def test_server_side_site_dp_drops_malformed_arrays_before_flowers_clipping_touches_them(tmp_path: Path, attack: str) -> None:
    """Flower's server-side clipping wrapper computes on every reply's arrays before fedssl's strategy sees them."""
    from fedssl.config import load_config
    from server.site_dp import SiteLevelBook, message_strategy

    root = Path(__file__).resolve().parents[2]
    config = load_config(root / "configs" / "experiments" / "digits-tiny.yaml", [
        "federation.num_sites=4", "site_dp.enabled=true", "site_dp.side=server", "site_dp.noise_multiplier=0.01", "site_dp.clipping_norm=1.0"])
    recorder = RoundRecorder(run_log=RunLog(tmp_path), server_ledger=ServerLedger(RunDir(tmp_path).server_ledger), num_rounds=1)
    strategy = message_strategy(config, SiteLevelBook(config, tmp_path), recorder=recorder, fraction_train=1.0, fraction_evaluate=0.0,
                                min_train_nodes=2, min_available_nodes=2)
    arrays, _ = run_round(strategy, global_model(), 1, ATTACKS[attack])  # must not raise
    assert arrays is not None and all(np.all(np.isfinite(a.numpy())) for a in arrays.values())
    sites, _ = read_metrics(RunDir(tmp_path).metrics)
    assert [r.node_id for r in sites if r.status == "failed"] == [MALICIOUS]


# ----------------------------------------------------------------- slow: a real federation with one malicious ClientApp


@pytest.mark.slow
def test_a_malicious_client_app_in_a_real_federation_is_dropped_and_the_run_completes(tmp_path: Path, monkeypatch) -> None:
    """`flwr run` of the production apps, 3 sites, DP on; site 2's ClientApp replaces its round-2 weights with 1e30."""
    from flower_tap import Tap, run_tapped, weighted_mean

    from fedssl.config import load_config

    root = Path(__file__).resolve().parents[2]
    config = load_config(root / "configs" / "experiments" / "digits-tiny.yaml", ["federation.num_sites=3", "run.name=poisoned"])
    run_dir, tap_dir = run_tapped(config, tmp_path, monkeypatch, poison={(2, 2): 1e30})
    tap = Tap.load(tap_dir)

    final = {k: v.numpy() for k, v in torch.load(RunDir(run_dir).final_encoder).items()}
    assert all(np.all(np.isfinite(v)) for v in final.values())
    honest = [tap.sites[(2, s)] for s in (0, 1)]
    expected = weighted_mean([s["trained"] for s in honest], [s["num_examples"] for s in honest])
    for name, value in expected.items():
        np.testing.assert_allclose(final[name], value, rtol=1e-5, atol=1e-6, err_msg=name)

    sites, rounds = read_metrics(RunDir(run_dir).metrics)
    dropped = [r for r in sites if r.status == "failed"]
    assert [(r.round, r.last_site_id) for r in dropped] == [(2, 2)] and "update norm" in dropped[0].reason
    assert [r.num_trained for r in rounds] == [3, 2]
    ledger = ServerLedger(RunDir(run_dir).server_ledger).records()
    assert [(r["body"]["round"]) for r in ledger if r["kind"] == "reply_dropped"] == [2]
