"""A Grid that notices replies promptly: composition over the Grid Flower hands the ServerApp.

Flower 1.42's deployment Grid (``flwr.superlink.grid.http_grid``) sleeps a hard-coded 3 s
between pulls in ``send_and_receive``, so every round ends on the next multiple of 3 s after its
last reply — on a 2-core machine about half of a round's overhead. :class:`PromptGrid` delegates
everything to the wrapped Grid through its public methods and implements ``send_and_receive``
with the same push-then-pull contract, pulling every :data:`REPLY_POLL_SECONDS`. A pull is one
small request to the local SuperLink, so polling 15x as often costs nothing measurable.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.supercore.run import Run
from flwr.serverapp import Grid

REPLY_POLL_SECONDS = 0.2


class PromptGrid(Grid):
    def __init__(self, grid: Grid, poll_seconds: float = REPLY_POLL_SECONDS) -> None:
        self.inner = grid
        self.poll_seconds = poll_seconds

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def get_nodes(self):
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``, then pull replies until all arrived or ``timeout`` seconds passed."""
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.time() + timeout
        replies: list[Message] = []
        while pending and (deadline is None or time.time() < deadline):
            arrived = list(self.pull_messages(pending))
            replies.extend(arrived)
            pending.difference_update(m.metadata.reply_to_message_id for m in arrived)
            if pending:
                time.sleep(self.poll_seconds)
        return replies
