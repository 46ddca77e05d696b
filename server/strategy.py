"""FedAvg over the encoder, with per-site privacy bookkeeping shared by both aggregation paths.

:class:`RoundRecorder` is the server's record of every site's reply, used by composition on the
plain path (:class:`FedSSLAvg`, a subclass of Flower's FedAvg, as Flower's own examples extend
strategies) and on the SecAgg+ path (server/secagg_app.py):
- replies from sites that refused (budget spent) or failed are recorded, then left out of the
  average instead of breaking it;
- ε is aggregated with max over the sites that reported, never averaged (:func:`round_metrics`):
  the federation is only as private as its least private site, and a refused site still counts
  with what it has already spent;
- every site's report lands in metrics.jsonl and the server's own hash-chained ledger;
- every reply is validated before it counts (fedssl.fl.validation, server/guard.py): a bad one is
  dropped with its reason in the log, metrics.jsonl and the server ledger, and the round goes on
  unless fewer than ``min_train_nodes`` valid replies remain;
- a round in which every sampled site failed (raised) stops the run (:class:`AllSitesFailed`): the
  next round would fail the same way, and the first site's error is the one line the user needs. A
  site that did not answer at all (unreachable, restarting) does not count: it may rejoin.

``federation.strategy`` picks the combination rule: FedAvg, or Flower's FedMedian / FedTrimmedAvg
(robust to a minority of poisoned updates), each composed with the same validation and recorder.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg

from fedssl.config import FederationConfig
from fedssl.fl import keys
from fedssl.fl.records import SiteReport
from fedssl.fl.validation import arrays_problem, metrics_problem
from fedssl.privacy.ledger import ServerLedger
from fedssl.privacy.records import REPLY_DROPPED, ROUND_REPORT
from fedssl.privacy.watermarks import SiteWatermarks
from fedssl.runlog import FAILED, KIND_ROUND, KIND_SITE_ROUND, RunLog
from server.guard import SiteBindings

INFO = 20
AGGREGATION_FEDAVG = "fedavg"
_DEFAULTS = FederationConfig()


# Flower wraps a ClientApp's exception as "<class '...ClientAppException'>:<'\nException ClientAppException occurred.
# Message: <the site's message>'>", possibly after a Ray traceback; the site's own line is what follows "Message: ".
_FLOWER_MESSAGE = re.compile(r"Message: (.*?)(?:'>)?$", re.MULTILINE)
_SITE_PREFIX = re.compile(r"^site (\d+): ")  # simulated sites name themselves (clients/client_app.py)


# Flower's error codes for a reply that never came from the site's code: the node is gone for now.
# A sampled site whose reply never came (crashed mid-round, restarting, cut off): like an unreachable one.
NO_REPLY = "no reply within the round timeout (federation.round_timeout): the site crashed, restarted or was cut off"
UNREACHABLE_ERROR_CODES = frozenset({ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE})


class AllSitesFailed(Exception):
    """Every site sampled in a round failed: the run stops with the first site's error, in one line."""


def error_line(reason: str) -> str:
    """A failed reply's reason as one line: the site's own message when Flower wrapped it, else the last line."""
    found = _FLOWER_MESSAGE.findall(reason)
    if found and found[-1].strip():
        return found[-1].strip()
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    return lines[-1] if lines else "no reason given"


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
                 report_fields: Callable[[int], dict] = lambda server_round: {},
                 max_num_examples: int = _DEFAULTS.max_num_examples, watermarks: SiteWatermarks | None = None) -> None:
        self.max_num_examples = max_num_examples
        self.bindings = SiteBindings()
        self.watermarks = watermarks if watermarks is not None else SiteWatermarks()
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
        """One reply's report, screened and recorded; None (and a recorded drop) when it is unusable."""
        report = self.screen(server_round, [(node_id, metrics)]).get(node_id)
        if report is not None:
            self.accept(server_round, report)
        return report

    def screen(self, server_round: int, replies: list[tuple[int, Mapping[str, float | int] | None]]) -> dict[int, SiteReport]:
        """node id -> report for the replies whose metrics, site id and budget claims hold; the rest dropped.

        Nothing is recorded as the site's until :meth:`accept` (the caller may still drop it for its arrays).
        """
        parsed: dict[int, SiteReport] = {}
        for node_id, metrics in replies:
            if (problem := metrics_problem(metrics, max_num_examples=self.max_num_examples)) is not None:
                self.drop(server_round, node_id, problem)
            else:
                parsed[node_id] = SiteReport.from_metrics(node_id, metrics)
        refused = self.bindings.problems([(node_id, r.site_id) for node_id, r in parsed.items()])
        screened: dict[int, SiteReport] = {}
        for node_id, report in parsed.items():
            if (problem := refused.get(node_id) or self.watermarks.problem(report)) is not None:
                self.drop(server_round, node_id, f"site {report.site_id}: {problem}")
            else:
                screened[node_id] = report
        return screened

    def accept(self, server_round: int, report: SiteReport) -> None:
        """Record a valid report as the site's: metrics.jsonl, the server ledger, its budget watermark."""
        self.watermarks.advance(report)
        self._record_site(server_round, report)

    def drop(self, server_round: int, node_id: int, reason: str) -> None:
        """A reply the server will not use: the reason in the log, metrics.jsonl and the server ledger."""
        self.server_ledger.append(REPLY_DROPPED, {"round": server_round, "node_id": node_id, "reason": reason})
        self.failure(server_round, node_id, f"reply dropped: {reason}")

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

    def site_errors(self, server_round: int, errors: list[tuple[int, str]]) -> list[tuple[int, str]]:
        """Record the replies that carry an error instead of a result: (node id, Flower's reason) each.

        Returns (node id, the error in one line) each, for :meth:`stop_if_all_failed`."""
        lines = []
        for node_id, reason in errors:
            line = error_line(reason)
            if (prefix := _SITE_PREFIX.match(line)) is not None:  # the site named itself: attribute the failure to it
                self._site_of_node[node_id] = int(prefix.group(1))
                line = line[prefix.end():]
            self.failure(server_round, node_id, line)
            lines.append((node_id, line))
        return lines

    def stop_if_all_failed(self, server_round: int, errors: list[tuple[int, str]], sampled: int, unreachable: int = 0) -> None:
        """Raise AllSitesFailed when each of the round's ``sampled`` replies was an error (:meth:`site_errors`).

        ``unreachable`` of those errors are a site that did not answer (crashed, restarting, network):
        such a site may rejoin and train next round, so the run goes on; only a round whose every
        reply is an error the sites themselves raised (config, data, refusal) would fail alike again."""
        if sampled and len(errors) == sampled and not unreachable:
            _, who, line = min(self._attributed(node_id, line) for node_id, line in errors)
            raise AllSitesFailed(f"round {server_round}: all {sampled} sampled sites failed; first error ({who}): {line}")

    def _attributed(self, node_id: int, line: str) -> tuple[float, str, str]:
        """(sort key, 'site-N' or 'node N', line) for one failed reply: the lowest site id is the 'first'."""
        if (site := self._site_of_node.get(node_id)) is not None:
            return site, f"site-{site}", line
        return math.inf, f"node {node_id}", line

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
            "fedssl: round %d/%d: %d/%d sites trained, %s, max site eps %.3f, %.1fs",
            server_round, self.num_rounds, len(trained), len(reports), loss_phrase(len(losses), len(trained), mean_loss),
            max_eps, seconds,
        )


def loss_phrase(released: int, trained: int, mean_loss: float) -> str:
    """The round line's pretext loss. A site under DP keeps its loss (an exact statistic of its data), so
    "nan" would read as a failed run: say who kept it instead."""
    if not released:
        return "pretext loss kept by the sites (DP)" if trained else "no pretext loss (no site trained)"
    if released < trained:
        return f"pretext loss {mean_loss:.4f} ({released} of {trained} sites released it)"
    return f"pretext loss {mean_loss:.4f}"


def _no_flower_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """The round's figures come from the accepted reports (:func:`round_metrics`), not from Flower's pass over replies."""
    return MetricRecord()


class FedSSLAvg(FedAvg):
    """Flower's FedAvg over the trained sites' encoders, after validation; every reply recorded by ``recorder``.

    Combined with Flower's FedMedian or FedTrimmedAvg (:class:`FedSSLMedian`, :class:`FedSSLTrimmedAvg`),
    :meth:`average` runs their rule instead: the next class in the MRO after this one.
    """

    def __init__(self, *, recorder: RoundRecorder, max_update_norm: float | None = _DEFAULTS.max_update_norm, **kwargs) -> None:
        super().__init__(train_metrics_aggr_fn=_no_flower_metrics, **kwargs)
        self.recorder = recorder
        self.max_update_norm = max_update_norm
        self._global: dict[str, np.ndarray] | None = None  # the arrays this round's replies must match
        self._sent_to: list[int] = []  # the nodes this round's train messages went to

    def configure_train(self, server_round, arrays, config, grid):
        self.recorder.start_round()
        self._global = {name: arr.numpy() for name, arr in arrays.items()}
        messages = list(super().configure_train(server_round, arrays, config, grid))
        # Flower hands aggregate_train only the replies that came back in time: a site that crashed
        # mid-round is simply absent, so the round's sampled sites are remembered here.
        self._sent_to = [msg.metadata.dst_node_id for msg in messages]
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        errors = self.recorder.site_errors(server_round, [(m.metadata.src_node_id, m.error.reason) for m in replies if m.has_error()])
        replied = {m.metadata.src_node_id for m in replies}
        silent = [node for node in self._sent_to if node not in replied]
        for node_id in silent:
            self.recorder.failure(server_round, node_id, NO_REPLY)
        content = {msg.metadata.src_node_id: msg for msg in replies if not msg.has_error()}
        screened = self.recorder.screen(server_round, [(node, msg.content.metric_records.get(keys.METRICS)) for node, msg in content.items()])
        reports: list[SiteReport] = []
        trained: list[tuple[int, int, Message]] = []
        for node_id, report in screened.items():
            msg = content[node_id]
            if report.status == keys.STATUS_TRAINED:
                if (problem := self._arrays_problem(msg)) is not None:
                    self.recorder.drop(server_round, node_id, f"site {report.site_id}: {problem}")
                    continue
                trained.append((report.site_id, node_id, _for_aggregation(msg, report)))
            self.recorder.accept(server_round, report)
            reports.append(report)
        arrays = None
        if len(reports) < self.min_train_nodes:
            # Logged, not a site record: no site failed (the report counts failed site replies).
            log(INFO, "fedssl: round %d failed: %d valid repl(ies), federation.min_sites needs %d; the global encoder is unchanged",
                server_round, len(reports), self.min_train_nodes)
        elif trained:
            # Sum in site order, not arrival order: float addition is not associative, and a run with the
            # same seeds (and no DP noise) should give the same encoder however the replies raced.
            arrays = self.average(server_round, [msg for _, _, msg in sorted(trained, key=lambda t: (t[0], t[1]))])
        self.recorder.finish_round(server_round, reports)
        unreachable = len(silent) + sum(1 for m in replies if m.has_error() and m.error.code in UNREACHABLE_ERROR_CODES)
        sampled = len(replies) + len(silent)
        self.recorder.stop_if_all_failed(server_round, errors, sampled, unreachable)  # the next round would fail alike
        return arrays, (MetricRecord(round_metrics(reports)) if arrays is not None else None)

    def without_bad_arrays(self, server_round: int, replies: list[Message]) -> list[Message]:
        """The replies whose arrays (if any) fit the global model; the others dropped and recorded.

        For a wrapper that computes on the arrays before this strategy sees them (Flower's server-side clipping).
        """
        kept = []
        for msg in replies:
            if msg.has_content() and msg.content.array_records and (problem := self._arrays_problem(msg)) is not None:
                self.recorder.drop(server_round, msg.metadata.src_node_id, problem)
                self._sent_to = [node for node in self._sent_to if node != msg.metadata.src_node_id]  # on record: not silent
            else:
                kept.append(msg)
        return kept

    def _arrays_problem(self, msg: Message) -> str | None:
        """Why a trained reply's arrays are unusable: not exactly one encoder ArrayRecord, or not like the global model."""
        records = msg.content.array_records
        if set(records) != {keys.ARRAYS}:
            return f"array records {sorted(records)}, expected exactly [{keys.ARRAYS!r}]"
        arrays = {name: arr.numpy() for name, arr in records[keys.ARRAYS].items()}
        # Before configure_train (a strategy driven by hand in a unit test) the first reply is the reference.
        reference = self._global if self._global is not None else arrays
        return arrays_problem(arrays, reference, max_update_norm=self.max_update_norm if self._global is not None else None)

    def average(self, server_round: int, trained: list[Message]) -> ArrayRecord | None:
        """Combine the trained replies: the parent strategy's rule (server/site_dp.py overrides it)."""
        arrays, _ = super().aggregate_train(server_round, trained)
        return arrays


def _for_aggregation(msg: Message, report: SiteReport) -> Message:
    """The reply as Flower's aggregation needs it: the validated arrays and the weight, nothing else.

    Flower insists that every reply carry the same metric names; a site may withhold some (the pretext loss under DP).
    """
    content = RecordDict({keys.ARRAYS: msg.content[keys.ARRAYS], keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: report.num_examples})})
    return Message(content=content, metadata=msg.metadata)


class FedSSLMedian(FedSSLAvg, FedMedian):
    """Coordinate-wise median of the validated updates (Flower's FedMedian): one poisoned site of three cannot move it."""


class FedSSLTrimmedAvg(FedSSLAvg, FedTrimmedAvg):
    """Coordinate-wise trimmed mean of the validated updates (Flower's FedTrimmedAvg, ``beta`` = federation.trim_fraction)."""


STRATEGY_CLASSES: dict[str, type[FedSSLAvg]] = {"fedavg": FedSSLAvg, "fedmedian": FedSSLMedian, "fedtrimmedavg": FedSSLTrimmedAvg}


def strategy_class(name: str) -> type[FedSSLAvg]:
    try:
        return STRATEGY_CLASSES[name]
    except KeyError:
        raise ValueError(f"federation.strategy: {name!r} is not a strategy; valid choices: {', '.join(STRATEGY_CLASSES)}") from None


def strategy_options(federation: FederationConfig) -> dict:
    """The validation and combination settings a message strategy takes from ``federation``."""
    options: dict = {"max_update_norm": federation.max_update_norm}
    if federation.strategy == "fedtrimmedavg":
        options["beta"] = federation.trim_fraction
    return options
