"""The egress guard: only the encoder's arrays and whitelisted scalars may leave a site."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

from fedssl.fl import keys
from fedssl.fl.egress import EgressError, check_egress
from fedssl.fl.records import SiteReport
from fedssl.fl.site_reply import site_reply_records
from fedssl.models import build_encoder, encoder_state_keys
from fedssl.training.local import STATUS_REFUSED, STATUS_TRAINED, RoundResult

INPUT_SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def encoder():
    return build_encoder("cnn", INPUT_SHAPE, width=8, depth=2, seed=0)


@pytest.fixture(scope="module")
def expected(encoder):
    return encoder_state_keys(encoder)


def trained_result(encoder, **metrics) -> RoundResult:
    values = dict(status=STATUS_TRAINED, encoder_state=encoder.state_dict(), num_examples=40, steps=3, pretext_loss=1.2,
                  epsilon=2.5, target_epsilon=8.0, delta=1e-5, train_seconds=0.1, ledger_seq=2)
    values.update(metrics)
    return RoundResult(**values)


@pytest.fixture
def reply(encoder):
    """A valid trained reply, as the ClientApp builds it."""
    return site_reply_records(trained_result(encoder), site_id=3, dp_enabled=True)


def replace_metrics(reply: dict, **changes) -> dict:
    metrics = dict(reply[keys.METRICS])
    metrics.update(changes)
    return {**reply, keys.METRICS: MetricRecord(metrics)}


def replace_arrays(reply: dict, arrays: dict) -> dict:
    return {**reply, keys.ARRAYS: ArrayRecord(arrays)}  # a torch state dict, as the ClientApp sends


def encoder_arrays(encoder) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in encoder.state_dict().items()}


# ------------------------------------------------------------------ what may pass


def test_trained_reply_passes_and_holds_exactly_the_contract(reply, expected):
    check_egress(reply, expected, arrays_required=True)
    assert set(reply) == {keys.ARRAYS, keys.METRICS}
    assert {k: tuple(a.shape) for k, a in reply[keys.ARRAYS].items()} == expected
    assert set(reply[keys.METRICS]) <= keys.ALLOWED_METRICS
    assert reply[keys.METRICS][keys.STATUS] == keys.STATUS_CODES["trained"]


def test_refused_reply_has_no_arrays_and_passes(encoder, expected):
    refused = RoundResult(status=STATUS_REFUSED, encoder_state=None, num_examples=40, epsilon=7.9, target_epsilon=8.0, delta=1e-5)
    reply = site_reply_records(refused, site_id=1, dp_enabled=True)
    assert set(reply) == {keys.METRICS}
    check_egress(reply, expected, arrays_required=False)
    report = SiteReport.from_metrics(5, reply[keys.METRICS])
    assert (report.status, report.epsilon, report.site_id) == ("refused", 7.9, 1)
    assert math.isnan(report.pretext_loss)


def test_non_dp_reply_reads_as_infinite_epsilon_on_the_server(encoder, expected):
    reply = site_reply_records(trained_result(encoder, epsilon=math.inf, target_epsilon=math.inf, delta=0.0), site_id=0, dp_enabled=False)
    check_egress(reply, expected, arrays_required=True)
    assert SiteReport.from_metrics(1, reply[keys.METRICS]).epsilon == math.inf


# ------------------------------------------------------------------ what is refused


def test_extra_record_is_refused(reply, expected):
    with pytest.raises(EgressError, match="debug"):
        check_egress({**reply, "debug": ConfigRecord({"note": "hello"})}, expected, arrays_required=True)


def test_extra_array_such_as_a_head_weight_is_refused(reply, encoder, expected):
    arrays = encoder_arrays(encoder)
    arrays["head.weight"] = torch.zeros(4, 32)
    with pytest.raises(EgressError, match="head.weight"):
        check_egress(replace_arrays(reply, arrays), expected, arrays_required=True)


def test_opacus_prefixed_keys_are_refused(reply, encoder, expected):
    arrays = {f"_module.{k}": v for k, v in encoder_arrays(encoder).items()}
    with pytest.raises(EgressError, match="unexpected"):
        check_egress(replace_arrays(reply, arrays), expected, arrays_required=True)


def test_missing_array_is_refused(reply, encoder, expected):
    arrays = encoder_arrays(encoder)
    arrays.pop("features.0.bias")
    with pytest.raises(EgressError, match="features.0.bias"):
        check_egress(replace_arrays(reply, arrays), expected, arrays_required=True)


def test_wrong_shape_is_refused(reply, encoder, expected):
    arrays = encoder_arrays(encoder)
    arrays["features.0.weight"] = torch.zeros(64, 64)  # e.g. a batch of raw inputs
    with pytest.raises(EgressError, match="features.0.weight"):
        check_egress(replace_arrays(reply, arrays), expected, arrays_required=True)


def test_arrays_under_the_wrong_record_type_are_refused(reply, expected):
    with pytest.raises(EgressError, match="ArrayRecord"):
        check_egress({**reply, keys.ARRAYS: MetricRecord({"x": 1.0})}, expected, arrays_required=True)


def test_non_whitelisted_metric_is_refused(reply, expected):
    with pytest.raises(EgressError, match="per-sample-loss"):
        check_egress(replace_metrics(reply, **{"per-sample-loss": 0.5}), expected, arrays_required=True)


@pytest.mark.parametrize("value", [[1.0, 2.0], [3, 4]], ids=["floats", "ints"])
def test_list_valued_metric_is_refused(reply, expected, value):
    with pytest.raises(EgressError, match="one scalar"):
        check_egress(replace_metrics(reply, **{keys.PRETEXT_LOSS: value}), expected, arrays_required=True)


def test_nan_epsilon_is_refused(reply, expected):
    with pytest.raises(EgressError, match="NaN"):
        check_egress(replace_metrics(reply, **{keys.EPSILON: math.nan}), expected, arrays_required=True)


def test_trained_reply_without_arrays_is_refused(reply, expected):
    with pytest.raises(EgressError, match="encoder arrays"):
        check_egress({keys.METRICS: reply[keys.METRICS]}, expected, arrays_required=True)


def test_reply_without_metrics_is_refused(reply, expected):
    with pytest.raises(EgressError, match="metrics"):
        check_egress({keys.ARRAYS: reply[keys.ARRAYS]}, expected, arrays_required=True)
