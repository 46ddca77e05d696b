"""benchmarks/gpu_check.sh, the one prepared GPU check, runs end to end (GPU_CHECK_ALLOW_CPU=1: tiny sizes on the
CPU, tests/gpu skipped), so a session that is lent a GPU for 15 minutes does not spend them on a broken script."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench_run import ROOT, tiny_fashion


@pytest.mark.slow
def test_the_prepared_gpu_check_runs_on_the_cpu_and_brings_every_result_back(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), GPU_CHECK_ALLOW_CPU="1", GPU_CHECK_DATA=str(tiny_fashion(tmp_path)),
               PYTHON=sys.executable, PYTHONWARNINGS="ignore")
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "run"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=400)
    log = (out / "gpu_check.log").read_text()
    assert proc.returncode == 0 and "gpu_check: passed" in log, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "3 skipped" in log  # tests/gpu: collected and importable; they run only where CUDA is
    assert {p.name for p in out.iterdir()} == {"gpu_check.log", "gpu_cpu_3x16x16.json", "flagship_table_gpu_short.json",
                                              "flagship_table_gpu_short.md", "flagship_gpu_short_vs_epsilon.png"}
    record = json.loads((out / "flagship_table_gpu_short.json").read_text())
    assert record["machine"]["device"] == "cpu" and "fed-eps8" in record["per_seed"]
    # A step that fails fails the check (here every step: an interpreter that exits 1 at once).
    failed = subprocess.run(["bash", "benchmarks/gpu_check.sh", "run"], cwd=ROOT, env={**env, "PYTHON": "false"},
                            capture_output=True, text=True, timeout=60)
    assert failed.returncode != 0 and "gpu_check: FAILED" in failed.stdout
