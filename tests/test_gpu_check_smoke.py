"""benchmarks/gpu_check.sh, the one prepared GPU check, runs end to end (GPU_CHECK_ALLOW_CPU=1: tiny sizes on the
CPU, tests/gpu skipped), so a session that is lent a GPU for 15 minutes does not spend them on a broken script."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench_run import ROOT, tiny_fashion


# What the lent GPU machine's image lacks and gpu_check.sh does not carry (KINDS.md of the device library: no flwr,
# no Ray, no mlxtend). The smoke run hides them, so a GPU step that came to import one fails here, not there.
ABSENT_ON_THE_GPU_IMAGE = ("flwr", "ray", "mlxtend")
HIDE_MODULES = f"""
import importlib.abc, sys
class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {ABSENT_ON_THE_GPU_IMAGE!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not on the GPU image)", name=name)
sys.meta_path.insert(0, _Absent())
"""


def test_the_hiding_works(tmp_path):
    """The smoke run's premise: with the sitecustomize on the path, the hidden packages do not import."""
    (tmp_path / "sitecustomize.py").write_text(HIDE_MODULES)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    probe = subprocess.run([sys.executable, "-c", "import flwr"], env=env, capture_output=True, text=True, timeout=60)
    assert probe.returncode == 1 and "not on the GPU image" in probe.stderr


@pytest.mark.slow
def test_the_prepared_gpu_check_runs_on_the_cpu_and_brings_every_result_back(tmp_path):
    out, hide = tmp_path / "out", tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(HIDE_MODULES)
    env = dict(os.environ, OUT=str(out), GPU_CHECK_ALLOW_CPU="1", GPU_CHECK_DATA=str(tiny_fashion(tmp_path)),
               PYTHON=sys.executable, PYTHONWARNINGS="ignore", PYTHONPATH=str(hide))
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
