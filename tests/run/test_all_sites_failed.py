"""End to end: a real `fedssl simulate` whose every site fails in round 1 stops there, exit 2, one line.

The failure is one preflight cannot know: the preflight reads the .npy header only (shape, count), and
with model.input_shape given the coordinator never loads the rows, so the NaN in row 3 first surfaces
when each site loads its data inside its Flower ClientApp.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
FEDSSL = str(Path(sys.executable).parent / "fedssl")


def test_a_round_where_every_site_failed_stops_the_run_with_its_error(tmp_path):
    images = np.random.default_rng(0).random((40, 8, 8)).astype(np.float32)
    images[3, 2, 2] = np.nan
    source = tmp_path / "scans.npy"
    np.save(source, images)
    overrides = [f"data.source={source}", "data.partition=iid", "evaluation.enabled=false", "federation.num_sites=2",
                 "simulation.max_parallel_sites=1",
                 "federation.rounds=2", "model.input_shape=[1,8,8]", "model.width=8", "model.depth=2",
                 "training.local_steps=1", "training.batch_size=4", "privacy.enabled=false",
                 f"run.output_dir={tmp_path / 'runs'}", "run.name=nan-row"]
    check = subprocess.run([FEDSSL, "check", str(ROOT / "configs" / "base.yaml"), *[a for o in overrides for a in ("--set", o)]],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr  # nothing in the config or the header gives it away

    started = time.perf_counter()
    run = subprocess.run([FEDSSL, "simulate", str(ROOT / "configs" / "base.yaml"), *[a for o in overrides for a in ("--set", o)]],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - started
    errors = [line for line in run.stderr.splitlines() if line.startswith("fedssl: error:")]
    assert run.returncode == 2, run.stderr[-3000:] + run.stdout[-3000:]
    assert errors == [f"fedssl: error: round 1: all 2 sampled sites failed; first error (site-0): {source}: "
                      "sample 'row-3' contains NaN or infinite values; clean or drop it"], run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    run_dir = tmp_path / "runs" / "nan-row"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert {r["round"] for r in records} == {1}  # round 2 never started
    assert sorted(r["last_site_id"] for r in records if r["kind"] == "site_round") == [0, 1]
    assert "round 2" not in run.stdout
    assert not (run_dir / "server_done.json").exists() and (run_dir / "server_failed.json").exists()
    print(f"all-sites-failed run: exit {run.returncode} after {seconds:.1f} s")
