"""Shared driver: run one `fedssl simulate` per variant and tabulate probe accuracy and ε."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_variants(title: str, base_config: str, variants: dict[str, list[str]]) -> None:
    parser = argparse.ArgumentParser(description=title)
    parser.add_argument("--output-dir", default="runs/sweeps")
    parser.add_argument("--quick", action="store_true", help="2 sites x 2 rounds, tiny model (smoke run)")
    args = parser.parse_args()
    quick = ["--set", "federation.num_sites=2", "--set", "federation.rounds=2", "--set", "model.width=8",
             "--set", "training.local_steps=3", "--set", "evaluation.label_fractions=[0.1]",
             "--set", "evaluation.label_seeds=[0]", "--set", "evaluation.random_init_seeds=[0]",
             # 2 rounds x 3 steps fit eps 4 or 8 with sigma below the sites' default floor of 0.8: every site would
             # refuse (the preflight says so before starting). A smoke run, as configs/experiments/digits-tiny.yaml.
             "--set", "privacy.min_noise_multiplier=0.3"] if args.quick else []
    rows = []
    for name, overrides in variants.items():
        sets = [x for o in overrides for x in ("--set", o)]
        cmd = [sys.executable, "-m", "fedssl.cli", "simulate", base_config, "--overwrite", "--quiet",
               "--set", f"run.name={name}", "--set", f"run.output_dir={args.output_dir}", *sets, *quick]
        print(f"== {name}: {' '.join(overrides)}", flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
        run_dir = ROOT / args.output_dir / name
        evaluation = json.loads((run_dir / "evaluation.json").read_text())
        rows.append((name, evaluation))
    from fedssl.evaluation import EvalResults

    print(f"\n{title}")
    for name, evaluation in rows:
        print(f"\n### {name}\n{EvalResults.from_dict(evaluation).markdown_table()}")
