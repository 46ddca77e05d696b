"""End to end on a table: `fedssl simulate` pretrains an MLP by VIME under DP at 2 sites x 2 rounds on a
tiny CSV with a declared and a hashed categorical column and empty cells, then evaluates with an id,label
CSV behind the demo consent (raw-feature baseline, random-init, pretrained probe)."""

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


def _bank(tmp_path: Path, rows: int = 160) -> tuple[Path, Path]:
    """A loan table whose label follows income and the home column, so a probe has something to find."""
    rng = np.random.default_rng(0)
    homes, jobs = ["rent", "owner", "parents", ""], ["fixed", "freelance", "partime", "odd-job"]
    lines, labels = ["id,age,income,home,job"], ["id,label"]
    for i in range(rows):
        home, income = homes[i % 4], rng.normal(5 + (i % 2), 0.5)
        lines.append(f"a{i},{rng.integers(18, 70)},{'' if i % 17 == 0 else f'{income:.3f}'},{home},{jobs[i % 3 + (i % 11 == 0)]}")
        labels.append(f"a{i},{int(i % 2 == 1 or home == 'owner')}")
    (tmp_path / "bank.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "labels.csv").write_text("\n".join(labels) + "\n")
    return tmp_path / "bank.csv", tmp_path / "labels.csv"


def test_simulate_vime_on_a_table_with_categorical_columns(tmp_path: Path) -> None:
    source, labels = _bank(tmp_path)
    config = tmp_path / "table-tiny.yaml"
    config.write_text(yaml.safe_dump({
        "include": [str(TINY)],
        "run": {"name": "table-tiny", "output_dir": str(tmp_path / "runs")},
        "data": {"source": str(source), "labels": str(labels), "partition": "iid",
                 "categories": {"home": ["rent", "owner", "parents"]}, "categorical": ["job"], "hash_buckets": 4},
        "model": {"encoder": "mlp", "width": 16, "depth": 2},
        "pretext": {"name": "vime", "params": {}},
    }))
    done = subprocess.run(
        [str(Path(sys.executable).parent / "fedssl"), "simulate", str(config), "--overwrite"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    run_dir = tmp_path / "runs" / "table-tiny"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    trained = sorted((r["site_id"], r["status"]) for r in records if r["kind"] == "site_round")
    assert trained == [(0, "trained"), (0, "trained"), (1, "trained"), (1, "trained")]
    assert all(0 < r["epsilon"] <= 8 for r in records if r["kind"] == "site_round")
    # the encoder's input: age, income, home (3 values + other + missing), job (4 buckets + missing)
    import torch

    encoder = torch.load(run_dir / "encoder.pt", weights_only=True)
    first = next(v for k, v in encoder.items() if k.endswith("weight") and v.ndim == 2)
    assert first.shape[1] == 2 + 5 + 5
    results = json.loads((run_dir / "evaluation.json").read_text())
    assert "raw_input" in json.dumps(results) and "pretrained_probe" in json.dumps(results)
