"""A DP site's reply records as the real site code builds them, for server-side tests.

Under DP a site releases its plan's batch size x local steps as num-examples (fedssl.fl.site_reply);
these tests give each site a one-step plan whose batch is the site's own count, so FedAvg's weights
still differ per site and the expected aggregates stay easy to write down.
"""

from __future__ import annotations

from fedssl.fl.plan import TrainPlan
from fedssl.fl.records import RoundResult
from fedssl.fl.site_reply import site_reply_records


def dp_reply_records(result: RoundResult, site: int) -> dict[str, object]:
    plan = TrainPlan(run_id="t", server_round=1, planned_rounds=1, pretext="rotation", encoder="cnn", width=8, depth=2,
                     local_steps=1, batch_size=max(1, int(result.num_examples)), lr=0.1)
    return site_reply_records(result, site, dp_enabled=True, plan=plan)
