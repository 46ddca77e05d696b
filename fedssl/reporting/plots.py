"""The report's PNG plots, drawn with matplotlib's object API so no global backend is touched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedssl.evaluation.results import (
    HANDCRAFTED_PROBE,
    RANDOM_INIT_PROBE,
    SCRATCH_FINETUNE,
    WARM_START_ROWS,
    EvalResults,
    format_fraction,
)
from fedssl.runlog import RoundRecord, SiteRound, group_by_site

FIGSIZE = (6.4, 4.0)
CONTROL_ROWS = (RANDOM_INIT_PROBE, SCRATCH_FINETUNE)  # dashed: no pretraining, the baseline to beat
ZERO_COST_ROWS = (HANDCRAFTED_PROBE, *WARM_START_ROWS)  # dotted: starts that cost no ε (no data, or public data)
DPI = 110


def _round_axis(axes: Axes) -> None:
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("round")


def _save(figure: Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    return path


def plot_pretext_loss(site_rounds: list[SiteRound], rounds: list[RoundRecord], path: Path) -> Path:
    """Per-site loss (trained rounds only: refused or failed rounds have no loss) and the round mean."""
    figure = Figure(figsize=FIGSIZE)
    axes = figure.add_subplot()
    for site_id, records in group_by_site(site_rounds).items():
        trained = [r for r in records if r.status == "trained"]
        losses = [r.pretext_loss for r in trained]
        axes.plot([r.round for r in trained], losses, marker=".", alpha=0.5, label=f"site {site_id}")
    if rounds:
        means = [r.mean_pretext_loss for r in rounds]
        axes.plot([r.round for r in rounds], means, color="black", linewidth=2.5, label="mean over trained sites")
    _round_axis(axes)
    axes.set(ylabel="pretext loss", title="Pretext loss per round")
    axes.legend(fontsize="small", ncol=2)
    return _save(figure, path)


def plot_epsilon(site_rounds: list[SiteRound], path: Path) -> Path:
    """Spent ε per site per round against each distinct budget."""
    figure = Figure(figsize=FIGSIZE)
    axes = figure.add_subplot()
    for site_id, records in group_by_site(site_rounds).items():
        accounted = [r for r in records if r.has_epsilon]
        if accounted:
            axes.plot([r.round for r in accounted], [r.epsilon for r in accounted], marker=".", label=f"site {site_id}")
    budgets = {r.target_epsilon for r in site_rounds if r.has_epsilon and np.isfinite(r.target_epsilon) and r.target_epsilon > 0}
    for budget in sorted(budgets):
        axes.axhline(budget, color="red", linestyle="--", label=f"budget ε={budget:g}")
    if axes.lines:
        axes.legend(fontsize="small", ncol=2)
    else:
        axes.text(0.5, 0.5, "no ε recorded: trained without differential privacy", ha="center", transform=axes.transAxes)
    _round_axis(axes)
    axes.set(ylabel="ε spent (sample-level)", title="Privacy spend per site")
    return _save(figure, path)


def plot_label_efficiency(results: EvalResults, path: Path) -> Path:
    """Accuracy vs label fraction for each row, error bars = std over seeds."""
    figure = Figure(figsize=FIGSIZE)
    axes = figure.add_subplot()
    fractions = results.evaluated_fractions()
    for offset, row in enumerate(results.rows):
        cells = [results.cell(row, fraction) for fraction in fractions]
        # Small multiplicative shifts keep overlapping error bars readable on the log axis.
        shifted = [fraction * (1 + 0.03 * (offset - len(results.rows) / 2)) for fraction in fractions]
        style = "--" if row in CONTROL_ROWS else ":" if row in ZERO_COST_ROWS else "-"
        means, stds = [c.mean for c in cells], [c.std for c in cells]
        axes.errorbar(shifted, means, yerr=stds, marker="o", capsize=3, linestyle=style, label=row)
    axes.set_xscale("log")
    axes.set_xticks(fractions, [format_fraction(fraction) for fraction in fractions])
    axes.minorticks_off()
    axes.set(xlabel="labelled fraction of the central pool", ylabel=f"{results.scored_set} accuracy", title="Label efficiency")
    axes.legend(fontsize="small")
    return _save(figure, path)
