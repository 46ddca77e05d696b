"""Each modality's experiment config end to end on its real data set: wall time against the 5-minute target.

One `fedssl simulate` per config, one after another in this process's machine state (the load average is
recorded with each), and the terminal table each run ends with (label efficiency with its controls):

  image        configs/experiments/digits-demo.yaml       the embedded digits (scikit-learn)
  text         configs/experiments/fortunes-mlm.yaml      Debian's fortunes: simulations/fortunes_to_text.py
  table        configs/experiments/credit-vime.yaml       r-cran-modeldata's credit_data: simulations/credit_to_table.py
  time series  configs/experiments/japanese-vowels.yaml   UEA JapaneseVowels (aeon wheel): simulations/ucr_to_series.py

A config whose data was not converted is reported as skipped, with the command that converts it.

    python benchmarks/modality_configs.py                      # all four
    python benchmarks/modality_configs.py --only text table
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PROJECT_ROOT, machine_info, write_result  # noqa: E402

TARGET_S = 300.0
CONFIGS = {
    "image": ("configs/experiments/digits-demo.yaml", None, None),
    "text": ("configs/experiments/fortunes-mlm.yaml", "data/fortunes/fortunes.txt",
             "apt-get install -y fortunes fortunes-min && python simulations/fortunes_to_text.py data/fortunes"),
    "table": ("configs/experiments/credit-vime.yaml", "data/credit/credit.csv",
              "apt-get install -y r-cran-modeldata && pip install '.[convert]' && python simulations/credit_to_table.py data/credit"),
    "timeseries": ("configs/experiments/japanese-vowels.yaml", "data/japanese-vowels/JapaneseVowels.npy",
                   "pip install --no-deps aeon && python simulations/ucr_to_series.py data/japanese-vowels"),
}


def run_one(name: str, out: Path) -> dict:
    config, data, convert = CONFIGS[name]
    if data is not None and not (PROJECT_ROOT / data).exists():
        print(f"modality_configs: {name}: skipped, {data} missing; convert it first: {convert}")
        return {"config": config, "skipped": f"{data} missing", "convert": convert}
    fedssl = str(Path(sys.executable).parent / "fedssl")
    command = [fedssl, "simulate", config, "--overwrite", "--set", f"run.output_dir={out}"]
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    table = [line for line in done.stdout.splitlines() if line.startswith(("|", "  ", "row", "fedssl:"))][-40:]
    print(f"modality_configs: {name}: exit {done.returncode}, {wall:.0f} s wall (target {TARGET_S:.0f} s), "
          f"load average {load_before:.1f} at start")
    print("\n".join(table))
    return {"config": config, "returncode": done.returncode, "wall_s": wall, "within_target": wall <= TARGET_S,
            "load_average_at_start": load_before, "stdout_tail": table,
            "stderr_tail": done.stderr[-1500:] if done.returncode else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedssl-modalities-") as tmp:
        results = {name: run_one(name, Path(tmp)) for name in args.only}
    path = write_result("modality_configs", {"machine": machine_info(), "target_s": TARGET_S, "runs": results}, quick=False)
    print(f"modality_configs: wrote {path}")


if __name__ == "__main__":
    main()
