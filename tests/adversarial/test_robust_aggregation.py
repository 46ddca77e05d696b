"""Robust aggregation: Flower's FedMedian / FedTrimmedAvg composed with fedssl's validation and recorder.

A reference test against a direct NumPy computation, and the attack: one poisoned site (a valid,
finite, in-bound update, so validation lets it through) cannot move the median.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedssl.config import load_config
from fedssl.errors import ConfigError
from fedssl.fl import keys
from fedssl.fl.records import RoundResult
from site_replies import dp_reply_records
from fedssl.layout import RunDir
from fedssl.privacy.ledger import ServerLedger
from fedssl.runlog import RunLog

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "experiments" / "digits-tiny.yaml"
MODEL = {"w": np.ones((5, 4), np.float32), "b": np.ones(5, np.float32)}  # norm 5: the update bound is 50


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 7), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


class Nodes:
    def __init__(self, n: int):
        self.ids = list(range(1, n + 1))

    def get_node_ids(self):
        return self.ids


def strategy(tmp_path: Path, name: str, *overrides: str):
    from server.site_dp import message_strategy
    from server.strategy import RoundRecorder

    config = load_config(TINY, ["federation.num_sites=5", f"federation.strategy={name}", *overrides])
    recorder = RoundRecorder(run_log=RunLog(tmp_path), server_ledger=ServerLedger(RunDir(tmp_path).server_ledger), num_rounds=1)
    return message_strategy(config, None, recorder=recorder, fraction_train=1.0, fraction_evaluate=0.0,
                            min_train_nodes=2, min_available_nodes=2)


def site_states(n: int, poison: float | None = None) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    states = [{k: (v + rng.normal(scale=0.1, size=v.shape)).astype(np.float32) for k, v in MODEL.items()} for _ in range(n)]
    if poison is not None:  # the last site pushes every coordinate far one way (within the norm bound)
        states[-1] = {k: np.full_like(v, poison) for k, v in MODEL.items()}
    return states


def aggregate(strat, states: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    instructions = list(strat.configure_train(1, ArrayRecord({k: Array(v) for k, v in MODEL.items()}), ConfigRecord({}), Nodes(len(states))))
    replies = []
    for instruction in instructions:
        site = instruction.metadata.dst_node_id - 1
        result = RoundResult(status=keys.STATUS_TRAINED, encoder_state={k: torch.from_numpy(v) for k, v in states[site].items()},
                             num_examples=10 * (site + 1), steps=2, epsilon=1.0, target_epsilon=8.0, delta=1e-5, ledger_seq=4)
        replies.append(Message(content=RecordDict(dp_reply_records(result, site)), reply_to=instruction))
    arrays, _ = strat.aggregate_train(1, replies)
    return {k: a.numpy() for k, a in arrays.items()}


def test_median_and_trimmed_mean_match_numpy(tmp_path: Path) -> None:
    states = site_states(5)
    median = aggregate(strategy(tmp_path / "m", "fedmedian"), states)
    trimmed = aggregate(strategy(tmp_path / "t", "fedtrimmedavg", "federation.trim_fraction=0.2"), states)
    for name in MODEL:
        stacked = np.stack([s[name] for s in states]).astype(np.float64)
        np.testing.assert_allclose(median[name], np.median(stacked, axis=0), rtol=1e-6)
        ordered = np.sort(stacked, axis=0)[1:-1]  # int(0.2 * 5) = 1 cut from each tail
        np.testing.assert_allclose(trimmed[name], ordered.mean(axis=0), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg"])
def test_one_poisoned_site_cannot_move_the_robust_aggregate_outside_the_honest_range(tmp_path: Path, name: str) -> None:
    honest = site_states(5)[:4]
    poisoned = site_states(5, poison=9.0)
    robust = aggregate(strategy(tmp_path / "r", name), poisoned)
    fedavg = aggregate(strategy(tmp_path / "a", "fedavg"), poisoned)
    for key in MODEL:
        stacked = np.stack([s[key] for s in honest])
        low, high = stacked.min(axis=0), stacked.max(axis=0)
        assert np.all((robust[key] >= low - 1e-6) & (robust[key] <= high + 1e-6)), key
    # ... while FedAvg follows the poison (the largest weight is the poisoner's, and its update is within the norm bound).
    assert np.all(fedavg["w"] > 3.0)


def test_robust_strategies_are_refused_where_the_server_sees_no_individual_update() -> None:
    with pytest.raises(ConfigError, match="federation.strategy"):
        load_config(TINY, ["federation.num_sites=3", "federation.strategy=fedmedian", "secure_aggregation.enabled=true"])
    with pytest.raises(ConfigError, match="federation.strategy: .*valid choices: fedavg, fedmedian, fedtrimmedavg"):
        load_config(TINY, ["federation.strategy=krum"])
