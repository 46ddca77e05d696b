"""FedAvg over the encoder, with per-site privacy bookkeeping shared by both aggregation paths.

:class:`RoundRecorder` is the server's record of every site's reply, used by composition on the
plain path (:class:`FedSSLAvg`, a subclass of Flower's FedAvg, as Flower's own examples extend
strategies) and on the SecAgg+ path (server/secagg_app.py):
- replies from sites that refused (budget spent) or failed are recorded, then left out of the
  average instead of breaking it;
- ε is aggregated with max over the sites that reported, never averaged (:func:`round_metrics`):
  the federation is only as private as its least private site, and a refused site still counts
  with what it has already spent;
- every site's report lands in metrics.jsonl and the server's own hash-chained ledger.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp.strategy import FedAvg

from fedssl.fl import keys
from fedssl.fl.records import SiteReport
from fedssl.privacy.ledger import ServerLedger
from fedssl.privacy.records import ROUND_REPORT
from fedssl.runlog import FAILED, KIND_ROUND, KIND_SITE_ROUND, RunLog

INFO = 20
AGGREGATION_FEDAVG = "fedavg"


def round_epsilon(reports: list[SiteReport]) -> float:
    """The round's ε: max over the sites that reported (trained or refused); inf if one trains without DP."""
    return max((r.epsilon for r in reports), default=math.nan)


def round_metrics(reports: list[SiteReport]) -> dict[str, int | float]:
    """ε: max over sites (never the mean); pretext loss: example-weighted mean; examples: sum (trained sites)."""
    trained = [r for r in reports if r.status == keys.STATUS_TRAINED]
    losses = [(r.pretext_loss, r.num_examples) for r in trained if math.isfinite(r.pretext_loss)]
    loss = sum(l * n for l, n in losses) / max(1, sum(n for _, n in losses)) if losses else math.nan
    return {
        keys.NUM_EXAMPLES: sum(r.num_examples for r in trained),
        keys.EPSILON: round_epsilon(reports),
        keys.PRETEXT_LOSS: loss,
    }


def aggregate_site_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """FedAvg's metrics hook, under the same rule as every other round figure (:func:`round_metrics`)."""
    return MetricRecord(round_metrics([SiteReport.from_metrics(-1, r[keys.METRICS]) for r in records]))


class RoundRecorder:
    """Records every site's reply and every round: metrics.jsonl, the server ledger and the log."""

    def __init__(self, *, run_log: RunLog, server_ledger: ServerLedger, num_rounds: int, aggregation: str = AGGREGATION_FEDAVG,
                 report_fields: Callable[[int], dict] = lambda server_round: {}) -> None:
        self.run_log = run_log
        self.server_ledger = server_ledger
        self.num_rounds = num_rounds
        self.aggregation = aggregation  # recorded in the server ledger: how the server combined the updates
        self.report_fields = report_fields  # extra fields for a round's ledger reports (site-level DP adds its ε)
        self._round_started = time.perf_counter()
        # A failed reply carries no metrics, so no site id: name the site this node last answered as.
        self._site_of_node: dict[int, int] = {}

    def start_round(self) -> None:
        self._round_started = time.perf_counter()

    def report(self, server_round: int, node_id: int, metrics: Mapping[str, float | int] | None) -> SiteReport | None:
        """The site's report, recorded; None (and a recorded failure) when its metrics are unusable."""
        try:
            if metrics is None:
                raise KeyError(keys.METRICS)
            report = SiteReport.from_metrics(node_id, metrics)
        except (KeyError, ValueError, TypeError) as err:
            self.failure(server_round, node_id, f"malformed reply: {err}")
            return None
        self._record_site(server_round, report)
        return report

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
            ROUND_REPORT,
            {
                "round": server_round,
                "node_id": report.node_id,
                "site_id": report.site_id,
                "epsilon": report.epsilon if math.isfinite(report.epsilon) else None,
                "ledger_seq": report.ledger_seq,
                "status": report.status,
                "aggregation": self.aggregation,
                **self.report_fields(server_round),
            },
        )
        if report.status == keys.STATUS_REFUSED:
            log(INFO, "fedssl: round %d: site %d REFUSED to train (privacy budget spent: eps=%.3f of %.3g)",
                server_round, report.site_id, report.epsilon, report.target_epsilon)

    def failure(self, server_round: int, node_id: int, reason: str) -> None:
        known = self._site_of_node.get(node_id)
        extra = {} if known is None else {"last_site_id": known}
        self.run_log.append(KIND_SITE_ROUND, round=server_round, site_id=-1, node_id=node_id, status=FAILED, reason=reason, **extra)
        who = f"node {node_id}" if known is None else f"site {known} (node {node_id})"
        log(INFO, "fedssl: round %d: %s failed: %s", server_round, who, reason)

    def finish_round(self, server_round: int, reports: list[SiteReport]) -> None:
        trained = [r for r in reports if r.status == keys.STATUS_TRAINED]
        losses = [r.pretext_loss for r in trained if math.isfinite(r.pretext_loss)]
        max_eps = round_epsilon(reports)
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


class FedSSLAvg(FedAvg):
    """Flower's FedAvg over the trained sites' encoders; every reply recorded by ``recorder``."""

    def __init__(self, *, recorder: RoundRecorder, **kwargs) -> None:
        super().__init__(train_metrics_aggr_fn=aggregate_site_metrics, **kwargs)
        self.recorder = recorder

    def configure_train(self, server_round, arrays, config, grid):
        self.recorder.start_round()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        trained: list[tuple[int, int, Message]] = []
        reports: list[SiteReport] = []
        for msg in replies:
            node_id = msg.metadata.src_node_id
            if msg.has_error():
                self.recorder.failure(server_round, node_id, msg.error.reason)
                continue
            report = self.recorder.report(server_round, node_id, msg.content.metric_records.get(keys.METRICS))
            if report is None:
                continue
            reports.append(report)
            if report.status == keys.STATUS_TRAINED and keys.ARRAYS in msg.content:
                trained.append((report.site_id, node_id, msg))
        # Sum in site order, not arrival order: float addition is not associative, and a run with the
        # same seeds (and no DP noise) should give the same encoder however the replies raced.
        ordered = [msg for _, _, msg in sorted(trained, key=lambda t: (t[0], t[1]))]
        arrays = self.average(server_round, ordered) if ordered else None
        self.recorder.finish_round(server_round, reports)
        return arrays, (MetricRecord(round_metrics(reports)) if arrays is not None else None)

    def average(self, server_round: int, trained: list[Message]) -> ArrayRecord | None:
        """Combine the trained replies: example-weighted FedAvg (server/site_dp.py overrides it)."""
        arrays, _ = super().aggregate_train(server_round, trained)
        return arrays
