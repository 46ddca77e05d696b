"""End to end on IDX data with the ResNet-GN: `fedssl simulate` trains 2 DP sites for 1 round on tiny RGB IDX
files (uint8 pixels, resized at load), the server and both sites building the ResNet from the same spec,
and evaluates on IDX labels read through the consent manifest. (One run checks both: a Flower simulation
is ~45 CPU-s on the 2-core CI machine.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fedssl.data.idx import write_idx
from fedssl.models import build_encoder

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
        "model": {"encoder": "resnet", "width": 4, "depth": 1},
        "federation": {"rounds": 1},
    }))
    done = subprocess.run(
        [str(Path(sys.executable).parent / "fedssl"), "simulate", str(config), "--overwrite"],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    run_dir = tmp_path / "runs" / "idx-tiny"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    sites = [r for r in records if r["kind"] == "site_round"]
    assert sorted((r["site_id"], r["status"]) for r in sites) == [(0, "trained"), (1, "trained")]
    assert all(0 < r["epsilon"] <= 8.0 for r in sites)
    final = torch.load(run_dir / "encoder.pt", weights_only=True)
    initial = build_encoder("resnet", (3, 8, 8), width=4, depth=1, seed=0).state_dict()
    assert set(final) == set(initial)  # the ResNet-GN, as the server built it from the run's spec
    assert any(not torch.equal(final[k], initial[k]) for k in initial if initial[k].is_floating_point())
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    # digits-tiny: test_fraction 0.3 of 120, consented_fraction 0.5 of the remaining 84 (a seeded demo consent)
    assert (evaluation["num_train"], evaluation["num_test"], evaluation["num_consented_train"]) == (84, 36, 42)
    raw = next(c for c in evaluation["cells"] if c["row"] == "raw_input")
    assert raw["mean"] > 0.6  # the labels reached the probe intact: class c is brighter in channel c (chance 1/3)
    consented = [line for line in (run_dir / "consent.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert len(consented) == 36 + 42 and all(line.startswith("row-") for line in consented)
