"""Running a benchmark script as its user does, for the benchmark smoke tests (tests/test_*_smoke.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def run_bench(args: list[str], out: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """``python <args>`` from the checkout, its results under ``out`` (FEDSSL_BENCH_OUT), warnings off."""
    env = dict(os.environ, FEDSSL_BENCH_OUT=str(out), PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def tiny_fashion(tmp_path: Path) -> Path:
    """Tiny files in Fashion-MNIST's IDX format and names (CI has no Fashion-MNIST)."""
    from fedssl.data.idx import write_idx

    rng = np.random.default_rng(0)
    data = tmp_path / "fashion"
    data.mkdir()
    for split, count in (("train", 300), ("t10k", 100)):
        labels = np.arange(count, dtype=np.uint8) % 10
        write_idx(data / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8))
        write_idx(data / f"{split}-labels-idx1-ubyte.gz", labels)
    return data
