"""The SecAgg+ path stops like the plain one when every sampled site failed (Flower's legacy fit failures)."""

from __future__ import annotations

import pytest

from fedssl.fl.plan import TrainPlan
from fedssl.layout import RunDir
from fedssl.privacy.ledger import ServerLedger
from fedssl.runlog import RunLog, read_metrics
from server.secagg_app import SecAggFedSSL
from server.strategy import AllSitesFailed, RoundRecorder


def _strategy(path) -> SecAggFedSSL:
    recorder = RoundRecorder(run_log=RunLog(path), server_ledger=ServerLedger(RunDir(path).server_ledger), num_rounds=2)
    plan = TrainPlan(run_id="r", server_round=1, planned_rounds=2, pretext="rotation", encoder="cnn", width=8, depth=2,
                     local_steps=1, batch_size=4, lr=0.05)
    return SecAggFedSSL(names=["w"], recorder=recorder, plan=plan, weighting="examples", max_weight=1000.0,
                        checkpoint=lambda server_round, state: None, fraction_fit=1.0, min_fit_clients=2,
                        min_available_clients=2)


def test_a_secure_round_where_every_site_failed_stops_the_run(tmp_path):
    failures = [RuntimeError("site 1: data.source: unreadable"), RuntimeError("site 0: data.source: unreadable")]
    with pytest.raises(AllSitesFailed, match=r"^round 1: all 2 sampled sites failed; first error \(node -1\): "):
        _strategy(tmp_path).aggregate_fit(1, [], failures)
    _, rounds = read_metrics(RunDir(tmp_path).metrics)
    assert [(r.round, r.num_trained) for r in rounds] == [(1, 0)]


def test_a_secure_round_without_replies_is_not_a_failure(tmp_path):
    assert _strategy(tmp_path).aggregate_fit(1, [], []) == (None, {})  # e.g. the site-level DP book skipped the round


def test_a_secure_round_with_an_unreachable_site_goes_on(tmp_path):
    from flwr.app import Error
    from flwr.common.constant import ErrorCode

    failures = [RuntimeError("site 1: app refused"), Exception(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Node Unavailable"))]
    assert _strategy(tmp_path).aggregate_fit(1, [], failures) == (None, {})  # the unreachable site may rejoin
