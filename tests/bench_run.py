"""Running a benchmark script as its user does, for the benchmark smoke tests (tests/test_*_smoke.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def run_bench(args: list[str], out: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """``python <args>`` from the checkout, its results under ``out`` (FEDSSL_BENCH_OUT), warnings off."""
    env = dict(os.environ, FEDSSL_BENCH_OUT=str(out), PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
