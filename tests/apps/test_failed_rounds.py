"""A round where every sampled site failed stops the run with the first site's error in one line;
a round where some failed goes on and lists each failure by site. Real Flower messages, the real strategy."""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp.grid import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedssl.fl import keys
from fedssl.layout import RunDir
from fedssl.privacy.ledger import ServerLedger
from fedssl.runlog import RunLog, read_metrics
from server.strategy import AllSitesFailed, FedSSLAvg, RoundRecorder, error_line, loss_phrase

SERVER_NODE = 1
# What Flower's simulation engine puts in a failed reply (flwr/server/superlink/fleet/vce/vce_api.py), with a
# site that named itself (clients/client_app.py).
FLOWER_REASON = ("<class 'flwr.clientapp.client_app.ClientAppException'>:<'\nException ClientAppException occurred. "
                 "Message: site {site}: data.source: sample 'row-3' contains NaN or infinite values; clean or drop it'>")


def _instruction(node: int) -> Message:
    return Message(content=RecordDict({keys.CONFIG: ConfigRecord({"server-round": 1})}), metadata=Metadata(
        run_id=7, message_id=uuid.uuid4().hex, src_node_id=SERVER_NODE, dst_node_id=node, reply_to_message_id="",
        group_id="1", created_at=time.time(), ttl=3600.0, message_type="train"))


def failed(node: int, site: int) -> Message:
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=FLOWER_REASON.format(site=site)), reply_to=_instruction(node))


def trained(node: int, site: int, loss: float | None = 1.0) -> Message:
    """A trained site's reply; ``loss=None``: the site kept its pretext loss, as a site under DP does."""
    metrics = MetricRecord({
        keys.NUM_EXAMPLES: 10, keys.STATUS: keys.STATUS_CODES["trained"], keys.SITE_ID: site, keys.STEPS: 2,
        keys.EPSILON: 0.5, keys.TARGET_EPSILON: 8.0, keys.DELTA: 1e-5, keys.LEDGER_SEQ: 3, keys.DP_ENABLED: 1,
        **({} if loss is None else {keys.PRETEXT_LOSS: loss, keys.TRAIN_SECONDS: 0.1}),
    })
    content = RecordDict({keys.METRICS: metrics, keys.ARRAYS: ArrayRecord({"w": torch.full((3,), 1.0)})})
    return Message(content=content, reply_to=_instruction(node))


def _strategy(path: Path) -> FedSSLAvg:
    recorder = RoundRecorder(run_log=RunLog(path), server_ledger=ServerLedger(RunDir(path).server_ledger), num_rounds=3)
    return FedSSLAvg(recorder=recorder)


def test_flowers_wrapped_reason_becomes_the_sites_one_line():
    assert error_line(FLOWER_REASON.format(site=2)) == \
        "site 2: data.source: sample 'row-3' contains NaN or infinite values; clean or drop it"
    assert error_line("Traceback (most recent call last):\n  ...\nValueError: boom\n") == "ValueError: boom"


def test_a_round_where_every_sampled_site_failed_stops_the_run(tmp_path):
    with pytest.raises(AllSitesFailed) as raised:
        _strategy(tmp_path).aggregate_train(1, [failed(node=20, site=1), failed(node=10, site=0), failed(node=30, site=2)])
    message = str(raised.value)
    assert message == ("round 1: all 3 sampled sites failed; first error (site-0): "
                       "data.source: sample 'row-3' contains NaN or infinite values; clean or drop it")
    assert "\n" not in message
    site_rounds, rounds = read_metrics(RunDir(tmp_path).metrics)
    assert sorted((r.last_site_id, r.status) for r in site_rounds) == [(0, "failed"), (1, "failed"), (2, "failed")]
    assert [(r.round, r.num_trained) for r in rounds] == [(1, 0)]  # the round is on record before the run stops


def test_a_round_with_some_failures_goes_on_and_names_each_failed_site(tmp_path):
    arrays, _ = _strategy(tmp_path).aggregate_train(1, [trained(node=10, site=0), trained(node=11, site=1), failed(node=12, site=2)])
    assert arrays is not None
    site_rounds, _ = read_metrics(RunDir(tmp_path).metrics)
    (failure,) = [r for r in site_rounds if r.status == "failed"]
    assert (failure.last_site_id, failure.node_id) == (2, 12)
    assert failure.reason.startswith("data.source: sample 'row-3'")


def unreachable(node: int) -> Message:
    """What the SuperLink puts in for a node that stopped heartbeating (e.g. killed, restarting)."""
    return Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Error: Node Unavailable"), reply_to=_instruction(node))


def test_a_round_where_a_failed_site_was_only_unreachable_goes_on(tmp_path):
    # site 1 raised (e.g. refused the app) but node 30 just did not answer: it may rejoin next round
    arrays, _ = _strategy(tmp_path).aggregate_train(1, [failed(node=20, site=1), unreachable(node=30)])
    assert arrays is None
    site_rounds, rounds = read_metrics(RunDir(tmp_path).metrics)
    assert sorted(r.node_id for r in site_rounds if r.status == "failed") == [20, 30]
    assert [(r.round, r.num_trained) for r in rounds] == [(1, 0)]


class TwoNodes(Grid):
    """The grid a round samples from: two connected nodes (only what configure_train asks of a grid)."""

    def get_node_ids(self):
        return [20, 30]

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def pull_messages(self, *args, **kwargs):
        raise NotImplementedError

    def push_messages(self, *args, **kwargs):
        raise NotImplementedError

    def send_and_receive(self, *args, **kwargs):
        raise NotImplementedError

    def set_run(self, *args, **kwargs):
        raise NotImplementedError


@pytest.fixture
def serverapp_run():
    """What the ServerApp process has set before a strategy builds messages: the run it belongs to."""
    saved = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, SERVER_NODE, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def test_a_round_where_a_sampled_site_never_replied_goes_on_and_names_it(tmp_path, serverapp_run):
    # The deployment rejoin attack: site d refuses the app, site c is killed mid-round and its reply never
    # comes (Flower drops it at the round timeout). One failure out of one reply is not "every site failed".
    strategy = _strategy(tmp_path)
    sent = list(strategy.configure_train(1, ArrayRecord({"w": torch.zeros(3)}), ConfigRecord({}), TwoNodes()))
    assert sorted(m.metadata.dst_node_id for m in sent) == [20, 30]
    arrays, _ = strategy.aggregate_train(1, [failed(node=20, site=1)])
    assert arrays is None
    site_rounds, _ = read_metrics(RunDir(tmp_path).metrics)
    silent = [r for r in site_rounds if r.node_id == 30]
    assert [r.status for r in silent] == ["failed"] and "no reply within the round timeout" in silent[0].reason
    # every sampled site answered with its own error: that still stops the run
    sent = list(strategy.configure_train(2, ArrayRecord({"w": torch.zeros(3)}), ConfigRecord({}), TwoNodes()))
    with pytest.raises(AllSitesFailed, match="all 2 sampled sites failed"):
        strategy.aggregate_train(2, [failed(node=20, site=1), failed(node=30, site=0)])


@pytest.mark.parametrize(("losses", "said"), [
    ((None, None), "2/2 sites trained, pretext loss kept by the sites (DP), max site eps 0.500"),
    ((1.0, None), "2/2 sites trained, pretext loss 1.0000 (1 of 2 sites released it), max site eps 0.500"),
    ((1.0, 3.0), "2/2 sites trained, pretext loss 2.0000, max site eps 0.500"),
])
def test_the_round_line_says_who_kept_the_pretext_loss_instead_of_nan(tmp_path, losses, said):
    """Sites under DP keep their loss: the line a user watches must say so, not print "nan"."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("flwr").addHandler(handler)
    try:
        _strategy(tmp_path).aggregate_train(1, [trained(node=10 + i, site=i, loss=loss) for i, loss in enumerate(losses)])
    finally:
        logging.getLogger("flwr").removeHandler(handler)
    (line,) = [line for line in lines if line.startswith("fedssl: round 1/3")]
    assert said in line and "nan" not in line, line
    assert loss_phrase(released=0, trained=0, mean_loss=float("nan")) == "no pretext loss (no site trained)"
