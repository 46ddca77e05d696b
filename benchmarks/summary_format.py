"""What every SUMMARY.md section shares (benchmarks/summarize.py and summarize_learning.py): reading a result
file, a matplotlib figure saved beside it, a section heading naming the command and machine, mean ± std cells."""

from __future__ import annotations

import json
import math
from pathlib import Path

DPI = 110


def load_result(results: Path, name: str) -> dict | None:
    path = results / f"{name}.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def new_figure():
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.0))
    return figure, figure.add_subplot()


def save_figure(figure, path: Path) -> str:
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    return path.name


def heading(title: str, data: dict) -> list[str]:
    return [title, "", f"`{data['command']}` — {machine_line(data)}", ""]


def machine_line(data: dict) -> str:
    m = data.get("machine", {})
    load = m.get("load_avg_1_5_15", [math.nan])[0]
    return f"{m.get('date_utc', '?')}, {m.get('cores', '?')} cores ({m.get('host_cpu', '?')}), load avg at start {load:.1f}, commit {m.get('git_commit', '?')}"


def pm(cell: dict | None) -> str:
    if not cell:
        return "–"
    return f"{100 * cell['mean']:.1f} ± {100 * cell['std']:.1f}"
