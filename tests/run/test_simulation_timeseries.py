"""End to end on time series: `fedssl simulate` pretrains conv1d by masked_segment under DP, 2 sites x 2
rounds, on a tiny variable-length .npy (NaN tails) with an id,label CSV, then the linear-probe evaluation
with its controls (the raw baseline on flattened series, ROCKET's random kernels, the random-init encoder)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "experiments" / "digits-tiny.yaml"


def test_simulate_on_time_series_with_an_evaluation(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = np.arange(120) % 3
    steps = np.arange(24)
    series = np.stack([np.stack([np.sin(steps * (k + 1) / 4 + rng.normal()), rng.normal(size=24)]) for k in labels])
    series[::4, :, 18:] = np.nan  # every fourth series is 18 steps long
    np.save(tmp_path / "series.npy", series.astype(np.float32))
    (tmp_path / "labels.csv").write_text("id,label\n" + "".join(f"row-{i},c{k}\n" for i, k in enumerate(labels)))
    config = tmp_path / "series-tiny.yaml"
    config.write_text(yaml.safe_dump({
        "include": [str(TINY)],
        "run": {"name": "series-tiny", "output_dir": str(tmp_path / "runs")},
        "data": {"source": str(tmp_path / "series.npy"), "kind": "timeseries", "labels": str(tmp_path / "labels.csv"),
                 "series_length": 20, "partition": "iid"},
        "model": {"encoder": "conv1d", "width": 8, "depth": 2},
        "pretext": {"name": "masked_segment", "params": {}},
        "evaluation": {"label_fractions": [0.5], "methods": ["linear_probe"]},
    }))
    done = subprocess.run(
        [str(Path(sys.executable).parent / "fedssl"), "simulate", str(config), "--overwrite"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    run_dir = tmp_path / "runs" / "series-tiny"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    trained = sorted((r["site_id"], r["status"]) for r in records if r["kind"] == "site_round")
    assert trained == [(0, "trained"), (0, "trained"), (1, "trained"), (1, "trained")]
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    text = json.dumps(evaluation)
    assert "raw" in text and "random" in text  # the controls were scored
    # ... and the zero-cost start for series: ROCKET's random kernels, probed on the same labels
    assert evaluation["handcrafted_features"] == "rocket" and "handcrafted_probe" in evaluation["rows"]
    assert "| handcrafted_probe (rocket) |" in (run_dir / "report.md").read_text()
    assert (run_dir / "report.md").is_file()
