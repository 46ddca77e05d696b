"""What a site sends back, as Flower records: encoder arrays (if trained) and whitelisted scalars.

Under DP every released value must be inside the guarantee: the encoder weights are noised and
charged, and each scalar is data-independent (keys.DP_RELEASED_METRICS). So a DP site reports as
its FedAvg weight the plan's batch size x local steps instead of its exact example count (which
moves by one when one record is removed), and keeps its pretext loss and training time to itself.
"""

from __future__ import annotations

from fedssl.fl import keys
from fedssl.fl.plan import TrainPlan
from fedssl.fl.records import RoundResult


def released_num_examples(result: RoundResult, plan: TrainPlan, dp_enabled: bool) -> int:
    """The weight a site releases: its exact count without DP; under DP the examples a round of
    this plan draws (batch size x local steps), which the server knows already. Equal weights for
    DP sites under one plan: FedAvg then averages them uniformly, which is what their updates are
    worth anyway, since each is at most batch-size x steps clipped gradients plus the same noise."""
    return plan.batch_size * plan.local_steps if dp_enabled else int(result.num_examples)


def site_reply_records(result: RoundResult, site_id: int, dp_enabled: bool, plan: TrainPlan) -> dict[str, object]:
    """What a site sends back: encoder arrays (if trained) and whitelisted scalars."""
    from flwr.app import ArrayRecord, MetricRecord

    values: dict[str, int | float] = {
        keys.NUM_EXAMPLES: released_num_examples(result, plan, dp_enabled),
        keys.STATUS: keys.STATUS_CODES[result.status],
        keys.SITE_ID: int(site_id),
        keys.STEPS: int(result.steps),
        keys.EPSILON: float(result.epsilon) if dp_enabled else -1.0,
        keys.TARGET_EPSILON: float(result.target_epsilon) if dp_enabled else -1.0,
        keys.DELTA: float(result.delta),
        keys.LEDGER_SEQ: int(result.ledger_seq),
        keys.DP_ENABLED: int(dp_enabled),
    }
    if not dp_enabled:
        values[keys.PRETEXT_LOSS] = float(result.pretext_loss)
        values[keys.TRAIN_SECONDS] = float(result.train_seconds)
    records: dict[str, object] = {keys.METRICS: MetricRecord(values)}
    if result.encoder_state is not None:
        records[keys.ARRAYS] = ArrayRecord(dict(result.encoder_state))
    return records
