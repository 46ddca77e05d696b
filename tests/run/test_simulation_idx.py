"""End to end on IDX data: `fedssl simulate` trains 2 sites for 1 round on tiny RGB IDX files (uint8 pixels,
resized at load) and evaluates on IDX labels read through the consent manifest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedssl.data.idx import write_idx

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "experiments" / "digits-tiny.yaml"
COUNT = 120


def test_simulate_on_idx_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = np.arange(COUNT, dtype=np.uint8) % 3
    # Class c is brighter in channel c: something a probe can pick up, in RGB stored channels-last.
    images = rng.integers(0, 120, size=(COUNT, 10, 10, 3), dtype=np.uint8)
    images[np.arange(COUNT), :, :, labels] += 120
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    config = tmp_path / "idx-tiny.yaml"
    config.write_text(yaml.safe_dump({
        "include": [str(TINY)],
        "run": {"name": "idx-tiny", "output_dir": str(tmp_path / "runs")},
        "data": {"source": str(tmp_path / "train-images-idx3-ubyte.gz"), "labels": str(tmp_path / "train-labels-idx1-ubyte"),
                 "image_size": [8, 8], "partition": "iid"},
        "federation": {"rounds": 1},
    }))
    done = subprocess.run(
        [str(Path(sys.executable).parent / "fedssl"), "simulate", str(config), "--overwrite"],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    run_dir = tmp_path / "runs" / "idx-tiny"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    trained = sorted((r["site_id"], r["status"]) for r in records if r["kind"] == "site_round")
    assert trained == [(0, "trained"), (1, "trained")]
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    # digits-tiny: test_fraction 0.3 of 120, consented_fraction 0.5 of the remaining 84 (a seeded demo consent)
    assert (evaluation["num_train"], evaluation["num_test"], evaluation["num_consented_train"]) == (84, 36, 42)
    raw = next(c for c in evaluation["cells"] if c["row"] == "raw_input")
    assert raw["mean"] > 0.6  # the labels reached the probe intact: class c is brighter in channel c (chance 1/3)
    consented = [line for line in (run_dir / "consent.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert len(consented) == 36 + 42 and all(line.startswith("row-") for line in consented)
