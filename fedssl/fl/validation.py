"""The server's check of one site's reply, before anything of it is aggregated or recorded as fact.

The egress guard (fedssl.fl.egress) is the site's own last check; this is the coordinator's first:
a site may be malicious, so nothing in its reply is trusted until it passes here. Two pure checks,
each returning the reason a reply is unusable (one line) or None:

- :func:`metrics_problem`: only whitelisted metric names, each a finite scalar of its type and in
  its range; ``num-examples`` (the FedAvg weight) in ``(0, max_num_examples]`` for a trained reply.
  The pretext loss may be absent or NaN (a site under DP need not release it).
- :func:`arrays_problem`: exactly the global encoder's array names, shapes and dtypes (a shape-(1,)
  array would broadcast into a whole weight in a sum), finite values, and an update norm
  ``||theta_site - theta_global||`` within ``max_update_norm x max(||theta_global||, 1)``.

NumPy and fedssl.fl.keys only: the ServerApp imports it, and it must not pull in Flower or training.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fedssl.fl import keys

# Metrics a reply must carry; the rest of ALLOWED_METRICS may be absent (a site may withhold
# what it does not have to release, e.g. the pretext loss under DP).
REQUIRED_METRICS = frozenset({keys.NUM_EXAMPLES, keys.STATUS, keys.SITE_ID, keys.EPSILON, keys.LEDGER_SEQ, keys.DP_ENABLED})
INTEGER_METRICS = frozenset({keys.NUM_EXAMPLES, keys.STATUS, keys.SITE_ID, keys.STEPS, keys.LEDGER_SEQ, keys.DP_ENABLED})
# Slack on "epsilon <= target" for float round-off in the site's accountant.
EPSILON_SLACK = 1e-9


def metrics_problem(metrics: Mapping[str, object] | None, *, max_num_examples: int) -> str | None:
    """Why these reply metrics are unusable, or None."""
    if metrics is None:
        return f"no {keys.METRICS!r} record"
    names = set(metrics)
    if extra := sorted(names - keys.ALLOWED_METRICS):
        return f"unexpected metric(s) {extra}"
    if missing := sorted(REQUIRED_METRICS - names):
        return f"missing metric(s) {missing}"
    for name, value in metrics.items():
        if problem := _scalar_problem(name, value):
            return problem
    return _range_problem(metrics, max_num_examples)


def _scalar_problem(name: str, value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"metric {name!r} must be one number, got {type(value).__name__}"
    if name in INTEGER_METRICS and not isinstance(value, int):
        return f"metric {name!r} must be an integer, got {value!r}"
    if name == keys.PRETEXT_LOSS and isinstance(value, float) and math.isnan(value):
        return None  # "no loss released"
    if not math.isfinite(value):
        return f"metric {name!r} is {value}"
    return None


def _range_problem(m: Mapping[str, object], max_num_examples: int) -> str | None:
    status = m[keys.STATUS]
    if status not in keys.STATUS_NAMES:
        return f"metric {keys.STATUS!r} is {status}, not one of {sorted(keys.STATUS_NAMES)}"
    trained = keys.STATUS_NAMES[status] == keys.STATUS_TRAINED
    n, low = m[keys.NUM_EXAMPLES], 1 if trained else 0
    if not low <= n <= max_num_examples:
        return f"{keys.NUM_EXAMPLES} {n} outside [{low}, {max_num_examples}] (federation.max_num_examples)"
    if m[keys.SITE_ID] < 0:
        return f"{keys.SITE_ID} {m[keys.SITE_ID]} is negative"
    if m[keys.DP_ENABLED] not in (0, 1):
        return f"{keys.DP_ENABLED} must be 0 or 1, got {m[keys.DP_ENABLED]}"
    if m[keys.LEDGER_SEQ] < -1:
        return f"{keys.LEDGER_SEQ} {m[keys.LEDGER_SEQ]} is below -1"
    for name in (keys.STEPS, keys.TRAIN_SECONDS, keys.PRETEXT_LOSS):
        value = m.get(name, 0)
        if isinstance(value, (int, float)) and value < 0:
            return f"{name} {value} is negative"
    return _epsilon_problem(m, trained) if m[keys.DP_ENABLED] else None


def _epsilon_problem(m: Mapping[str, object], trained: bool) -> str | None:
    """A DP site's privacy claim must be a real one: ε >= 0, a budget > 0, δ in (0, 1), ε within budget if it trained."""
    epsilon, target, delta = m[keys.EPSILON], m.get(keys.TARGET_EPSILON), m.get(keys.DELTA)
    if epsilon < 0:
        return f"{keys.EPSILON} {epsilon} is negative under DP"
    if target is None or target <= 0:
        return f"{keys.TARGET_EPSILON} {target} must be > 0 under DP"
    if delta is None or not 0 < delta < 1:
        return f"{keys.DELTA} {delta} must be in (0, 1) under DP"
    if trained and m[keys.LEDGER_SEQ] < 0:
        return f"{keys.LEDGER_SEQ} {m[keys.LEDGER_SEQ]}: a DP site that trained must name its ledger record"
    if trained and epsilon > target * (1 + EPSILON_SLACK):
        return f"{keys.EPSILON} {epsilon:.6g} exceeds the site's own budget {target:.6g}, yet it trained"
    return None


def arrays_problem(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], *,
                   max_update_norm: float | None) -> str | None:
    """Why a trained reply's arrays are unusable against the global ``reference``, or None.

    ``max_update_norm`` is relative: the update may be at most that multiple of the global
    model's L2 norm (or of 1, for a model near zero); None disables the bound.
    """
    if extra := sorted(set(arrays) - set(reference)):
        return f"unexpected array(s) {extra[:3]}"
    if missing := sorted(set(reference) - set(arrays)):
        return f"missing array(s) {missing[:3]}"
    squared_update, squared_global = 0.0, 0.0
    for name, ref in reference.items():
        arr = arrays[name]
        if arr.shape != ref.shape:
            return f"array {name!r} has shape {tuple(arr.shape)}, the global model's is {tuple(ref.shape)}"
        if arr.dtype != ref.dtype:
            return f"array {name!r} has dtype {arr.dtype}, the global model's is {ref.dtype}"
        if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
            return f"array {name!r} holds NaN or Inf"
        delta = arr.astype(np.float64) - ref.astype(np.float64)
        squared_update += float(np.dot(delta.ravel(), delta.ravel()))
        squared_global += float(np.dot(ref.ravel().astype(np.float64), ref.ravel().astype(np.float64)))
    if max_update_norm is None:
        return None
    norm, bound = math.sqrt(squared_update), max_update_norm * max(math.sqrt(squared_global), 1.0)
    if not norm <= bound:  # also catches an overflow to inf/NaN in the sum of squares
        return f"update norm {norm:.4g} exceeds {bound:.4g} ({max_update_norm:g} x the global model's norm, federation.max_update_norm)"
    return None
