"""The site's egress guard: the last check before a reply leaves the site.

A reply may hold the encoder's arrays (exactly its parameter names and shapes) and
whitelisted scalar metrics. Anything else — extra arrays (heads, predictors, data),
strings, per-sample vectors — is refused. Under DP the metrics are narrowed to the
data-independent ones (keys.DP_RELEASED_METRICS), so nothing leaves outside the guarantee.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from fedssl.errors import FedSSLError
from fedssl.fl import keys


class EgressError(FedSSLError):
    """A reply would carry something the privacy contract does not allow out."""


def check_egress(
    records: Mapping[str, object],
    expected_shapes: Mapping[str, tuple[int, ...]],
    arrays_required: bool,
    *,
    dp_num_examples: int | None,
) -> None:
    """``records`` maps record names to Flower records (ArrayRecord / MetricRecord).

    ``dp_num_examples`` is None for a site without DP; under DP it is the data-independent weight
    the site may release (fl.site_reply.released_num_examples), and only keys.DP_RELEASED_METRICS
    may leave: anything computed from the data without noise is refused.
    """
    allowed = {keys.ARRAYS, keys.METRICS}
    extra = sorted(set(records) - allowed)
    if extra:
        raise EgressError(f"egress refused: reply holds record(s) {extra}; only {sorted(allowed)} may leave a site")
    _check_arrays(records.get(keys.ARRAYS), expected_shapes, arrays_required)
    _check_metrics(records.get(keys.METRICS), dp_num_examples)


def _check_arrays(arrays: object, expected_shapes: Mapping[str, tuple[int, ...]], arrays_required: bool) -> None:
    from flwr.app import ArrayRecord

    if arrays is None:
        if arrays_required:
            raise EgressError("egress refused: a trained reply must carry the encoder arrays")
        return
    if not isinstance(arrays, ArrayRecord):
        raise EgressError(f"egress refused: {keys.ARRAYS!r} must be an ArrayRecord, got {type(arrays).__name__}")
    got = {name: tuple(arr.shape) for name, arr in arrays.items()}
    if set(got) != set(expected_shapes):
        unexpected = sorted(set(got) - set(expected_shapes))
        missing = sorted(set(expected_shapes) - set(got))
        raise EgressError(f"egress refused: arrays must be exactly the encoder's keys (unexpected {unexpected}, missing {missing})")
    wrong = [k for k, shape in got.items() if tuple(expected_shapes[k]) != shape]
    if wrong:
        raise EgressError(f"egress refused: array {wrong[0]!r} has shape {got[wrong[0]]}, encoder expects {expected_shapes[wrong[0]]}")


def _check_metrics(metrics: object, dp_num_examples: int | None) -> None:
    from flwr.app import MetricRecord

    if metrics is None:
        raise EgressError("egress refused: reply must carry its metrics record")
    if not isinstance(metrics, MetricRecord):
        raise EgressError(f"egress refused: {keys.METRICS!r} must be a MetricRecord, got {type(metrics).__name__}")
    for name, value in metrics.items():
        if name not in keys.ALLOWED_METRICS:
            raise EgressError(f"egress refused: metric {name!r} is not whitelisted (allowed: {', '.join(sorted(keys.ALLOWED_METRICS))})")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise EgressError(f"egress refused: metric {name!r} must be one scalar, got {type(value).__name__}")
        if isinstance(value, float) and math.isnan(value) and name != keys.PRETEXT_LOSS:
            raise EgressError(f"egress refused: metric {name!r} is NaN")
    dp = dp_num_examples is not None
    if metrics.get(keys.DP_ENABLED) != int(dp):
        raise EgressError(f"egress refused: metric {keys.DP_ENABLED!r} must be {int(dp)}: this site trains {'with' if dp else 'without'} DP")
    if dp:
        _check_dp_metrics(metrics, dp_num_examples)


def _check_dp_metrics(metrics: Mapping[str, object], dp_num_examples: int) -> None:
    """Under DP nothing computed from the data without noise may leave (DP_RELEASED_METRICS)."""
    leaking = sorted(set(metrics) - keys.DP_RELEASED_METRICS)
    if leaking:
        raise EgressError(
            f"egress refused: under DP metric(s) {leaking} would leave the site computed from the data without noise, "
            f"outside the guarantee; only {', '.join(sorted(keys.DP_RELEASED_METRICS))} may leave"
        )
    if metrics.get(keys.NUM_EXAMPLES) != dp_num_examples:
        # Flower sends a ClientApp's exception text to the coordinator: name the rule, never the value.
        raise EgressError(
            f"egress refused: under DP {keys.NUM_EXAMPLES!r} must be the plan's data-independent weight "
            f"{dp_num_examples} (batch size x local steps), not a count of the site's records"
        )
