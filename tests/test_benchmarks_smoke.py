"""Smoke test: every benchmark's --quick mode runs to completion and writes its JSON (the flagship's
scripts: tests/test_flagship_smoke.py).

Crash check only: the numbers of a --quick run mean nothing and are not asserted. The
benchmarks themselves are never part of the timed suite; this runs their tiny modes
(~1-2 minutes in total on 2 cores) and is marked slow.
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from bench_run import BENCH, run_bench

OURS = ["communication", "dp_overhead", "federation_overhead", "scale", "learning", "data_scale"]


@pytest.mark.slow
@pytest.mark.parametrize("name", OURS)
def test_quick_mode_runs(name, tmp_path):
    proc = run_bench([str(BENCH / f"{name}.py"), "--quick"], tmp_path)
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
    proc = run_bench([str(BENCH / "gpu.py"), "--allow-cpu", "--quick"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((tmp_path / "gpu_cpu_3x16x16.json").read_text())
    assert set(record["batches"]["16"]) == {"plain", "bookkeeping", "hooks"}
    assert all("samples_per_s" in engine for engine in record["batches"]["16"].values())


def test_gpu_benchmark_without_cuda_says_so_in_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the benchmark would run")
    proc = run_bench([str(BENCH / "gpu.py")], tmp_path, timeout=120)
    assert proc.returncode == 2 and proc.stdout.strip().count("\n") == 0 and "no CUDA device" in proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_summary_renders_from_quick_results(tmp_path):
    """summarize.py turns whatever results exist into SUMMARY.md without running anything: here the
    committed communication result (communication.py --quick itself is run above)."""

    shutil.copy(BENCH / "results" / "communication.json", tmp_path / "communication.json")
    for name in ("flagship_table_readout4.json", "flagship_table_readout4.md", "flagship_readout4_vs_epsilon.png",
                 "flagship_table_readout4_curve.json", "flagship_table_readout4_curve.md", "flagship_readout4_curve_vs_epsilon.png"):
        shutil.copy(BENCH / "results" / name, tmp_path / name)
    proc = run_bench([str(BENCH / "summarize.py"), str(tmp_path)], tmp_path, timeout=120)
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
    # digits are images: the pretrained probe is also paired with the Gabor bank's probe (features built from no data)
    over_bank = summary["dp"]["0.1"]["gain_over_handcrafted"]
    assert over_bank["n"] == 2 and over_bank["mean"] == pytest.approx(probe - read["rows"]["handcrafted_probe"]["0.1"] + 0.05)
    runs = [{**run, "seconds": 30.0} for run in runs]
    table = modalities.markdown({"digits-tiny": {"modality": "images", "runs": runs, "summary": summary}})
    assert f"| digits-tiny | images | 30-30 s | 10% | {read['rows']['raw_input']['0.1']:.3f} | {control:.3f} |" in table
    # the DP probe's paired gain; no run without DP and no fine-tune rows (the reference run probes only)
    assert table.splitlines()[-1].endswith(f"({100 * gain['mean']:+.1f} ± {100 * gain['std']:.1f}) | — | — | — | — |")


@pytest.mark.slow
def test_demo_repeats_summarises_finished_runs_and_refuses_an_unfinished_one(reference_run, tmp_path, monkeypatch, capsys):
    """benchmarks/demo_repeats.py --from-runs on the session's finished run, twice (new runs would be two more
    simulations): each gain per readout and fraction, over the runs, and whether the run's headline credited it."""
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setenv("FEDSSL_BENCH_OUT", str(tmp_path))
    import demo_repeats

    from fedssl.reporting import headline, load_run

    assert demo_repeats.main(["--from-runs", str(reference_run.dir), str(reference_run.dir)]) == 0
    record = json.loads((tmp_path / "demo_repeats.json").read_text())
    cell = record["runs"][0]["gains"]["probe"]["0.1"]  # digits-tiny: probe only, 10 % labels, one label seed
    credited_by_headline = any(s.startswith("At 10% labels the pretrained probe beat every control")
                               for s in headline(load_run(reference_run.dir).evaluation))
    assert cell["credited"] is credited_by_headline and cell["label_seeds"] == 1
    # digits are images: the gain over the handcrafted features (Gabor bank) is recorded beside the raw input's
    assert isinstance(cell["over_handcrafted"], float) and "gain over handcrafted features (range)" in record["table"]
    assert record["runs"][0]["run_name"] == "digits-tiny" and record["config"] is None  # each run names its own
    assert record["scored_on"] == "test" and "in test accuracy" in record["table"]
    summary = record["summary"]["probe"]["0.1"]
    assert summary["n"] == 2 and summary["std"] == 0 and summary["mean"] == pytest.approx(cell["gain"])
    assert f"| probe, 10% | {cell['gain']:+.1f} ± 0.0 |" in capsys.readouterr().out
    assert demo_repeats.main(["--from-runs", str(tmp_path)]) == 2  # not a run dir: one line, nothing written over
    assert capsys.readouterr().out.startswith(f"demo_repeats: {tmp_path}/metrics.jsonl not found")
    assert json.loads((tmp_path / "demo_repeats.json").read_text()) == record
    with pytest.raises(SystemExit):
        demo_repeats.main(["--runs", "1"])
    assert "--runs 1: at least 2" in capsys.readouterr().err
    # a run scored on validation (evaluation.score_on) is not one more draw of a run scored on test
    validated = tmp_path / "validated"
    shutil.copytree(reference_run.dir, validated)
    evaluation = json.loads((validated / "evaluation.json").read_text())
    evaluation["plan"]["score_on"] = "validation"
    (validated / "evaluation.json").write_text(json.dumps(evaluation))
    assert demo_repeats.main(["--from-runs", str(reference_run.dir), str(validated)]) == 2
    assert capsys.readouterr().out.strip() == ("demo_repeats: the runs were scored on different sets (test, validation): "
                                               "summarise each set's runs apart")
