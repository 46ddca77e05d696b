"""Every modality's experiment config, run as a user runs it: wall time and label efficiency, over seeds.

For each modality's config on its real data set (images: the embedded digits; text: Debian's fortunes; tables:
r-cran-modeldata's credit_data; time series: UEA JapaneseVowels from the aeon wheel; each converted once by
the command the README gives), `fedssl simulate CONFIG --set run.seed=S` runs with DP as configured (ε = 8)
and with `privacy.enabled=false`, for every seed S. Each run is the whole product path (Flower simulation,
evaluation, report) and reports, at the config's two label budgets, its own controls: the raw-feature baseline,
the random-init encoder's probe, the probe of features built from no data (images, series), and the pretrained
encoder's probe (and fine-tunes where the config has them).

Printed and written (results/modalities.json): per config, its wall time per run (the ≤ 5 min target on 2
cores), and per privacy setting and label budget the pretrained probe's gain over the random-init control,
paired by seed (each run's gain is its pretrained probe minus its own random-init probe, both averaged over
the config's label seeds), as mean ± std over the seeds; "beyond spread" when |mean| > std. The raw-feature
row is data-only (the same in every run).

    python benchmarks/modalities.py                       # every config whose data is present, seeds 0 1 2
    python benchmarks/modalities.py --config fortunes-mlm --seeds 0 1 2
    python benchmarks/modalities.py --config japanese-vowels --pretext ts_views   # another method, same data
    python benchmarks/modalities.py --quick               # digits-tiny, one seed: a smoke run
    python benchmarks/modalities.py --table               # the results file as a markdown table (gains in points)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PROJECT_ROOT, fedssl_simulate, machine_info, write_result  # noqa: E402

from fedssl.reporting import load_run  # noqa: E402

CONFIGS = PROJECT_ROOT / "configs" / "experiments"
# name -> (modality, the data file the config reads, how to make it)
MODALITIES = {
    "digits-demo": ("images", None, "embedded"),
    "fortunes-mlm": ("text", "data/fortunes/fortunes.txt", "python simulations/fortunes_to_text.py data/fortunes"),
    "credit-vime": ("tables", "data/credit/credit.csv", "python simulations/credit_to_table.py data/credit"),
    "japanese-vowels": ("time series", "data/japanese-vowels/JapaneseVowels.npy",
                        "python simulations/ucr_to_series.py data/japanese-vowels"),
}
QUICK = {"digits-tiny": ("images", None, "embedded")}
PROBE, CONTROL, RAW = "pretrained_probe", "random_init_probe", "raw_input"
HANDCRAFTED = "handcrafted_probe"  # images and time series: features built from no data (fedssl.evaluation.baselines)
FINETUNE, SCRATCH = "pretrained_finetune", "scratch_finetune"


def run_once(config: str, seed: int, private: bool, output_dir: Path, pretext: str | None = None,
             overrides: tuple[str, ...] = ()) -> dict:
    """One `fedssl simulate` (``pretext``: another method, its default parameters, in place of the config's;
    ``overrides``: more `--set KEY=VALUE`): its wall time and each row's mean accuracy per label fraction."""
    name = f"{config}-{pretext or 'config'}-{'dp' if private else 'nodp'}-s{seed}"
    sets = [f"run.seed={seed}", f"run.name={name}", f"run.output_dir={output_dir}"]
    if pretext:
        sets += [f"pretext.name={pretext}", "pretext.params={}"]
    sets += list(overrides)
    if not private:
        sets.append("privacy.enabled=false")
    done, seconds = fedssl_simulate(CONFIGS / f"{config}.yaml", sets)
    if done.returncode != 0:
        return {"seed": seed, "private": private, "seconds": seconds, "error": done.stderr.strip().splitlines()[-1:]}
    return {"seed": seed, "private": private, "seconds": seconds, **run_rows(output_dir / name)}


def run_rows(run_dir: Path) -> dict:
    """A finished run's evaluation: {row: {fraction: mean accuracy over its label seeds}} and its max ε
    (read through fedssl.reporting.load_run, the run dir's one reader)."""
    run = load_run(run_dir)
    rows: dict[str, dict[str, float]] = {}
    for (row, fraction), cell in run.evaluation.cells.items():
        rows.setdefault(row, {})[f"{fraction:g}"] = cell.mean
    epsilons = [r.epsilon for r in run.site_rounds if not math.isnan(r.epsilon)]  # NaN: not recorded (no DP)
    return {"rows": rows, "max_epsilon": max(epsilons, default=None), "num_test": run.evaluation.num_test}


def paired_gain(runs: list[dict], fraction: str, row: str = PROBE, control: str = CONTROL) -> dict:
    """``row`` minus the same run's ``control`` (default: the pretrained probe minus the random-init probe),
    over seeds: mean, std, n."""
    gains = [r["rows"][row][fraction] - r["rows"][control][fraction] for r in runs
             if "rows" in r and fraction in r["rows"].get(row, {}) and fraction in r["rows"].get(control, {})]
    if not gains:
        return {"mean": float("nan"), "std": 0.0, "n": 0, "beyond_spread": False}
    mean = statistics.fmean(gains) if gains else float("nan")
    std = statistics.stdev(gains) if len(gains) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(gains), "beyond_spread": len(gains) > 1 and abs(mean) > std}


def summarize(runs: list[dict]) -> dict:
    """Per privacy setting and label fraction: each row's mean over seeds and the paired gain."""
    out: dict[str, dict] = {}
    for private in (True, False):
        chosen = [r for r in runs if r["private"] is private and "rows" in r]
        if not chosen:
            continue
        fractions = sorted(chosen[0]["rows"][PROBE], key=float)
        out["dp" if private else "no_dp"] = {
            fraction: {
                **{row: statistics.fmean(r["rows"][row][fraction] for r in chosen)
                   for row in chosen[0]["rows"] if fraction in chosen[0]["rows"][row]},
                "gain_over_random_init": paired_gain(chosen, fraction),
                "finetune_gain_over_scratch": paired_gain(chosen, fraction, FINETUNE, SCRATCH),
                "gain_over_handcrafted": paired_gain(chosen, fraction, PROBE, HANDCRAFTED),
            }
            for fraction in fractions
        }
    return out


def _print(config: str, modality: str, runs: list[dict], summary: dict) -> None:
    walls = [r["seconds"] for r in runs]
    print(f"\n{config} ({modality}): {len(runs)} runs, wall {min(walls):.0f}-{max(walls):.0f} s"
          f" (max {max(walls) / 60:.1f} min)")
    for setting, by_fraction in summary.items():
        for fraction, cells in by_fraction.items():
            gain = cells["gain_over_random_init"]
            verdict = "beyond spread" if gain["beyond_spread"] else "within spread"
            print(f"  {setting:6s} {float(fraction):>5.0%} labels: raw {cells.get(RAW, float('nan')):.3f}  "
                  f"random-init {cells[CONTROL]:.3f}  pretrained {cells[PROBE]:.3f}  "
                  f"gain {gain['mean']:+.3f} ± {gain['std']:.3f} (n={gain['n']}, {verdict})")
            over_handcrafted = cells.get("gain_over_handcrafted", {"n": 0})
            if over_handcrafted["n"]:
                print(f"  {'':6s} {'':>5s}  handcrafted {cells[HANDCRAFTED]:.3f}: pretrained probe "
                      f"{over_handcrafted['mean']:+.3f} ± {over_handcrafted['std']:.3f} over it")
            tuned = cells["finetune_gain_over_scratch"]
            if tuned["n"]:
                print(f"  {'':6s} {'':>5s}  fine-tune: scratch {cells[SCRATCH]:.3f}  pretrained {cells[FINETUNE]:.3f}  "
                      f"gain {tuned['mean']:+.3f} ± {tuned['std']:.3f}")
    for r in runs:
        if "error" in r:
            print(f"  seed {r['seed']} {'dp' if r['private'] else 'no dp'}: FAILED {r['error']}")


def markdown(results: dict[str, dict]) -> str:
    """One row per (config variant, label fraction): the controls and the paired gains, in points."""
    lines = ["| config (+ variant) | modality | wall per run | labels | raw | random-init probe | DP ε=8 probe (gain) "
             "| no-DP probe (gain) | scratch fine-tune | DP ε=8 fine-tune (gain) | no-DP fine-tune (gain) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, entry in results.items():
        by_setting = summarize(entry.get("runs", []))  # recomputed: files written before a gain was added
        if not by_setting:
            continue
        walls = [r["seconds"] for r in entry["runs"]]
        fractions = next(iter(by_setting.values())).keys()
        for fraction in fractions:
            cells = {setting: by_setting[setting][fraction] for setting in by_setting}
            any_cells = next(iter(cells.values()))

            def cell(setting: str, row: str, gain_key: str) -> str:
                if setting not in cells or row not in cells[setting]:
                    return "—"
                gain = cells[setting].get(gain_key, {"n": 0})
                if not gain["n"]:
                    return f"{cells[setting][row]:.3f}"
                mark = "**" if gain["beyond_spread"] and gain["mean"] > 0 else ""
                return f"{cells[setting][row]:.3f} ({mark}{100 * gain['mean']:+.1f} ± {100 * gain['std']:.1f}{mark})"

            scratch = f"{any_cells[SCRATCH]:.3f}" if SCRATCH in any_cells else "—"
            lines.append(f"| {key} | {entry['modality']} | {min(walls):.0f}-{max(walls):.0f} s | {float(fraction):.0%} | "
                         f"{any_cells.get(RAW, float('nan')):.3f} | {any_cells[CONTROL]:.3f} | "
                         f"{cell('dp', PROBE, 'gain_over_random_init')} | {cell('no_dp', PROBE, 'gain_over_random_init')} | "
                         f"{scratch} | {cell('dp', FINETUNE, 'finetune_gain_over_scratch')} | "
                         f"{cell('no_dp', FINETUNE, 'finetune_gain_over_scratch')} |")
    return "\n".join(lines)


def _earlier_results(quick: bool) -> dict[str, dict]:
    from _common import results_dir

    try:
        earlier = json.loads((results_dir(quick) / "modalities.json").read_text())
        configs = earlier["configs"]
    except (OSError, ValueError, KeyError):
        return {}
    for entry in configs.values():  # files written before each entry kept its own machine facts
        entry.setdefault("machine", earlier.get("machine"))
        entry.setdefault("seeds", earlier.get("seeds"))
    return configs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", choices=sorted(MODALITIES), help="default: every one with data")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--no-dp-only", action="store_true", help="skip the DP runs")
    only.add_argument("--dp-only", action="store_true", help="skip the runs without DP")
    parser.add_argument("--pretext", help="another pretext method in place of each config's (results: CONFIG+METHOD)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run (results: CONFIG+...+KEY=VALUE)")
    parser.add_argument("--quick", action="store_true", help="digits-tiny, seed 0: a smoke run")
    parser.add_argument("--table", action="store_true", help="print the markdown table of the results file; run nothing")
    args = parser.parse_args(argv)
    if args.table:
        print(markdown(_earlier_results(args.quick)))
        return 0
    table = QUICK if args.quick else {name: MODALITIES[name] for name in (args.config or MODALITIES)}
    seeds = [0] if args.quick else args.seeds
    results = _earlier_results(args.quick)  # a run of some configs keeps the others' numbers
    ran: list[str] = []
    with tempfile.TemporaryDirectory(prefix="fedssl-modalities-") as tmp:
        for config, (modality, data, make) in table.items():
            if data and not (PROJECT_ROOT / data).exists():
                print(f"\n{config}: skipped, {data} is missing; make it with: {make}")
                results.setdefault(config, {"modality": modality, "skipped": f"{data} missing ({make})"})
                continue
            runs = [run_once(config, seed, private, Path(tmp), args.pretext, tuple(args.set))
                    for private in ((False,) if args.no_dp_only else (True,) if args.dp_only else (True, False)) for seed in seeds]
            summary = summarize(runs)
            key = "+".join([config, *([args.pretext] if args.pretext else []), *args.set])
            _print(key, modality, runs, summary)
            ran.append(key)
            results[key] = {"modality": modality, "pretext": args.pretext or "the config's", "overrides": args.set, "seeds": seeds,
                            "machine": machine_info(), "runs": runs, "summary": summary}
            write_result("modalities", {"configs": results}, args.quick)
    failed = [key for key in ran if any("error" in run for run in results[key]["runs"])]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
