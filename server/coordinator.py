"""Coordinator-side helpers for a real deployment (the SuperLink itself is started by
``fedssl server start``; see fedssl/deploy/coordinator.py).

``ResponsiveGrid`` wraps the Grid Flower hands the ServerApp. Flower 1.42's
``Grid.send_and_receive`` checks for replies only every 3 s, so every round ends on the
next multiple of 3 s after the last site answered. This wrapper sends through the same
public Grid API (``push_messages``/``pull_messages``) and checks every
``poll_interval`` seconds instead; nothing inside Flower is patched.

Measured (benchmarks/deployment_overhead.py, variant ``responsive``): **no gain** — a
sooner reply only moves the next request into the SuperNode's own fixed 3 s sleep, and the
extra polling costs CPU on a small machine (11.4 s vs 9.3 s per round). The ServerApp does
not use it; it is kept for that benchmark and for Flower versions whose SuperNode polls
faster.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

DEFAULT_POLL_SECONDS = 0.2


class ResponsiveGrid(Grid):
    """A Grid that waits for replies with a short, fixed poll interval."""

    def __init__(self, grid: Grid, poll_interval: float = DEFAULT_POLL_SECONDS) -> None:
        if not poll_interval > 0:
            raise ValueError(f"poll_interval must be > 0, got {poll_interval!r}")
        self._grid = grid
        self.poll_interval = float(poll_interval)

    # Everything but send_and_receive is the wrapped Grid's own.
    def set_run(self, run):  # type: ignore[override]
        return self._grid.set_run(run)

    @property
    def run(self):  # type: ignore[override]
        return self._grid.run

    def create_message(self, *args, **kwargs) -> Message:  # type: ignore[override]
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self):  # type: ignore[override]
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        pending = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self._grid.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.poll_interval)
        return replies
