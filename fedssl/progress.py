"""Progress of long work (warm-start pretraining, evaluation, audits): one small helper all of it goes through.

Long work reports to a plain callback, ``progress(message)``, and counts its units with :func:`tick`.
The launchers hand it a :class:`ProgressDisplay`: on a terminal (stderr a TTY) the counted units draw
a `rich` bar on stderr (rich ships with Flower: no new dependency) and only each piece of work's last
line is kept; anywhere else (CI, logs, pipes) there is no bar, just the same few lines as always.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

Progress = Callable[[str], None]


class ProgressDisplay:
    """A progress callback that can also draw a bar (``live``: only when ``stream`` is a terminal)."""

    def __init__(self, echo: Progress, *, prefix: str = "", stream: TextIO | None = None) -> None:
        self.echo, self.prefix = echo, prefix
        self.stream = stream if stream is not None else sys.stderr
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self._bar = None
        self._task = None

    def __call__(self, message: str) -> None:
        self.close()
        self.echo(self.prefix + message)

    def bar(self, message: str, done: int, total: int) -> None:
        """Move the bar to ``done`` of ``total``; at the end the bar goes and ``message`` stays as a line."""
        if self._bar is None:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                 console=Console(file=self.stream), transient=True)
            self._bar.start()
            self._task = self._bar.add_task(message, total=total)
        self._bar.update(self._task, completed=done, total=total, description=self.prefix + message)
        if done >= total:
            self(message)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = self._task = None


def tick(progress: Progress | None, message: str, done: int, total: int, *, every: int = 1) -> None:
    """``done`` of ``total`` units of one piece of work. A live display moves its bar on every tick;
    any other callback gets ``message`` every ``every`` units and at the last."""
    if progress is None:
        return
    if isinstance(progress, ProgressDisplay) and progress.live:
        progress.bar(message, done, total)
    elif done % every == 0 or done >= total:
        progress(message)
