"""fedssl.progress: the one progress helper. A bar only on a terminal; elsewhere the same few lines as always."""

from __future__ import annotations

import io

from fedssl.progress import ProgressDisplay, tick


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _count_to(progress, total: int, every: int = 1) -> None:
    for done in range(1, total + 1):
        tick(progress, f"step {done}/{total}", done, total, every=every)


def test_off_a_terminal_there_is_no_bar_and_lines_come_every_so_often():
    lines, stream = [], io.StringIO()
    display = ProgressDisplay(lines.append, prefix="fedssl: ", stream=stream)
    assert not display.live
    _count_to(display, 10, every=4)
    display("done")
    assert lines == ["fedssl: step 4/10", "fedssl: step 8/10", "fedssl: step 10/10", "fedssl: done"]
    assert stream.getvalue() == ""  # quiet: nothing drawn


def test_on_a_terminal_a_bar_is_drawn_and_only_the_last_line_stays():
    lines, stream = [], Terminal()
    display = ProgressDisplay(lines.append, prefix="fedssl: ", stream=stream)
    assert display.live
    _count_to(display, 10, every=4)
    assert lines == ["fedssl: step 10/10"]
    assert "10/10" in stream.getvalue()  # rich drew the bar (M of N) on the stream
    assert display._bar is None  # stopped at the end: nothing left running


def test_a_plain_callback_gets_the_milestone_lines():
    lines: list[str] = []
    _count_to(lines.append, 6, every=3)
    tick(None, "nobody listens", 1, 1)
    assert lines == ["step 3/6", "step 6/6"]
