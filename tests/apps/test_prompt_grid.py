"""PromptGrid: Flower's send_and_receive contract, with replies noticed within a poll interval.

The inner Grid here stands in for the SuperLink (replies become available at set times); what is
tested is the wrapper: every reply collected, nothing lost, the timeout kept, and no 3 s naps.
"""

from __future__ import annotations

import time

import pytest
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from server.grid import REPLY_POLL_SECONDS, PromptGrid


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch):
    """The identity Flower's ServerApp runtime sets before messages are created."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 7), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


class DelayedReplies(Grid):
    """Each pushed message is answered ``delays[i]`` seconds after it was pushed."""

    def __init__(self, delays: list[float]) -> None:
        self.delays, self.due, self.pushed, self.pulls, self._run = delays, {}, {}, 0, None

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self):
        return [1, 2, 3]

    def push_messages(self, messages):
        ids = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{i}"  # as Flower's own InMemoryGrid assigns ids
            self.due[f"m{i}"], self.pushed[f"m{i}"] = time.monotonic() + self.delays[i], msg
            ids.append(f"m{i}")
        return ids

    def send_and_receive(self, messages, *, timeout=None):
        raise AssertionError("PromptGrid must not fall back to the inner Grid's napping send_and_receive")

    def pull_messages(self, message_ids):
        self.pulls += 1
        now, out = time.monotonic(), []
        for mid in list(message_ids):
            if self.due.get(mid, float("inf")) <= now:
                del self.due[mid]
                out.append(Message(content=RecordDict(), reply_to=self.pushed[mid]))
        return out


def _messages(grid: Grid, n: int) -> list[Message]:
    return [grid.create_message(RecordDict(), "train", node, "1") for node in range(1, n + 1)]


def test_every_reply_arrives_and_the_round_ends_within_a_poll_of_the_last_one():
    inner = DelayedReplies([0.1, 0.5, 0.9])
    grid = PromptGrid(inner)
    start = time.monotonic()
    replies = list(grid.send_and_receive(_messages(grid, 3), timeout=30))
    took = time.monotonic() - start
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    # Flower's own Grid would return at 3 s or 6 s (it naps 3 s between pulls).
    assert 0.9 <= took < 0.9 + 3 * REPLY_POLL_SECONDS + 0.5


def test_the_timeout_returns_what_arrived():
    inner = DelayedReplies([0.0, 60.0])
    grid = PromptGrid(inner)
    start = time.monotonic()
    replies = list(grid.send_and_receive(_messages(grid, 2), timeout=0.7))
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert time.monotonic() - start < 2.0


def test_everything_else_is_the_wrapped_grid():
    inner = DelayedReplies([0.0])
    grid = PromptGrid(inner)
    grid.set_run("run-7")
    assert grid.run == "run-7" and list(grid.get_node_ids()) == [1, 2, 3]
