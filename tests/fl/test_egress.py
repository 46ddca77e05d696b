"""The egress guard: only the encoder's arrays and whitelisted scalars may leave a site; under DP only
the data-independent scalars (keys.DP_RELEASED_METRICS)."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

from fedssl.fl import keys
from fedssl.fl.egress import EgressError, check_egress
from fedssl.fl.records import SiteReport
from fedssl.fl.plan import TrainPlan
from fedssl.fl.site_reply import site_reply_records
from fedssl.models import build_encoder, encoder_state_keys
from fedssl.training.local import STATUS_REFUSED, STATUS_TRAINED, RoundResult

INPUT_SHAPE = (1, 8, 8)
PLAN = TrainPlan(run_id="t", server_round=1, planned_rounds=2, pretext="rotation", encoder="cnn", width=8, depth=2,
                 local_steps=3, batch_size=16, lr=0.1)
DP_WEIGHT = 48  # the plan's batch size x local steps: what a DP site releases instead of its 40 examples


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
    return site_reply_records(trained_result(encoder), site_id=3, dp_enabled=True, plan=PLAN)


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
    check_egress(reply, expected, arrays_required=True, dp_num_examples=DP_WEIGHT)
    assert set(reply) == {keys.ARRAYS, keys.METRICS}
    assert {k: tuple(a.shape) for k, a in reply[keys.ARRAYS].items()} == expected
    assert set(reply[keys.METRICS]) <= keys.ALLOWED_METRICS
    assert reply[keys.METRICS][keys.STATUS] == keys.STATUS_CODES["trained"]


def test_refused_reply_has_no_arrays_and_passes(encoder, expected):
    refused = RoundResult(status=STATUS_REFUSED, encoder_state=None, num_examples=40, epsilon=7.9, target_epsilon=8.0, delta=1e-5)
    reply = site_reply_records(refused, site_id=1, dp_enabled=True, plan=PLAN)
    assert set(reply) == {keys.METRICS}
    check_egress(reply, expected, arrays_required=False, dp_num_examples=DP_WEIGHT)
    report = SiteReport.from_metrics(5, reply[keys.METRICS])
    assert (report.status, report.epsilon, report.site_id) == ("refused", 7.9, 1)
    assert math.isnan(report.pretext_loss)


def test_non_dp_reply_reads_as_infinite_epsilon_on_the_server(encoder, expected):
    reply = site_reply_records(trained_result(encoder, epsilon=math.inf, target_epsilon=math.inf, delta=0.0), site_id=0, dp_enabled=False, plan=PLAN)
    check_egress(reply, expected, arrays_required=True, dp_num_examples=None)
    report = SiteReport.from_metrics(1, reply[keys.METRICS])
    assert report.epsilon == math.inf
    # Without DP there is no guarantee to keep inside: the site's exact figures may travel.
    assert (report.num_examples, report.pretext_loss, report.train_seconds) == (40, 1.2, 0.1)


# ------------------------------------------------------------------ what is refused


def test_extra_record_is_refused(reply, expected):
    with pytest.raises(EgressError, match="debug"):
        check_egress({**reply, "debug": ConfigRecord({"note": "hello"})}, expected, arrays_required=True, dp_num_examples=DP_WEIGHT)


def test_extra_array_such_as_a_head_weight_is_refused(reply, encoder, expected):
    arrays = encoder_arrays(encoder)
    arrays["head.weight"] = torch.zeros(4, 32)
    with pytest.raises(EgressError, match="head.weight"):
        check_egress(replace_arrays(reply, arrays), expected, arrays_required=True, dp_num_examples=DP_WEIGHT)


def test_opacus_prefixed_keys_are_refused(reply, encoder, expected):
    arrays = {f"_module.{k}": v for k, v in encoder_arrays(encoder).items()}
    with pytest.raises(EgressError, match="unexpected"):
        check_egress(replace_arrays(reply, arrays), expected, arrays_required=True, dp_num_examples=DP_WEIGHT)


def test_missing_array_is_refused(reply, encoder, expected):
    arrays = encoder_arrays(encoder)
    arrays.pop("features.0.bias")
    with pytest.raises(EgressError, match="features.0.bias"):
        check_egress(replace_arrays(reply, arrays), expected, arrays_required=True, dp_num_examples=DP_WEIGHT)


def test_wrong_shape_is_refused(reply, encoder, expected):
    arrays = encoder_arrays(encoder)
    arrays["features.0.weight"] = torch.zeros(64, 64)  # e.g. a batch of raw inputs
    with pytest.raises(EgressError, match="features.0.weight"):
        check_egress(replace_arrays(reply, arrays), expected, arrays_required=True, dp_num_examples=DP_WEIGHT)


def test_arrays_under_the_wrong_record_type_are_refused(reply, expected):
    with pytest.raises(EgressError, match="ArrayRecord"):
        check_egress({**reply, keys.ARRAYS: MetricRecord({"x": 1.0})}, expected, arrays_required=True, dp_num_examples=DP_WEIGHT)


def test_non_whitelisted_metric_is_refused(reply, expected):
    with pytest.raises(EgressError, match="per-sample-loss"):
        check_egress(replace_metrics(reply, **{"per-sample-loss": 0.5}), expected, arrays_required=True, dp_num_examples=DP_WEIGHT)


@pytest.mark.parametrize("value", [[1.0, 2.0], [3, 4]], ids=["floats", "ints"])
def test_list_valued_metric_is_refused(reply, expected, value):
    with pytest.raises(EgressError, match="one scalar"):
        check_egress(replace_metrics(reply, **{keys.PRETEXT_LOSS: value}), expected, arrays_required=True, dp_num_examples=DP_WEIGHT)


def test_nan_epsilon_is_refused(reply, expected):
    with pytest.raises(EgressError, match="NaN"):
        check_egress(replace_metrics(reply, **{keys.EPSILON: math.nan}), expected, arrays_required=True, dp_num_examples=DP_WEIGHT)


def test_trained_reply_without_arrays_is_refused(reply, expected):
    with pytest.raises(EgressError, match="encoder arrays"):
        check_egress({keys.METRICS: reply[keys.METRICS]}, expected, arrays_required=True, dp_num_examples=DP_WEIGHT)


def test_reply_without_metrics_is_refused(reply, expected):
    with pytest.raises(EgressError, match="metrics"):
        check_egress({keys.ARRAYS: reply[keys.ARRAYS]}, expected, arrays_required=True, dp_num_examples=DP_WEIGHT)


# ------------------------------------------------------------------ under DP: only data-independent values


def test_dp_reply_holds_only_data_independent_metrics(reply):
    metrics = reply[keys.METRICS]
    assert set(metrics) == keys.DP_RELEASED_METRICS
    assert keys.PRETEXT_LOSS not in metrics and keys.TRAIN_SECONDS not in metrics
    assert metrics[keys.NUM_EXAMPLES] == DP_WEIGHT  # not the site's 40 examples
    report = SiteReport.from_metrics(5, metrics)  # the server reads a DP reply without them
    assert math.isnan(report.pretext_loss) and math.isnan(report.train_seconds) and report.num_examples == DP_WEIGHT


@pytest.mark.parametrize("name, value", [(keys.PRETEXT_LOSS, 1.2), (keys.TRAIN_SECONDS, 0.1), (keys.PRETEXT_LOSS, math.nan)])
def test_under_dp_a_metric_computed_from_the_data_is_refused(reply, expected, name, value):
    with pytest.raises(EgressError, match=f"under DP.*{name}.*without noise"):
        check_egress(replace_metrics(reply, **{name: value}), expected, arrays_required=True, dp_num_examples=DP_WEIGHT)


def test_under_dp_the_exact_example_count_is_refused(reply, expected):
    with pytest.raises(EgressError, match="num-examples.*48") as refused:
        check_egress(replace_metrics(reply, **{keys.NUM_EXAMPLES: 40}), expected, arrays_required=True, dp_num_examples=DP_WEIGHT)
    # Flower sends a ClientApp's exception text to the server: the refusal must not carry the count itself.
    assert "40" not in str(refused.value)


@pytest.mark.parametrize("name", [keys.PRETEXT_LOSS, keys.TRAIN_SECONDS])
def test_under_dp_a_refusal_names_the_metric_never_its_value(reply, expected, name):
    with pytest.raises(EgressError) as refused:
        check_egress(replace_metrics(reply, **{name: 1.23456}), expected, arrays_required=True, dp_num_examples=DP_WEIGHT)
    assert name in str(refused.value) and "1.23456" not in str(refused.value)


def test_the_dp_flag_must_say_what_the_site_does(reply, encoder, expected):
    with pytest.raises(EgressError, match="dp-enabled.*must be 0"):
        check_egress(reply, expected, arrays_required=True, dp_num_examples=None)
    plain = site_reply_records(trained_result(encoder), site_id=0, dp_enabled=False, plan=PLAN)
    with pytest.raises(EgressError, match="dp-enabled.*must be 1"):
        check_egress(plain, expected, arrays_required=True, dp_num_examples=DP_WEIGHT)
