"""One config run several times as a user runs it: how far one run's headline is one draw.

Each `fedssl simulate` of the same config (the same run.seed: the same init, partition and label subsets) draws
fresh DP noise at its sites, and its report judges each gain against the spread over its own label seeds only.
Over the runs this gives each paired gain (pretrained minus its random-init control, or scratch for the
fine-tune) as mean ± std, its smallest value, and how many runs' headlines credited it (beyond that run's
label-seed spread over every control: its random-init control, the raw input and, where the run has them, the
handcrafted features and the warm start; fedssl.reporting.verdicts.headline_gains).

    python benchmarks/demo_repeats.py --runs 8                        # the demo's config, ~2 min a run on 2 cores
    python benchmarks/demo_repeats.py --runs 4 --set 'evaluation.label_seeds=[0,1,2,3,4]'
    python benchmarks/demo_repeats.py --from-runs DIR [DIR ...]       # summarise finished run dirs, no new runs

Writes results/demo_repeats.json (per run and summary) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PROJECT_ROOT, fedssl_simulate, machine_info, write_result  # noqa: E402

from fedssl.layout import EVALUATION_FILE  # noqa: E402
from fedssl.reporting import load_run  # noqa: E402
from fedssl.evaluation.results import HANDCRAFTED_PROBE, RAW_INPUT  # noqa: E402
from fedssl.reporting.verdicts import beats_every, headline_gains  # noqa: E402

DEMO = PROJECT_ROOT / "configs" / "experiments" / "digits-demo.yaml"


def simulate(config: Path, output_dir: Path, overrides: list[str]) -> tuple[Path, float]:
    """One `fedssl simulate` of ``config`` into ``output_dir``: its run dir and wall seconds."""
    done, seconds = fedssl_simulate(config, [f"run.output_dir={output_dir}", *overrides])
    if done.returncode != 0:
        raise ValueError(f"fedssl simulate {config} failed (rc {done.returncode}): {done.stderr.strip()[-500:]}")
    evaluated = sorted(output_dir.glob(f"*/{EVALUATION_FILE}"))
    if not evaluated:
        raise ValueError(f"{config}: its run wrote no {EVALUATION_FILE} (evaluation.enabled: true is needed)")
    return evaluated[0].parent, seconds


def read_run(run_dir: Path) -> dict:
    """A finished run's paired gains per readout and label fraction, in points, and whether its headline
    credited each."""
    run = load_run(run_dir)
    results = run.evaluation
    if results is None:
        raise ValueError(f"{run_dir}: no {EVALUATION_FILE}; pass the dir of a finished, evaluated run")
    gains: dict[str, dict[str, dict]] = {}
    for readout, per_fraction in headline_gains(results).items():
        for over in per_fraction:
            control, by_baseline = over[0], {gain.baseline: 100 * gain.delta for gain in over}
            gains.setdefault(readout, {})[f"{control.fraction:g}"] = {
                "gain": 100 * control.delta, "spread": 100 * control.spread, "label_seeds": control.seeds,
                "over_raw": by_baseline[RAW_INPUT], "over_handcrafted": by_baseline.get(HANDCRAFTED_PROBE),
                "credited": beats_every(over),
            }
    return {"run_dir": str(run_dir), "run_name": run.run_name, "scored_on": results.scored_set, "gains": gains}


def scored_on(runs: list[dict]) -> str:
    """The set every run was scored on (test or validation: evaluation.score_on); runs that differ are not one sample."""
    sets = sorted({run["scored_on"] for run in runs})
    if len(sets) > 1:
        raise ValueError(f"the runs were scored on different sets ({', '.join(sets)}): summarise each set's runs apart")
    return sets[0]


def summarize(runs: list[dict]) -> dict:
    """Per readout and fraction, over the runs: the gain's mean, std, min; the over-raw range; runs credited."""
    summary: dict[str, dict[str, dict]] = {}
    cells = [(readout, fraction) for readout, by_fraction in runs[0]["gains"].items() for fraction in by_fraction]
    for readout, fraction in cells:
        found = [run["gains"][readout][fraction] for run in runs if fraction in run["gains"].get(readout, {})]
        values = [cell["gain"] for cell in found]
        summary.setdefault(readout, {})[fraction] = {
            "n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "min": min(values), "max": max(values),
            "positive": sum(value > 0 for value in values), "credited": sum(cell["credited"] for cell in found),
            **_range("over_raw", [cell["over_raw"] for cell in found]),
            **_range("over_handcrafted", [cell.get("over_handcrafted") for cell in found]),
        }
    return summary


def _range(name: str, values: list[float | None]) -> dict[str, float]:
    """``{name}_min`` and ``{name}_max`` over the runs that measured it; nothing when none did (runs without the row)."""
    measured = [value for value in values if value is not None]
    return {f"{name}_min": min(measured), f"{name}_max": max(measured)} if measured else {}


def markdown(summary: dict, scored: str) -> str:
    handcrafted = any("over_handcrafted_min" in s for by_fraction in summary.values() for s in by_fraction.values())
    lines = [f"| readout, label fraction | gain over its control in {scored} accuracy, mean ± std over runs (points) | smallest | "
             "runs with a positive gain | runs whose headline credits it | gain over raw input (range) |"
             + (" gain over handcrafted features (range) |" if handcrafted else ""),
             "|---|---|---|---|---|---|" + ("---|" if handcrafted else "")]
    for readout, by_fraction in summary.items():
        for fraction, s in by_fraction.items():
            extra = f" {_span(s, 'over_handcrafted')} |" if handcrafted else ""
            lines.append(f"| {readout}, {float(fraction):.0%} | {s['mean']:+.1f} ± {s['std']:.1f} | {s['min']:+.1f} | "
                         f"{s['positive']} of {s['n']} | {s['credited']} of {s['n']} | {_span(s, 'over_raw')} |{extra}")
    return "\n".join(lines)


def _span(summary: dict, name: str) -> str:
    if f"{name}_min" not in summary:
        return "n/a"
    return f"{summary[f'{name}_min']:+.1f} to {summary[f'{name}_max']:+.1f}"


def run_all(args: argparse.Namespace) -> list[dict]:
    runs = []
    with tempfile.TemporaryDirectory(prefix="fedssl-demo-repeats-") as tmp:
        for index in range(args.runs):
            run_dir, seconds = simulate(args.config, Path(tmp) / f"run{index}", args.overrides)
            runs.append({**read_run(run_dir), "run_dir": f"run{index}", "seconds": seconds})
            print(f"demo_repeats: run {index + 1}/{args.runs} done in {seconds:.0f} s", flush=True)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEMO, help="the experiment config (default: the demo's)")
    parser.add_argument("--runs", type=int, default=8, help="how many runs of it")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to every run as `fedssl simulate --set`")
    parser.add_argument("--from-runs", nargs="+", type=Path, metavar="DIR", help="summarise these finished run dirs instead")
    args = parser.parse_args(argv)
    if args.runs < 2 and not args.from_runs:
        parser.error(f"--runs {args.runs}: at least 2 (one run has no spread over runs)")
    try:
        runs = [read_run(path) for path in args.from_runs] if args.from_runs else run_all(args)
        scored = scored_on(runs)
    except ValueError as err:
        print(f"demo_repeats: {err}")
        return 2
    summary = summarize(runs)
    table = markdown(summary, scored)
    config = None if args.from_runs else str(args.config)  # finished runs: each names its own run
    path = write_result("demo_repeats", {"machine": machine_info(), "config": config, "overrides": args.overrides,
                                         "scored_on": scored, "runs": runs, "summary": summary, "table": table}, quick=False)
    print(table)
    print(f"demo_repeats: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
