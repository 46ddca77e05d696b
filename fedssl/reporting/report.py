"""runs/<name>/report.md with its plots, and a short terminal summary, from a run directory's files."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fedssl.evaluation.results import (
    PRETRAINED_FINETUNE,
    PRETRAINED_PROBE,
    RANDOM_INIT_PROBE,
    RAW_INPUT,
    SCRATCH_FINETUNE,
    WARM_START_FINETUNE,
    WARM_START_PROBE,
    EvalResults,
    Gain,
    format_fraction,
)
from fedssl.layout import EPSILON_PLOT, LABEL_EFFICIENCY_PLOT, PRETEXT_PLOT, RunDir
from fedssl.reporting.plots import plot_epsilon, plot_label_efficiency, plot_pretext_loss
from fedssl.reporting.privacy import privacy_statement
from fedssl.reporting.run_files import RunFiles, load_run
from fedssl.reporting.site_spend import SiteSpend, format_optional, site_spends
from fedssl.runlog import SiteRound


# Each pretrained row is judged only against the row that differs from it by pretraining alone.
COMPARISONS = {"probe": (PRETRAINED_PROBE, RANDOM_INIT_PROBE), "finetune": (PRETRAINED_FINETUNE, SCRATCH_FINETUNE)}
# With a warm start, each pretrained row is also judged against the encoder the federation began
# from (public data, no ε), paired run by run: what the private federated step itself added.
WARM_START_COMPARISONS = {
    "probe": (PRETRAINED_PROBE, WARM_START_PROBE),
    "finetune": (PRETRAINED_FINETUNE, WARM_START_FINETUNE),
}
# Each pretrained row is also judged against the raw input read out by a linear classifier on the
# same labels: a representation that loses to the input it was computed from is not worth using.
# Paired by label seed (both rows have one run per label seed).
RAW_INPUT_COMPARISONS = {"probe": (PRETRAINED_PROBE, RAW_INPUT), "finetune": (PRETRAINED_FINETUNE, RAW_INPUT)}
NAME_WIDTH, CELL_WIDTH = 28, 15
SITE_COLUMN_WIDTHS = (4, 6, 7, 7, 5)  # site, rounds, eps, budget, used; status runs free


def _section(config: dict[str, Any], name: str) -> dict[str, Any]:
    value = config.get(name)
    return value if isinstance(value, dict) else {}


def _distinct(values: list[float]) -> str:
    return ", ".join(f"{value:g}" for value in sorted(set(values))) or "n/a"


def _privacy_target(run: RunFiles) -> str:
    if _section(run.config, "privacy").get("enabled") is False:
        return "none: trained without differential privacy"
    accounted = [r for r in run.site_rounds if r.has_epsilon]
    epsilons = _distinct([r.target_epsilon for r in accounted])
    return f"ε = {epsilons}, δ = {_distinct([r.delta for r in accounted])} (per site, sample-level)"


def _wall_time(run: RunFiles) -> str:
    seconds = run.summary.get("wall_seconds")
    return f"{seconds:.1f} s" if isinstance(seconds, (int, float)) else "not recorded (no summary.json)"


def _run_summary(run: RunFiles) -> list[str]:
    federation, model = _section(run.config, "federation"), _section(run.config, "model")
    planned_sites, planned_rounds = federation.get("num_sites", "?"), federation.get("rounds", "?")
    facts = [
        ("sites", f"{len(run.site_ids)} reporting (planned {planned_sites})"),
        ("rounds", f"{len(run.rounds)} completed (planned {planned_rounds})"),
        ("pretext", str(_section(run.config, "pretext").get("name", "unknown (no config.yaml)"))),
        ("encoder", f"{model.get('encoder', '?')}, width {model.get('width', '?')}, depth {model.get('depth', '?')}"),
        ("strategy", str(federation.get("strategy", "?"))),
        ("privacy target", _privacy_target(run)),
        ("wall time", _wall_time(run)),
    ]
    return ["| | |", "|---|---|", *(f"| {name} | {value} |" for name, value in facts)]


def _budget_cells(site: SiteSpend) -> list[str]:
    """site, rounds trained, final ε, budget, % used: shared by the report and the terminal."""
    return [
        str(site.site_id),
        str(site.rounds_trained),
        format_optional(site.final_epsilon, ".3f"),
        format_optional(site.budget, "g"),
        format_optional(site.percent_used, ".0f", "%"),
    ]


def _epsilon_table(run: RunFiles) -> list[str]:
    lines = ["| site | rounds trained | final ε | budget ε | % used | last status |", "|---|---|---|---|---|---|"]
    for site in site_spends(run.site_rounds):
        cells = [*_budget_cells(site), f"{site.last_status} (round {site.last_round})"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _failure_lines(run: RunFiles) -> list[str]:
    if not run.failures:
        return []
    return [
        "",
        f"{len(run.failures)} site replies failed and were left out of aggregation:",
        "",
        *(f"- round {f.round}, {failed_site(f)}: {f.reason or 'no reason recorded'}" for f in run.failures),
    ]


def failed_site(record: SiteRound) -> str:
    """Which site a failed reply came from, as far as the server could tell."""
    site = record.site_id if record.site_id >= 0 else record.last_site_id
    return f"site {site} (node {record.node_id})" if site >= 0 else f"node {record.node_id}"


def describe_gain(results: EvalResults, gain: Gain) -> str:
    """One sentence per comparison; a gain inside the seed spread is called what it is: nothing measurable."""
    ours, theirs = results.cell(gain.row, gain.fraction), results.cell(gain.baseline, gain.fraction)
    head = (
        f"At {format_fraction(gain.fraction)} labels, {gain.row} {ours.mean:.3f} vs {gain.baseline} "
        f"{theirs.mean:.3f}: difference {gain.delta:+.3f}"
    )
    if not gain.spread_known:
        return f"{head}, from a single seed, so the spread is unknown and no gain from pretraining can be claimed."
    if gain.within_spread:
        return f"{head}, within the seed spread (±{gain.spread:.3f}), so no measurable gain from pretraining."
    if gain.delta > 0:
        return f"{head}, beyond the seed spread (±{gain.spread:.3f}): pretraining added {gain.delta:.3f} accuracy."
    return f"{head}, beyond the seed spread (±{gain.spread:.3f}): the pretrained encoder did worse than a random one."


def _gains(results: EvalResults, comparisons: dict[str, tuple[str, str]], gain) -> dict[str, list[Gain]]:
    """Per readout (probe, finetune): ``gain(row, baseline, fraction)`` at each evaluated fraction,
    for the comparisons whose two rows this evaluation has."""
    return {
        readout: [gain(row, baseline, fraction) for fraction in results.evaluated_fractions()]
        for readout, (row, baseline) in comparisons.items()
        if row in results.rows and baseline in results.rows
    }


def _pretraining_gains(results: EvalResults) -> dict[str, list[Gain]]:
    """Pretrained minus its random-init control (init seeds averaged, so unpaired)."""
    return _gains(results, COMPARISONS, results.gain)


def _raw_input_gains(results: EvalResults) -> dict[str, list[Gain]]:
    """Pretrained minus the raw-input classifier, paired by label seed."""
    return _gains(results, RAW_INPUT_COMPARISONS, results.paired_gain)


def _counts(gain: Gain) -> bool:
    return gain.spread_known and not gain.within_spread and gain.delta > 0


def headline(results: EvalResults) -> list[str]:
    """Where the pretrained encoder beat both honest controls beyond the seed spread, or that it did nowhere.

    The two controls are the same network without pretraining (random-init probe, or trained from
    scratch) and the raw input; a gain over only one of them is not what pretraining is for.
    """
    over_random, over_raw = _pretraining_gains(results), _raw_input_gains(results)
    found = []
    for readout in [name for name in over_random if name in over_raw]:
        for control, raw in zip(over_random[readout], over_raw[readout]):
            if _counts(control) and _counts(raw):
                found.append(
                    f"At {format_fraction(control.fraction)} labels the pretrained {readout} beat both controls "
                    f"beyond the seed spread: {control.delta:+.3f} ± {control.spread:.3f} over {control.baseline}, "
                    f"{raw.delta:+.3f} ± {raw.spread:.3f} over {raw.baseline}."
                )
    if found or not over_random:
        return found
    return [
        "At no label fraction did a pretrained readout beat both its random-init control and the raw input "
        "beyond the seed spread: this run shows no measurable gain from pretraining."
    ]


def raw_input_verdict(results: EvalResults) -> list[str]:
    """What each pretrained readout scored against the raw-input classifier on the same labels."""
    return [
        describe_paired_gain(results, gain, "the raw input")
        for gains in _raw_input_gains(results).values()
        for gain in gains
    ]


def describe_paired_gain(results: EvalResults, gain: Gain, baseline: str) -> str:
    """One sentence for a paired comparison with `baseline` (words)."""
    ours, theirs = results.cell(gain.row, gain.fraction), results.cell(gain.baseline, gain.fraction)
    head = f"At {format_fraction(gain.fraction)} labels, {gain.row} {ours.mean:.3f} vs {gain.baseline} {theirs.mean:.3f}"
    if not gain.spread_known:
        return f"{head}: {gain.delta:+.3f} from a single label seed, so the spread is unknown."
    measured = f"{head}: {gain.delta:+.3f} ± {gain.spread:.3f} (over {gain.seeds} paired label seeds)"
    if gain.within_spread:
        return f"{measured}, within the seed spread: no better than {baseline}."
    return f"{measured}, beyond the seed spread: {'better' if gain.delta > 0 else 'worse'} than {baseline}."


def pretraining_verdict(results: EvalResults) -> list[str]:
    """What pretraining added, measured only against the random-init controls."""
    return [describe_gain(results, gain) for gains in _pretraining_gains(results).values() for gain in gains]


def describe_warm_start_gain(results: EvalResults, gain: Gain) -> str:
    """One sentence: the private federated step's paired gain over its zero-cost warm start."""
    ours, theirs = results.cell(gain.row, gain.fraction), results.cell(gain.baseline, gain.fraction)
    head = f"At {format_fraction(gain.fraction)} labels, {gain.row} {ours.mean:.3f} vs {gain.baseline} {theirs.mean:.3f}"
    if not gain.spread_known:
        return (
            f"{head}: private-step gain {gain.delta:+.3f} from a single label seed, so the spread is unknown "
            "and no gain over the zero-cost warm start can be claimed."
        )
    measured = f"{head}: private-step gain {gain.delta:+.3f} ± {gain.spread:.3f} (over {gain.seeds} paired label seeds)"
    if gain.within_spread:
        return f"{measured}, within the seed spread, so the ε spent bought no measurable gain over the zero-cost warm start."
    if gain.delta > 0:
        return f"{measured}, beyond the seed spread: the private federated step added {gain.delta:.3f} accuracy over its zero-cost warm start."
    return f"{measured}, beyond the seed spread: the private federated step left the encoder worse than its zero-cost warm start."


def _warm_start_gains(results: EvalResults) -> dict[str, list[Gain]]:
    """Pretrained minus the warm start it began from, paired by seed."""
    return _gains(results, WARM_START_COMPARISONS, results.paired_gain)


def warm_start_verdict(results: EvalResults) -> list[str]:
    """What the private federated step added over its warm start; empty when the run had none."""
    return [describe_warm_start_gain(results, gain) for gains in _warm_start_gains(results).values() for gain in gains]


def _evaluation_section(run: RunFiles) -> list[str]:
    results = run.evaluation
    if results is None:
        return ["No evaluation.json in this run directory: evaluation was disabled or has not run."]
    lines = [
        f"Test accuracy (mean ± std over {len(results.plan.label_seeds)} label seeds; random-init rows also over "
        f"init seeds). Labels come only from consented samples: {results.num_consented_train} of "
        f"{results.num_train} train examples, {results.num_test} test examples. Every row uses the same label "
        f"subsets."
        + (
            " The warm_start rows score the encoder the federation started from (pretrained on public data, no ε "
            "spent), read out exactly like the pretrained rows."
            if results.has_warm_start
            else ""
        ),
        "",
        results.markdown_table(),
    ]
    if results.class_names:
        lines += ["", "Classes: " + ", ".join(f"{i} {name}" for i, name in enumerate(results.class_names)) + "."]
    if results.evaluated_fractions():
        plot_label_efficiency(results, run.run_dir / LABEL_EFFICIENCY_PLOT)
        lines += ["", f"![label efficiency]({LABEL_EFFICIENCY_PLOT})"]
    verdict = pretraining_verdict(results)
    if verdict:
        lines += [
            "",
            "### What pretraining added",
            "",
            "Measured against a randomly initialised encoder of the same shape, read out the same way on the "
            "same label subsets; a gain the random encoder also gets is not credited to pretraining.",
            "",
            *(f"- {sentence}" for sentence in verdict),
        ]
    against_raw = raw_input_verdict(results)
    if against_raw:
        lines += [
            "",
            "### Against the raw input",
            "",
            "The raw input read out by a linear classifier on the same labels (pixels, feature columns, or TF-IDF "
            "of text), run by run on the same label subsets: an encoder that loses to its own input is not worth "
            "using, whatever it gains over a random one.",
            "",
            *(f"- {sentence}" for sentence in against_raw),
        ]
    warm_start = warm_start_verdict(results)
    if warm_start:
        lines += [
            "",
            "### What the private federated step added over its warm start",
            "",
            "The federation started from a warm start pretrained on public data at no privacy cost, so the "
            "gains above include what that warm start already gave. Here each pretrained row is compared with "
            "the warm start read out the same way, run by run on the same label subsets and seeds: the gain is "
            "the mean ± std of the per-seed differences, and a gain within that spread is not credited to the "
            "ε spent.",
            "",
            *(f"- {sentence}" for sentence in warm_start),
        ]
    return lines


def _pretext_loss_note(run: RunFiles) -> list[str]:
    """Say why the loss plot is empty when the sites trained under DP: they keep their loss."""
    trained = [r for r in run.site_rounds if r.status == "trained"]
    if not trained or any(math.isfinite(r.pretext_loss) for r in trained):
        return []
    return [
        "",
        "No site released a pretext loss: under differential privacy a site keeps it, because it is an exact "
        "average over the site's records, computed without noise (docs/privacy.md, \"What a site releases\").",
    ]


def _headline_lines(run: RunFiles) -> list[str]:
    if run.evaluation is None:
        return []
    return ["**Headline.** " + " ".join(headline(run.evaluation)), ""] if headline(run.evaluation) else []


def write_report(run_dir: Path) -> Path:
    """Write report.md and its PNG plots into `run_dir`; returns the report path."""
    run = load_run(Path(run_dir))
    plot_pretext_loss(run.site_rounds, run.rounds, run.run_dir / PRETEXT_PLOT)
    plot_epsilon(run.site_rounds, run.run_dir / EPSILON_PLOT)
    lines = [
        f"# fedssl run report: {run.run_name}",
        "",
        "## Run summary",
        "",
        *_run_summary(run),
        "",
        "## Privacy spend per site",
        "",
        *_epsilon_table(run),
        *_failure_lines(run),
        "",
        f"![epsilon per round]({EPSILON_PLOT})",
        "",
        "## Pretext training",
        "",
        f"![pretext loss]({PRETEXT_PLOT})",
        *_pretext_loss_note(run),
        "",
        "## Label efficiency",
        "",
        *_headline_lines(run),
        *_evaluation_section(run),
        "",
        "## Privacy statement",
        "",
        privacy_statement(run.config, run.run_dir),
        "",
    ]
    path = RunDir(run.run_dir).report
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _gain_mark(gain: Gain) -> str:
    if not gain.spread_known:
        return " 1s"
    return " ns" if gain.within_spread else ""


def _gain_line(name: str, gains: list[Gain]) -> str:
    cells = [f"{g.delta:+.3f}{_gain_mark(g)}" for g in gains]
    return f"{name:<{NAME_WIDTH}}" + "".join(f"{c:>{CELL_WIDTH}}" for c in cells)


def _terminal_evaluation(results: EvalResults) -> list[str]:
    fractions = results.evaluated_fractions()
    lines = [f"{'accuracy':<{NAME_WIDTH}}" + "".join(f"{format_fraction(f):>{CELL_WIDTH}}" for f in fractions)]
    for row in results.rows:
        cells = [results.cell(row, f) for f in fractions]
        lines.append(f"{results.row_title(row):<{NAME_WIDTH}}" + "".join(f"{f'{c.mean:.3f}±{c.std:.3f}':>{CELL_WIDTH}}" for c in cells))
    for readout, gains in _pretraining_gains(results).items():
        lines.append(_gain_line(f"pretraining gain ({readout})", gains))
    for readout, gains in _raw_input_gains(results).items():
        lines.append(_gain_line(f"gain over raw input ({readout})", gains))
    warm_start_gains = _warm_start_gains(results)
    for readout, gains in warm_start_gains.items():
        lines.append(_gain_line(f"private-step gain ({readout})", gains))
    lines += results.skip_notes()
    lines += headline(results)
    if warm_start_gains:
        lines.append("private-step gain = pretrained minus its warm start (no ε), paired by label seed")
    return lines + ["gain = pretrained minus random-init control; ns = within the seed spread, 1s = single seed: "
                    "neither is a measurable gain"]


def _fixed_width(cells: list[str]) -> str:
    return "  ".join(f"{cell:>{width}}" for cell, width in zip(cells, SITE_COLUMN_WIDTHS)) + f"  {cells[-1]}"


def terminal_summary(run_dir: Path) -> str:
    """A short fixed-width summary for the end of a CLI run."""
    run = load_run(Path(run_dir))
    lines = [
        f"run {run.run_name}: {len(run.site_ids)} sites, {len(run.rounds)} rounds, wall {_wall_time(run)}",
        _fixed_width(["site", "rounds", "eps", "budget", "used", "status"]),
    ]
    lines += [_fixed_width([*_budget_cells(site), site.last_status]) for site in site_spends(run.site_rounds)]
    if run.failures:
        lines.append(f"{len(run.failures)} failed site replies, left out of aggregation:")
        lines += [f"  round {f.round}, {failed_site(f)}: {f.reason or 'no reason recorded'}" for f in run.failures]
    if run.evaluation is not None:
        lines += _terminal_evaluation(run.evaluation)
    return "\n".join(lines)
