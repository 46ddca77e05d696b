"""report.md, plots and terminal summary built from a small hand-written run directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from fedssl.errors import DataError
from fedssl.config import EvaluationConfig
from fedssl.evaluation import (
    HANDCRAFTED_PROBE,
    PRETRAINED_PROBE,
    RANDOM_INIT_PROBE,
    RAW_INPUT,
    WARM_START_PROBE,
    Cell,
    EvalResults,
    FractionInfo,
    SeedRun,
)
from fedssl.reporting import (
    ONE_RUN_IS_ONE_DRAW,
    handcrafted_verdict,
    headline,
    pretraining_verdict,
    privacy_statement,
    raw_input_verdict,
    terminal_summary,
    warm_start_verdict,
    write_report,
)

CONFIG = {
    "run": {"name": "tiny"},
    "federation": {"num_sites": 2, "rounds": 3, "strategy": "fedavg"},
    "model": {"encoder": "cnn", "width": 16, "depth": 2, "input_shape": [1, 28, 28], "readout": 0},
    "pretext": {"name": "rotation"},
    "privacy": {"enabled": True, "target_epsilon": 3.0, "delta": 1e-5, "max_grad_norm": 1.0, "accountant": "rdp"},
}
# (site, round, status, epsilon, pretext loss): site 1 runs out of budget in round 3.
SITE_ROUNDS = [
    (0, 1, "trained", 1.0, 2.0), (0, 2, "trained", 1.8, 1.5), (0, 3, "trained", 2.5, 1.2),
    (1, 1, "trained", 1.2, 2.2), (1, 2, "trained", 2.9, 1.7), (1, 3, "refused", 2.9, float("nan")),
]  # fmt: skip


def site_round(site: int, round_: int, status: str, epsilon: float, loss: float) -> dict[str, object]:
    return {
        "kind": "site_round", "round": round_, "site_id": site, "node_id": 100 + site, "status": status,
        "epsilon": epsilon, "target_epsilon": 3.0, "delta": 1e-5, "pretext_loss": loss,
        "num_examples": 50, "steps": 10, "train_seconds": 0.5,
    }  # fmt: skip


def round_record(round_: int) -> dict[str, object]:
    trained = [r for r in SITE_ROUNDS if r[1] == round_ and r[2] == "trained"]
    return {
        "kind": "round", "round": round_, "num_sites": 2, "num_trained": len(trained),
        "mean_pretext_loss": sum(r[4] for r in trained) / len(trained),
        "max_epsilon": max(r[3] for r in SITE_ROUNDS if r[1] == round_), "seconds": 1.5,
    }  # fmt: skip


def cell(accuracies: list[float], init_seed: int | None = None) -> Cell:
    return Cell(tuple(SeedRun(seed, init_seed, accuracy) for seed, accuracy in enumerate(accuracies)))


def evaluation() -> EvalResults:
    """At 1% pretraining ties the random-init control (paired differences -0.02, +0.04, +0.01); at 10%
    it clearly beats it (+0.10, +0.09, +0.11)."""
    cells = {
        (RAW_INPUT, 0.01): cell([0.50, 0.52, 0.54]),
        (RANDOM_INIT_PROBE, 0.01): cell([0.62, 0.58, 0.63], init_seed=0),
        (PRETRAINED_PROBE, 0.01): cell([0.60, 0.62, 0.64]),
        (RAW_INPUT, 0.1): cell([0.70, 0.71, 0.72]),
        (RANDOM_INIT_PROBE, 0.1): cell([0.80, 0.82, 0.81], init_seed=0),
        (PRETRAINED_PROBE, 0.1): cell([0.90, 0.91, 0.92]),
    }
    return EvalResults(
        plan=EvaluationConfig(label_fractions=[0.01, 0.1], methods=["linear_probe"]),
        rows=[RAW_INPUT, RANDOM_INIT_PROBE, PRETRAINED_PROBE],
        fractions=[FractionInfo(0.01, 10), FractionInfo(0.1, 100)],
        cells=cells, num_train=1000, num_consented_train=500, num_test=300, seconds=1.0,
    )  # fmt: skip


def warm_start_evaluation() -> EvalResults:
    """evaluation() plus the warm start the federation began from.

    At 1% the private step's paired gain is inside its spread; at 10% the per-seed differences
    (0.02, 0.03, 0.03) are consistent, so it is beyond its paired spread, although an unpaired
    comparison (sum of both stds, 0.045) would call +0.027 noise.
    """
    results = evaluation()
    results.rows = [RAW_INPUT, RANDOM_INIT_PROBE, WARM_START_PROBE, PRETRAINED_PROBE]
    results.cells[(WARM_START_PROBE, 0.01)] = cell([0.61, 0.60, 0.62])  # differences -0.01, +0.02, +0.02
    results.cells[(WARM_START_PROBE, 0.1)] = cell([0.84, 0.86, 0.88])
    results.cells[(PRETRAINED_PROBE, 0.1)] = cell([0.86, 0.89, 0.91])
    return results


# What the server logs for a reply it could not attribute: no metrics, site unknown.
FAILED_REPLY = {"kind": "site_round", "round": 2, "site_id": -1, "node_id": 7, "status": "failed", "reason": "timeout"}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    lines = [site_round(*record) for record in SITE_ROUNDS] + [FAILED_REPLY] + [round_record(r) for r in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    (tmp_path / "evaluation.json").write_text(json.dumps(evaluation().to_dict()))
    (tmp_path / "summary.json").write_text(json.dumps({"wall_seconds": 42.25, "run_name": "tiny"}))
    return tmp_path


def test_report_has_plots_and_the_input_numbers(run_dir: Path) -> None:
    report = write_report(run_dir).read_text()

    for name in ("pretext_loss.png", "epsilon.png", "label_efficiency.png"):
        with Image.open(run_dir / name) as image:
            assert image.format == "PNG" and image.width > 100
        assert f"]({name})" in report
    assert "| 0 | 3 | 2.500 | 3 | 83% | trained (round 3) |" in report
    assert "| 1 | 2 | 2.900 | 3 | 97% | refused (round 3) |" in report
    assert "| -1 |" not in report and "- round 2, node 7: timeout" in report
    assert "| rounds | 3 completed (planned 3) |" in report
    assert "| wall time | 42.2 s |" in report
    assert "| encoder | cnn, width 16, depth 2, features pooled 4x4 |" in report  # readout 0 resolved for 28x28
    assert "| pretrained_probe | 0.620 ± 0.020 | 0.910 ± 0.010 |" in report
    assert "| raw_input (pixels) | 0.520 ± 0.020 | 0.710 ± 0.010 |" in report


def test_report_says_why_dp_sites_show_no_pretext_loss(run_dir: Path) -> None:
    assert "No site released a pretext loss" not in write_report(run_dir).read_text()
    # As the server records DP sites' replies: they carry no loss (fedssl.fl.keys.DP_RELEASED_METRICS).
    lines = [site_round(*record[:4], float("nan")) | {"train_seconds": None} for record in SITE_ROUNDS]
    lines += [round_record(r) | {"mean_pretext_loss": None} for r in (1, 2, 3)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    report = write_report(run_dir).read_text()
    assert "No site released a pretext loss" in report and "without noise" in report
    assert (run_dir / "pretext_loss.png").is_file()


def test_report_credits_pretraining_only_beyond_the_random_init_spread(run_dir: Path) -> None:
    report = write_report(run_dir).read_text()
    assert "At 1% labels, pretrained_probe 0.620 vs random_init_probe 0.610: difference +0.010, " \
           "within the seed spread (±0.030), so no measurable gain from pretraining." in report  # fmt: skip
    assert "At 10% labels, pretrained_probe 0.910 vs random_init_probe 0.810: difference +0.100, " \
           "beyond the seed spread (±0.010): pretraining added 0.100 accuracy." in report  # fmt: skip


def test_report_judges_each_pretrained_row_against_the_raw_input_too(run_dir: Path) -> None:
    report = write_report(run_dir).read_text()
    assert "### Against the raw input" in report
    assert "- At 1% labels, pretrained_probe 0.620 vs raw_input 0.520: +0.100 ± 0.000 (over 3 paired label seeds), " \
           "beyond the seed spread: better than the raw input." in report  # fmt: skip
    results = evaluation()
    results.cells[(RAW_INPUT, 0.01)] = cell([0.61, 0.60, 0.66])  # differences -0.01, +0.02, -0.02
    assert raw_input_verdict(results)[0].endswith("(over 3 paired label seeds), within the seed spread: "
                                                  "no better than the raw input.")  # fmt: skip


NO_GAIN = ("At no label fraction did a pretrained readout beat every control (raw_input, random_init_probe) beyond "
           "the seed spread: this run shows no measurable gain from pretraining.")


def test_headline_credits_only_a_gain_over_both_controls(run_dir: Path) -> None:
    # At 1% the pretrained probe beats raw input but not its random-init control; at 10% both.
    both = ("At 10% labels the pretrained probe beat every control beyond the seed spread: +0.100 ± 0.010 over "
            "random_init_probe, +0.200 ± 0.000 over raw_input.")  # fmt: skip
    assert headline(evaluation()) == [both]
    # The verdicts, then what their spread leaves out: the pretraining ran once (one draw of its DP noise).
    assert f"**Headline**\n\n- {both}\n\n{ONE_RUN_IS_ONE_DRAW}\n" in write_report(run_dir).read_text()
    terminal = terminal_summary(run_dir).splitlines()
    assert terminal[terminal.index(both) + 1] == ONE_RUN_IS_ONE_DRAW
    assert "label seeds within this one run" in ONE_RUN_IS_ONE_DRAW and "repeat the run" in ONE_RUN_IS_ONE_DRAW
    # The same gain over random init, but the raw input is as good: no headline gain anywhere.
    results = evaluation()
    results.cells[(RAW_INPUT, 0.1)] = cell([0.91, 0.90, 0.93])
    assert headline(results) == [NO_GAIN]
    # A pretrained readout worse than its control beyond the spread is said in the headline too.
    results = evaluation()
    results.cells[(PRETRAINED_PROBE, 0.1)] = cell([0.70, 0.71, 0.72])  # -0.10, -0.11, -0.09 against random init
    assert headline(results)[1:] == [
        "At 10% labels the pretrained probe did worse than random_init_probe beyond the seed spread (-0.100 ± 0.010)."
    ]
    # Nor from a single label seed, whatever the difference.
    results = evaluation()
    for row, accuracy in ((RAW_INPUT, 0.5), (RANDOM_INIT_PROBE, 0.5), (PRETRAINED_PROBE, 0.99)):
        results.cells[(row, 0.1)] = cell([accuracy], init_seed=0 if row == RANDOM_INIT_PROBE else None)
    assert headline(results)[0].startswith("At no label fraction")


def handcrafted_evaluation() -> EvalResults:
    """evaluation() plus the probe of features built from no data: at 10% it scores 0.93, 0.92, 0.94, above the
    pretrained probe that beats both other controls there (paired differences -0.03, -0.01, -0.02)."""
    results = evaluation()
    results.rows = [RAW_INPUT, HANDCRAFTED_PROBE, RANDOM_INIT_PROBE, PRETRAINED_PROBE]
    results.handcrafted_features = "gabor bank"
    results.cells[(HANDCRAFTED_PROBE, 0.01)] = cell([0.55, 0.57, 0.56])
    results.cells[(HANDCRAFTED_PROBE, 0.1)] = cell([0.93, 0.92, 0.94])
    return results


def test_headline_credits_no_gain_a_zero_cost_start_also_gets(run_dir: Path) -> None:
    # The attack on the headline: an encoder that beats its random-init control and the raw input but not the
    # Gabor bank any site could use at ε = 0 must not be credited with a gain from pretraining.
    results = handcrafted_evaluation()
    assert headline(results) == [
        "At no label fraction did a pretrained readout beat every control (raw_input, handcrafted_probe, "
        "random_init_probe) beyond the seed spread: this run shows no measurable gain from pretraining.",
        "At 10% labels the pretrained probe beat random_init_probe and raw_input beyond the seed spread but not the "
        "zero-privacy-cost start (-0.020 ± 0.010 over handcrafted_probe): no gain credited.",
    ]
    # The same bank, beaten beyond its spread at 10% (differences +0.05, +0.04, +0.06): credited, over all three.
    results.cells[(HANDCRAFTED_PROBE, 0.1)] = cell([0.85, 0.87, 0.86])
    assert headline(results)[0] == ("At 10% labels the pretrained probe beat every control beyond the seed spread: "
                                    "+0.100 ± 0.010 over random_init_probe, +0.200 ± 0.000 over raw_input, "
                                    "+0.050 ± 0.010 over handcrafted_probe.")  # fmt: skip
    # A tie with the bank (differences +0.01, -0.01, +0.02) is no gain either.
    results.cells[(HANDCRAFTED_PROBE, 0.1)] = cell([0.89, 0.92, 0.90])
    assert headline(results)[0].startswith("At no label fraction")


def test_headline_needs_a_gain_over_the_warm_start_too() -> None:
    results = warm_start_evaluation()  # at 10% the private step added +0.027 ± 0.006 over the warm start: credited
    assert headline(results) == ["At 10% labels the pretrained probe beat every control beyond the seed spread: "
                                 "+0.077 ± 0.021 over random_init_probe, +0.177 ± 0.015 over raw_input, "
                                 "+0.027 ± 0.006 over warm_start_probe."]  # fmt: skip
    results.cells[(WARM_START_PROBE, 0.1)] = cell([0.88, 0.89, 0.90])  # the warm start alone was as good
    assert headline(results)[1] == ("At 10% labels the pretrained probe beat random_init_probe and raw_input beyond "
                                    "the seed spread but not the zero-privacy-cost start (-0.003 ± 0.015 over "
                                    "warm_start_probe): no gain credited.")  # fmt: skip
    assert headline(results)[0].startswith("At no label fraction did a pretrained readout beat every control "
                                           "(raw_input, random_init_probe, warm_start_probe)")


def test_report_judges_each_pretrained_row_against_the_handcrafted_features(run_dir: Path) -> None:
    assert "features built from no data" not in write_report(run_dir).read_text()  # this run has no such row
    assert not any(line.startswith("gain over handcrafted") for line in terminal_summary(run_dir).splitlines())
    (run_dir / "evaluation.json").write_text(json.dumps(handcrafted_evaluation().to_dict()))
    report = write_report(run_dir).read_text()
    assert "| handcrafted_probe (gabor bank) | 0.560 ± 0.010 | 0.930 ± 0.010 |" in report
    assert report.index("| raw_input (pixels) |") < report.index("| handcrafted_probe (gabor bank) |") \
        < report.index("| random_init_probe |")  # fmt: skip
    assert "### Against features built from no data" in report
    assert ("- At 10% labels, pretrained_probe 0.910 vs handcrafted_probe 0.930: -0.020 ± 0.010 (over 3 paired label "
            "seeds), beyond the seed spread: worse than features built from no data.") in report  # fmt: skip
    lines = terminal_summary(run_dir).splitlines()
    assert any(line.split() == ["gain", "over", "handcrafted", "(probe)", "+0.060", "-0.020"] for line in lines)
    assert "gain over handcrafted = pretrained minus the probe of gabor bank (features built from no data, no ε), " \
           "paired by label seed" in lines  # fmt: skip
    assert any(line.split() == ["handcrafted_probe", "(gabor", "bank)", "0.560±0.010", "0.930±0.010"] for line in lines)
    assert handcrafted_verdict(evaluation()) == []  # no such row (text, tables, series), no such verdict


def test_report_without_warm_start_has_no_warm_start_rows_or_verdict(run_dir: Path) -> None:
    report = write_report(run_dir).read_text()
    assert "warm_start" not in report and "private-step gain" not in report and "over its warm start" not in report
    assert not any("private-step" in line for line in terminal_summary(run_dir).splitlines())


@pytest.fixture
def warm_run_dir(run_dir: Path) -> Path:
    (run_dir / "evaluation.json").write_text(json.dumps(warm_start_evaluation().to_dict()))
    return run_dir


def test_report_states_what_the_private_step_added_over_the_warm_start(warm_run_dir: Path) -> None:
    report = write_report(warm_run_dir).read_text()
    assert "| warm_start_probe | 0.610 ± 0.010 | 0.860 ± 0.020 |" in report
    assert report.index("| random_init_probe |") < report.index("| warm_start_probe |") < report.index("| pretrained_probe |")
    assert "### What the private federated step added over its warm start" in report
    assert "At 1% labels, pretrained_probe 0.620 vs warm_start_probe 0.610: private-step gain +0.010 ± 0.017 " \
           "(over 3 paired label seeds), within the seed spread, so the ε spent bought no measurable gain over the " \
           "zero-cost warm start." in report  # fmt: skip
    assert "At 10% labels, pretrained_probe 0.887 vs warm_start_probe 0.860: private-step gain +0.027 ± 0.006 " \
           "(over 3 paired label seeds), beyond the seed spread: the private federated step added 0.027 accuracy over " \
           "its zero-cost warm start." in report  # fmt: skip
    # The random-init comparison is still there, unchanged in kind.
    assert "At 10% labels, pretrained_probe 0.887 vs random_init_probe 0.810: difference +0.077" in report
    lines = terminal_summary(warm_run_dir).splitlines()
    assert any(line.split() == ["private-step", "gain", "(probe)", "+0.010", "ns", "+0.027"] for line in lines)
    assert any(line.split() == ["warm_start_probe", "0.610±0.010", "0.860±0.020"] for line in lines)


def test_warm_start_verdict_names_a_loss_and_a_single_seed() -> None:
    results = warm_start_evaluation()
    results.cells[(PRETRAINED_PROBE, 0.1)] = cell([0.80, 0.81, 0.83])  # differences -0.04, -0.05, -0.05
    results.cells[(WARM_START_PROBE, 0.01)] = cell([0.60])
    results.cells[(PRETRAINED_PROBE, 0.01)] = cell([0.64])
    single, worse = warm_start_verdict(results)
    assert single == "At 1% labels, pretrained_probe 0.640 vs warm_start_probe 0.600: private-step gain +0.040 " \
                     "from a single label seed, so the spread is unknown and no gain over the zero-cost warm start " \
                     "can be claimed."  # fmt: skip
    assert worse.startswith("At 10% labels, pretrained_probe 0.813 vs warm_start_probe 0.860: private-step gain -0.047 ± 0.006")
    assert worse.endswith("beyond the seed spread: the private federated step left the encoder worse than its zero-cost "
                          "warm start.")  # fmt: skip
    assert warm_start_verdict(evaluation()) == []


def test_report_without_optional_files(run_dir: Path) -> None:
    for name in ("config.yaml", "evaluation.json", "summary.json"):
        (run_dir / name).unlink()
    report = write_report(run_dir).read_text()
    assert "No evaluation.json" in report and "not recorded" in report
    assert not (run_dir / "label_efficiency.png").exists()


def test_bad_metrics_line_names_the_line(run_dir: Path) -> None:
    with (run_dir / "metrics.jsonl").open("a") as handle:
        handle.write('{"kind": "round", "round": 4}\n')
    with pytest.raises(DataError, match=r"metrics.jsonl:11: round record lacks num_sites"):
        write_report(run_dir)


def test_terminal_summary_is_a_fixed_width_table(run_dir: Path) -> None:
    lines = terminal_summary(run_dir).splitlines()
    assert lines[0] == "run tiny: 2 sites, 3 rounds, wall 42.2 s"
    assert lines[1].split() == ["site", "rounds", "eps", "budget", "used", "status"]
    assert lines[3].split() == ["1", "2", "2.900", "3", "97%", "refused"]
    assert lines[1].index("used") + len("used") == lines[3].index("97%") + len("97%")  # right-aligned
    failed = lines.index("1 failed site replies, left out of aggregation:")
    assert lines[failed + 1] == "  round 2, node 7: timeout"  # each failure on its own line, with its reason
    assert any(line.split() == ["pretrained_probe", "0.620±0.020", "0.910±0.010"] for line in lines)
    assert any(line.split() == ["pretraining", "gain", "(probe)", "+0.010", "ns", "+0.100"] for line in lines)
    assert any(line.split() == ["gain", "over", "raw", "input", "(probe)", "+0.100", "+0.200"] for line in lines)


def test_run_without_dp_shows_no_epsilon(tmp_path: Path) -> None:
    record = site_round(0, 1, "trained", -1.0, 1.0) | {"target_epsilon": -1.0, "train_seconds": None}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"privacy": {"enabled": False}}))
    report = write_report(tmp_path).read_text()
    assert "| 0 | 1 | n/a | n/a | n/a | trained (round 1) |" in report
    assert "| privacy target | none: trained without differential privacy |" in report
    assert "No differential privacy" in report


def test_privacy_statement_names_scope_and_limits(run_dir: Path) -> None:
    text = privacy_statement(CONFIG, run_dir)
    # Each site's own last epsilon (never an average), at the configured delta.
    assert "sample-level" in text and "2.500" in text and "2.900" in text and "1e-05" in text
    assert "no site-level (user-level) differential privacy" in text and "consented" in text
    assert "No differential privacy" in privacy_statement({"privacy": {"enabled": False}}, run_dir)


def test_single_seed_difference_is_never_called_a_gain() -> None:
    results = evaluation()
    results.cells[(PRETRAINED_PROBE, 0.1)] = cell([0.95])
    results.cells[(RANDOM_INIT_PROBE, 0.1)] = cell([0.80], init_seed=0)
    assert pretraining_verdict(results)[1].endswith("from a single seed, so the spread is unknown and no gain "
                                                    "from pretraining can be claimed.")  # fmt: skip
