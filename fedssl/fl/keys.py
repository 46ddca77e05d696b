"""The wire contract: every record and metric name that may cross between site and server.

Both apps import these names; the egress guard allows nothing else out of a site.
"""

from __future__ import annotations

# RecordDict entries
ARRAYS = "arrays"  # ArrayRecord: the encoder's state dict, nothing else
CONFIG = "config"  # ConfigRecord: the TrainPlan (server -> site only)
METRICS = "metrics"  # MetricRecord: whitelisted scalars (site -> server)

# Train-config entries for the SecAgg+ path only (server -> site): how a site weights its masked update.
SECAGG_WEIGHTING = "secagg-weighting"  # "examples" (FedAvg, capped at SECAGG_MAX_WEIGHT) | "uniform" (site-level DP)
SECAGG_MAX_WEIGHT = "secagg-max-weight"
SECAGG_WEIGHTINGS = ("examples", "uniform")

# Metric names (site -> server). Scalars only; none is per-sample.
NUM_EXAMPLES = "num-examples"  # FedAvg weighting
EPSILON = "epsilon"
TARGET_EPSILON = "target-epsilon"
DELTA = "delta"
PRETEXT_LOSS = "pretext-loss"
STEPS = "steps"
STATUS = "status"  # one of STATUS_CODES
SITE_ID = "site-id"
TRAIN_SECONDS = "train-seconds"
LEDGER_SEQ = "ledger-seq"
DP_ENABLED = "dp-enabled"

ALLOWED_METRICS = frozenset(
    {NUM_EXAMPLES, EPSILON, TARGET_EPSILON, DELTA, PRETEXT_LOSS, STEPS, STATUS, SITE_ID, TRAIN_SECONDS, LEDGER_SEQ, DP_ENABLED}
)

# A refused site still answers (so the server can record the refusal) but sends no arrays.
STATUS_CODES = {"trained": 0, "refused": 1}
STATUS_NAMES = {code: name for name, code in STATUS_CODES.items()}
