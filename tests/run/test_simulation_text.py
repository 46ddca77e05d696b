"""End to end on text: `fedssl simulate` pretrains a byte transformer by masked_tokens under DP,
2 sites x 2 rounds, on a tiny .txt file (one sample per line), then evaluates it on an id,label CSV of
class names (data.labels) against TF-IDF, the random-init control and scratch, and writes the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "experiments" / "digits-tiny.yaml"


def test_simulate_on_a_text_file(tmp_path: Path) -> None:
    topics = ["my card was stolen", "how much is the transfer fee", "open a savings account", "reset my password"]
    (tmp_path / "texts.txt").write_text("".join(f"{topics[i % 4]} ({i})\n" for i in range(80)), encoding="utf-8")
    names = ["card", "fees", "savings", "login"]
    (tmp_path / "labels.csv").write_text("id,label\n" + "".join(f"row-{i},{names[i % 4]}\n" for i in range(80)))
    config = tmp_path / "text-tiny.yaml"
    config.write_text(yaml.safe_dump({
        "include": [str(TINY)],
        "run": {"name": "text-tiny", "output_dir": str(tmp_path / "runs")},
        "data": {"source": str(tmp_path / "texts.txt"), "labels": str(tmp_path / "labels.csv"), "partition": "iid",
                 "max_length": 32},
        "model": {"encoder": "transformer", "width": 16, "depth": 1},
        "pretext": {"name": "masked_tokens", "params": {}},
        "evaluation": {"methods": ["linear_probe", "finetune"], "finetune_epochs": 2},
    }))
    done = subprocess.run(
        [str(Path(sys.executable).parent / "fedssl"), "simulate", str(config), "--overwrite"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    run_dir = tmp_path / "runs" / "text-tiny"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    trained = sorted((r["site_id"], r["status"]) for r in records if r["kind"] == "site_round")
    assert trained == [(0, "trained"), (0, "trained"), (1, "trained"), (1, "trained")]
    report = (run_dir / "report.md").read_text()
    for row in ("raw_input (tf-idf)", "random_init_probe", "pretrained_probe", "scratch_finetune", "pretrained_finetune"):
        assert f"| {row} |" in report, row
    assert "Classes: 0 card, 1 fees, 2 login, 3 savings." in report
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    tfidf = next(c for c in evaluation["cells"] if c["row"] == "raw_input")
    assert evaluation["raw_features"] == "tf-idf" and tfidf["mean"] >= 0.9  # the topic words decide the class
