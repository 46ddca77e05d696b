"""FedAvg over the encoder, with per-site privacy bookkeeping.

Extends Flower's FedAvg by subclassing (as Flower's own examples do):
- replies from sites that refused (budget spent) or failed are recorded, then left out
  of the average instead of breaking it;
- ε is aggregated with max over sites, never averaged: the federation is only as
  private as its least private site;
- every site's report lands in metrics.jsonl and the server's own hash-chained ledger.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp.strategy import FedAvg

from fedssl.fl import keys
from fedssl.fl.records import SiteReport
from fedssl.privacy.ledger import ServerLedger
from fedssl.runlog import KIND_ROUND, KIND_SITE_ROUND, RunLog

INFO = 20


def aggregate_site_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """ε: max over sites; pretext loss: example-weighted mean; examples: sum."""
    metrics = [r[keys.METRICS] for r in records]
    total = sum(int(m[keys.NUM_EXAMPLES]) for m in metrics)
    losses = [(float(m[keys.PRETEXT_LOSS]), int(m[keys.NUM_EXAMPLES])) for m in metrics if math.isfinite(float(m[keys.PRETEXT_LOSS]))]
    loss = sum(l * n for l, n in losses) / max(1, sum(n for _, n in losses)) if losses else math.nan
    return MetricRecord(
        {
            keys.NUM_EXAMPLES: total,
            keys.EPSILON: max(_site_epsilon(m) for m in metrics),
            keys.PRETEXT_LOSS: loss,
        }
    )


def _site_epsilon(metrics: MetricRecord) -> float:
    """A site without DP sends ε = -1 (a sentinel) with dp-enabled = 0: its ε is unbounded, not -1."""
    return float(metrics[keys.EPSILON]) if int(metrics.get(keys.DP_ENABLED, 1)) else math.inf


class FedSSLAvg(FedAvg):
    aggregation = "fedavg"  # recorded in the server ledger: how the server combined the updates

    def __init__(self, *, run_log: RunLog, server_ledger: ServerLedger, num_rounds: int, **kwargs) -> None:
        super().__init__(train_metrics_aggr_fn=aggregate_site_metrics, **kwargs)
        self.run_log = run_log
        self.server_ledger = server_ledger
        self.num_rounds = num_rounds
        self._round_started = time.perf_counter()
        # A failed reply carries no metrics, so no site id: name the site this node last answered as.
        self._site_of_node: dict[int, int] = {}

    def configure_train(self, server_round, arrays, config, grid):
        self._round_started = time.perf_counter()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        trained: list[Message] = []
        reports: list[SiteReport] = []
        for msg in replies:
            node_id = msg.metadata.src_node_id
            if msg.has_error():
                self._record_failure(server_round, node_id, msg.error.reason)
                continue
            try:
                report = SiteReport.from_metrics(node_id, msg.content[keys.METRICS])
            except (KeyError, ValueError, TypeError) as err:
                self._record_failure(server_round, node_id, f"malformed reply: {err}")
                continue
            reports.append(report)
            self._record_site(server_round, report)
            if report.status == "trained" and keys.ARRAYS in msg.content:
                trained.append(msg)
        arrays, metrics = self.average(server_round, trained) if trained else (None, None)
        self._record_round(server_round, reports)
        return arrays, metrics

    def average(self, server_round: int, trained: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Combine the trained replies: example-weighted FedAvg (server/site_dp.py overrides it)."""
        return super().aggregate_train(server_round, trained)

    def round_report_extra(self, server_round: int) -> dict:
        """Extra fields for this round's server-ledger reports (site-level DP adds its ε)."""
        return {}

    def _record_site(self, server_round: int, report: SiteReport) -> None:
        self._site_of_node[report.node_id] = report.site_id
        self.run_log.append(
            KIND_SITE_ROUND,
            round=server_round,
            site_id=report.site_id,
            node_id=report.node_id,
            status=report.status,
            epsilon=report.epsilon,
            target_epsilon=report.target_epsilon,
            delta=report.delta,
            pretext_loss=report.pretext_loss,
            num_examples=report.num_examples,
            steps=report.steps,
            train_seconds=report.train_seconds,
        )
        self.server_ledger.append(
            "round_report",
            {
                "round": server_round,
                "node_id": report.node_id,
                "site_id": report.site_id,
                "epsilon": report.epsilon if math.isfinite(report.epsilon) else None,
                "ledger_seq": report.ledger_seq,
                "status": report.status,
                "aggregation": self.aggregation,
                **self.round_report_extra(server_round),
            },
        )
        if report.status == "refused":
            log(INFO, "fedssl: round %d: site %d REFUSED to train (privacy budget spent: eps=%.3f of %.3g)",
                server_round, report.site_id, report.epsilon, report.target_epsilon)

    def _record_failure(self, server_round: int, node_id: int, reason: str) -> None:
        known = self._site_of_node.get(node_id)
        extra = {} if known is None else {"last_site_id": known}
        self.run_log.append(KIND_SITE_ROUND, round=server_round, site_id=-1, node_id=node_id, status="failed", reason=reason, **extra)
        who = f"node {node_id}" if known is None else f"site {known} (node {node_id})"
        log(INFO, "fedssl: round %d: %s failed: %s", server_round, who, reason)

    def _record_round(self, server_round: int, reports: list[SiteReport]) -> None:
        trained = [r for r in reports if r.status == "trained"]
        losses = [r.pretext_loss for r in trained if math.isfinite(r.pretext_loss)]
        # A refused site reports what it has already spent: it still bounds the federation.
        epsilons = [r.epsilon for r in reports]
        max_eps = max(epsilons) if epsilons else math.nan
        mean_loss = sum(losses) / len(losses) if losses else math.nan
        seconds = time.perf_counter() - self._round_started
        self.run_log.append(
            KIND_ROUND,
            round=server_round,
            num_sites=len(reports),
            num_trained=len(trained),
            mean_pretext_loss=mean_loss,
            max_epsilon=max_eps,
            seconds=seconds,
        )
        log(
            INFO,
            "fedssl: round %d/%d: %d/%d sites trained, pretext loss %.4f, max site eps %.3f, %.1fs",
            server_round, self.num_rounds, len(trained), len(reports), mean_loss, max_eps, seconds,
        )
