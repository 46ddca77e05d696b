"""The site's egress guard: the last check before a reply leaves the site.

A reply may hold the encoder's arrays (exactly its parameter names and shapes) and
whitelisted scalar metrics. Anything else — extra arrays (heads, predictors, data),
strings, per-sample vectors — is refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from fedssl.errors import FedSSLError
from fedssl.fl import keys


class EgressError(FedSSLError):
    """A reply would carry something the privacy contract does not allow out."""


def check_egress(
    records: Mapping[str, object], expected_shapes: Mapping[str, tuple[int, ...]], arrays_required: bool
) -> None:
    """``records`` maps record names to Flower records (ArrayRecord / MetricRecord)."""
    from flwr.app import ArrayRecord, MetricRecord

    allowed = {keys.ARRAYS, keys.METRICS}
    extra = sorted(set(records) - allowed)
    if extra:
        raise EgressError(f"egress refused: reply holds record(s) {extra}; only {sorted(allowed)} may leave a site")
    arrays = records.get(keys.ARRAYS)
    if arrays is None:
        if arrays_required:
            raise EgressError("egress refused: a trained reply must carry the encoder arrays")
    else:
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
    metrics = records.get(keys.METRICS)
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
