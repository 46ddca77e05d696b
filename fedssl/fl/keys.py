"""The wire contract: every record, metric and config name that crosses between site and server.

Both apps import these names; the egress guard allows nothing else out of a site. Imports
nothing, so the ServerApp may use it without pulling in the training stack.
"""

from __future__ import annotations

# Run config (pyproject's [tool.flwr.app.config]): set by fedssl's launchers, read by both apps.
RUN_CONFIG_PATH = "config-path"  # the resolved experiment config (config.yaml in the run dir)
RUN_DIR = "run-dir"
# The coordinator's state dir (deployment): its ledger key and each site's last (ledger seq, ε), across runs.
# Empty in a simulation: the run dir holds both, as it holds the simulated sites' state.
RUN_COORDINATOR_DIR = "coordinator-dir"
# "true": continue the run from the run dir's checkpoint (fedssl.run.checkpoint) with the run id the sites saw.
RUN_RESUME = "resume"

# Node config: which site a ClientApp process is.
NODE_PARTITION_ID = "partition-id"  # simulation: the simulated site's index (Flower sets it)
NODE_SITE_CONFIG = "site-config"  # deployment: the path of the operator's own site.yaml

# RecordDict entries
ARRAYS = "arrays"  # ArrayRecord: the encoder's state dict, nothing else
CONFIG = "config"  # ConfigRecord: the TrainPlan (server -> site only)
METRICS = "metrics"  # MetricRecord: whitelisted scalars (site -> server)

# Train-config entries for the SecAgg+ path only (server -> site): how a site weights its masked update.
SECAGG_WEIGHTING = "secagg-weighting"  # "examples" (FedAvg, capped at SECAGG_MAX_WEIGHT) | "uniform" (site-level DP)
SECAGG_MAX_WEIGHT = "secagg-max-weight"
SECAGG_WEIGHTINGS = ("examples", "uniform")

# Metric names (site -> server). Scalars only; none is per-sample.
NUM_EXAMPLES = "num-examples"  # FedAvg weighting: the exact count without DP, data-independent under DP
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
# Under DP a site releases the noised encoder plus only these: each is fixed by the site's own
# policy (ε target, δ, id, the DP flag), by the plan (steps, and num-examples, which becomes the
# plan's batch size x local steps) or by the site's charge history (ε spent, ledger seq, status).
# The pretext loss (an exact average over the sampled records), the training time and the exact
# example count are computed from the data without noise, so under DP they never leave the site.
DP_RELEASED_METRICS = frozenset({NUM_EXAMPLES, EPSILON, TARGET_EPSILON, DELTA, STEPS, STATUS, SITE_ID, LEDGER_SEQ, DP_ENABLED})

# A site's round ends trained or refused (budget spent); a refused site still answers (so the
# server can record the refusal) but sends no arrays. A reply the server cannot use is "failed".
STATUS_TRAINED = "trained"
STATUS_REFUSED = "refused"
STATUS_CODES = {STATUS_TRAINED: 0, STATUS_REFUSED: 1}
STATUS_NAMES = {code: name for name, code in STATUS_CODES.items()}
