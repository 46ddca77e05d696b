"""What a site sends back, as Flower records: encoder arrays (if trained) and whitelisted scalars."""

from __future__ import annotations

from fedssl.fl import keys
from fedssl.fl.records import RoundResult


def site_reply_records(result: RoundResult, site_id: int, dp_enabled: bool) -> dict[str, object]:
    """What a site sends back: encoder arrays (if trained) and whitelisted scalars."""
    from flwr.app import ArrayRecord, MetricRecord

    metrics = MetricRecord(
        {
            keys.NUM_EXAMPLES: int(result.num_examples),
            keys.STATUS: keys.STATUS_CODES[result.status],
            keys.SITE_ID: int(site_id),
            keys.STEPS: int(result.steps),
            keys.EPSILON: float(result.epsilon) if dp_enabled else -1.0,
            keys.TARGET_EPSILON: float(result.target_epsilon) if dp_enabled else -1.0,
            keys.DELTA: float(result.delta),
            keys.PRETEXT_LOSS: float(result.pretext_loss),
            keys.TRAIN_SECONDS: float(result.train_seconds),
            keys.LEDGER_SEQ: int(result.ledger_seq),
            keys.DP_ENABLED: int(dp_enabled),
        }
    )
    records: dict[str, object] = {keys.METRICS: metrics}
    if result.encoder_state is not None:
        records[keys.ARRAYS] = ArrayRecord(dict(result.encoder_state))
    return records
