"""Attack: a site rolls its state dir back between runs, so its ledger seq and ε go backwards.

Locally a rollback of both ledger files is consistent (fedssl.privacy.ledger says so); only an
external record can see it. The coordinator keeps each site's last (ledger seq, ε) in its state
dir across runs (server/guard.py) and refuses a reply that goes backwards. Built with the
ServerApp's own recorder and strategy factories; each "run" is a new run dir and new node ids
under one coordinator state dir, as two `fedssl server start` runs of one deployment are.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fedssl.config import load_config
from fedssl.fl import keys
from fedssl.fl.records import RoundResult
from site_replies import dp_reply_records
from fedssl.layout import RunDir
from fedssl.runlog import read_metrics

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "experiments" / "digits-tiny.yaml"


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch):
    """The identity Flower's ServerApp runtime sets before a strategy builds its instructions."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 7), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


class Nodes:
    def __init__(self, ids):
        self.ids = list(ids)

    def get_node_ids(self):
        return self.ids


MODEL = {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), "b": np.zeros(3, np.float32)}


def reply(instruction: Message, site: int, seq: int, epsilon: float, refused: bool = False) -> Message:
    current = {k: a.numpy() for k, a in instruction.content[keys.ARRAYS].items()}
    trained = None if refused else {k: torch.from_numpy(v + 0.01 * (site + 1)) for k, v in current.items()}
    result = RoundResult(status=keys.STATUS_REFUSED if refused else keys.STATUS_TRAINED, encoder_state=trained, num_examples=50,
                         steps=3, epsilon=epsilon, target_epsilon=8.0, delta=1e-5, ledger_seq=-1 if refused else seq)
    return Message(content=RecordDict(dp_reply_records(result, site)), reply_to=instruction)


def one_run(tmp_path: Path, name: str, state: Path, nodes: dict[int, int], claims: dict[int, tuple]):
    """One run of ``nodes`` (node id -> site id), one round; ``claims``: site -> (seq, ε[, refused])."""
    from server.server_app import round_recorder
    from server.site_dp import message_strategy

    config = load_config(TINY, ["federation.num_sites=2", "federation.min_sites=1"])
    run_dir = RunDir(tmp_path / name)
    strategy = message_strategy(config, None, recorder=round_recorder(config, run_dir, state), fraction_train=1.0,
                                fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1)
    instructions = strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in MODEL.items()}), ConfigRecord({}), Nodes(nodes))
    replies = [reply(i, nodes[i.metadata.dst_node_id], *claims[nodes[i.metadata.dst_node_id]]) for i in instructions]
    arrays, _ = strategy.aggregate_train(1, replies)
    sites, _ = read_metrics(run_dir.metrics)
    return arrays, {r.node_id: r for r in sites}


@pytest.mark.parametrize("rollback", [(5, 1.0), (20, 1.0), (30, 0.4)], ids=["seq_and_eps_back", "same_seq_replayed", "eps_back"])
def test_a_site_whose_ledger_went_backwards_between_runs_is_refused(tmp_path: Path, rollback) -> None:
    state = tmp_path / "coordinator"
    _, first = one_run(tmp_path, "run-1", state, {11: 0, 12: 1}, {0: (20, 1.0), 1: (21, 1.1)})
    assert {r.status for r in first.values()} == {"trained"}

    arrays, second = one_run(tmp_path, "run-2", state, {31: 0, 32: 1}, {0: rollback, 1: (40, 2.0)})
    assert second[31].status == "failed" and "dropped" in second[31].reason and "site 0" in second[31].reason
    assert second[32].status == "trained"
    # Only site 1 trained: the new model is its weights.
    np.testing.assert_allclose(arrays["w"].numpy(), MODEL["w"] + 0.02, rtol=1e-6)


def test_a_refused_reply_whose_epsilon_went_backwards_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "coordinator"
    one_run(tmp_path, "run-1", state, {11: 0, 12: 1}, {0: (20, 3.0), 1: (21, 1.1)})
    _, second = one_run(tmp_path, "run-2", state, {31: 0, 32: 1}, {0: (-1, 0.0, True), 1: (40, 2.0)})
    assert second[31].status == "failed" and "epsilon" in second[31].reason


def test_a_site_that_moves_forward_is_accepted_across_runs(tmp_path: Path) -> None:
    state = tmp_path / "coordinator"
    one_run(tmp_path, "run-1", state, {11: 0, 12: 1}, {0: (20, 1.0), 1: (21, 1.1)})
    _, second = one_run(tmp_path, "run-2", state, {31: 0, 32: 1}, {0: (22, 1.2), 1: (40, 2.0)})
    assert {r.status for r in second.values()} == {"trained"}


def test_the_coordinator_signs_its_ledger_with_one_key_across_runs_and_the_audit_checks_it(tmp_path: Path) -> None:
    from fedssl.audit.ledgers import UNSIGNED_SERVER_LEDGER, audit_path
    from fedssl.privacy.ledger import ServerLedger

    state = tmp_path / "coordinator"
    one_run(tmp_path, "run-1", state, {11: 0, 12: 1}, {0: (20, 1.0), 1: (21, 1.1)})
    one_run(tmp_path, "run-2", state, {31: 0, 32: 1}, {0: (22, 1.2), 1: (40, 2.0)})
    signers = {r["signer"] for name in ("run-1", "run-2") for r in ServerLedger(RunDir(tmp_path / name).server_ledger).records()}
    assert len(signers) == 1 and None not in signers
    keys_dir = tmp_path / "trusted"
    keys_dir.mkdir()
    (keys_dir / "server.ed25519.pub").write_bytes((state / "server.ed25519.pub").read_bytes())
    ledger = RunDir(tmp_path / "run-2").server_ledger
    assert audit_path(ledger.parent, server_ledger=ledger, trusted_keys_dir=keys_dir).server.ok

    # A forger rewrites the server's record without the key: the audit fails it.
    forged = tmp_path / "forged" / "server_ledger.jsonl"
    ServerLedger(forged).append("round_report", {"round": 1, "node_id": 31, "site_id": 0, "epsilon": 0.1, "ledger_seq": 2,
                                                 "status": "trained", "aggregation": "fedavg"})
    report = audit_path(forged.parent, server_ledger=forged)
    assert UNSIGNED_SERVER_LEDGER in {f.kind for f in report.server.findings}


def test_a_damaged_record_of_site_budgets_stops_the_coordinator_instead_of_forgetting(tmp_path: Path) -> None:
    """Starting over on a damaged file would accept every rolled-back site: refuse, in one line naming the file."""
    from fedssl.errors import ConfigError
    from fedssl.privacy.watermarks import WATERMARKS_FILE, SiteWatermarks

    state = tmp_path / "coordinator"
    one_run(tmp_path, "run-1", state, {11: 0, 12: 1}, {0: (20, 1.0), 1: (21, 1.1)})
    (state / WATERMARKS_FILE).write_text('{"sites": {"0": {"ledger_seq": "twenty"}}}')
    with pytest.raises(ConfigError, match=f"{WATERMARKS_FILE}: unreadable coordinator record") as err:
        SiteWatermarks(state / WATERMARKS_FILE)
    assert "\n" not in str(err.value)


def test_the_coordinator_hands_its_state_dir_to_the_server_app(tmp_path: Path) -> None:
    from fedssl.fl.keys import RUN_COORDINATOR_DIR
    from fedssl.run.flower_runtime import run_config

    assert f"{RUN_COORDINATOR_DIR}='{tmp_path / 'state'}'" in run_config(tmp_path / "run", tmp_path / "state")
    assert RUN_COORDINATOR_DIR not in run_config(tmp_path / "run")
