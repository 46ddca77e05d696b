"""A resumed run's rounds: Flower counts its rounds from 1, the sites must see the run's own numbers.

Flower's ``Strategy.start`` (and the legacy workflow SecAgg+ runs on) loops ``current_round`` from 1
to ``num_rounds``. A run resumed after round k (fedssl.run.checkpoint) runs the remaining N - k
rounds, and every strategy call must see round k + i: the plan a site receives carries the round
(a site refuses a round of the same run it already trained: fedssl.privacy.policy), and
metrics.jsonl, the server ledger and the checkpoint record it. :class:`RoundOffset` wraps the
strategy (composition: the DP wrappers and robust rules inside it are unchanged) and adds k to
every round number it passes on. With k = 0 it changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy


class RoundOffset(Strategy):
    """``inner`` with every round number shifted by ``completed`` (the rounds the checkpoint already holds)."""

    def __init__(self, inner: Strategy, completed: int) -> None:
        self.inner = inner
        self.completed = completed

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.inner.configure_train(server_round + self.completed, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.inner.aggregate_train(server_round + self.completed, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round + self.completed, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round + self.completed, replies)

    def summary(self) -> None:
        self.inner.summary()
