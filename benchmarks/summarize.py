"""Render benchmarks/results/*.json into SUMMARY.md and PNG plots (matplotlib object API, no GUI).

    python benchmarks/summarize.py [RESULTS_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR  # noqa: E402
from summarize_learning import flagship_section, learning_section  # noqa: E402
from summary_format import heading, load_result, new_figure, save_figure  # noqa: E402

# ------------------------------------------------------------------------ sections


def dp_section(results: Path) -> list[str]:
    data = load_result(results, "dp_overhead")
    if not data:
        return []
    modes = ["bookkeeping", "hooks", "functorch", "ew", "ghost"]
    lines = [*heading("## 1. DP overhead (DP-SGD step / plain step, same encoder and batch)", data),
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
    figure, axes = new_figure()
    tasks = list(data["tasks"])
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        values = [data["tasks"][t]["modes"].get(mode, {}).get("ratio_vs_plain", {}).get("median", 0.0) for t in tasks]
        axes.bar([j + i * width for j in range(len(tasks))], values, width=width, label=mode)
    axes.axhline(data["target_ratio"], color="k", linestyle="--", linewidth=1, label="target")
    axes.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks, fontsize=8)
    axes.set_ylabel("DP step / plain step")
    axes.legend(fontsize=8)
    lines += [f"![DP overhead]({save_figure(figure, results / 'dp_overhead.png')})", ""]
    return lines


def federation_section(results: Path) -> list[str]:
    data = load_result(results, "federation_overhead")
    if not data:
        return []
    s = data["summary"]
    lines = [*heading("## 2. Federation overhead in simulation", data),
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
    data = load_result(results, "federation_overhead_rounds")
    if not data:
        return []
    target = data["settings"]["target_ratio"]
    lines = [*heading("### Ratio vs run length", data),
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
    data = load_result(results, "scale")
    if not data:
        return []
    lines = [*heading("## 3. Scale: 100 and 1000 sites, 10 sampled per round", data),
             "| sites | copies of the data held by all sites | wall (s) | round times (s) | peak PSS (GiB) | processes |",
             "|---|---|---|---|---|---|"]
    for n, d in data["data"].items():
        run = data.get("flower", {}).get(str(n)) or data.get("flower", {}).get(n) or {}
        rounds = ", ".join(f"{x:.1f}" for x in run.get("round_s", [])) or "–"
        lines.append(f"| {n} | {d['copies_of_the_data']:.3f} ({d['samples_per_site_min']}–{d['samples_per_site_max']} samples/site) | "
                     f"{run.get('wall_s', float('nan')):.1f} | {rounds} | {run.get('peak_pss_gib', float('nan')):.2f} | {run.get('peak_processes', '–')} |")
    return lines + [""]


def data_scale_section(results: Path) -> list[str]:
    data = load_result(results, "data_scale")
    if not data:
        return []
    n, summary = data["config"]["num_images"], data["summary"]
    lines = [*heading(f"## 8. Data at scale: one site, {n} 64x64 RGB images", data),
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
    data = load_result(results, "communication")
    if not data:
        return []
    lines = [*heading("## 4. Communication: upload per site per round vs encoder size", data),
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
