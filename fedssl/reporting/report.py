"""runs/<name>/report.md with its plots, and a short terminal summary, from a run directory's files."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fedssl.evaluation.results import EvalResults, Gain, format_fraction
from fedssl.inputs import AUTO_READOUT, READOUT_ENCODERS, readout_grid
from fedssl.layout import EPSILON_PLOT, LABEL_EFFICIENCY_PLOT, PRETEXT_PLOT, RunDir
from fedssl.reporting.plots import plot_epsilon, plot_label_efficiency, plot_pretext_loss
from fedssl.reporting.privacy import privacy_statement
from fedssl.reporting.run_files import RunFiles, load_run
from fedssl.reporting.site_spend import SiteSpend, format_optional, site_spends
from fedssl.reporting.verdicts import (
    ONE_RUN_IS_ONE_DRAW,
    handcrafted_gains,
    handcrafted_verdict,
    headline,
    pretraining_gains,
    pretraining_verdict,
    raw_input_gains,
    raw_input_verdict,
    warm_start_gains,
    warm_start_verdict,
)
from fedssl.runlog import SiteRound


NAME_WIDTH, CELL_WIDTH = 34, 15
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


def _readout(model: dict) -> str:
    """", features pooled 4x4" for an image encoder: the grid every probe and fine-tune row reads through."""
    shape = model.get("input_shape") or []
    if model.get("encoder") not in READOUT_ENCODERS or len(shape) != 3:
        return ""
    grid = readout_grid(int(model.get("readout", AUTO_READOUT)), shape)
    return f", features pooled {grid}x{grid}"


def _run_summary(run: RunFiles) -> list[str]:
    federation, model = _section(run.config, "federation"), _section(run.config, "model")
    planned_sites, planned_rounds = federation.get("num_sites", "?"), federation.get("rounds", "?")
    facts = [
        ("sites", f"{len(run.site_ids)} reporting (planned {planned_sites})"),
        ("rounds", f"{len(run.rounds)} completed (planned {planned_rounds})"),
        ("pretext", str(_section(run.config, "pretext").get("name", "unknown (no config.yaml)"))),
        ("encoder", f"{model.get('encoder', '?')}, width {model.get('width', '?')}, depth {model.get('depth', '?')}{_readout(model)}"),
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


def _evaluation_section(run: RunFiles) -> list[str]:
    results = run.evaluation
    if results is None:
        return ["No evaluation.json in this run directory: evaluation was disabled or has not run."]
    lines = [
        f"{results.scored_set.capitalize()} accuracy (mean ± std over {len(results.plan.label_seeds)} label seeds; "
        f"random-init rows also over init seeds). Labels come only from consented samples: {results.num_consented_train} of "
        f"{results.num_train} train examples, {results.num_test} {results.scored_set} examples. Every row uses the same label "
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
    return lines + _verdict_subsections(results)


# (heading, what the comparison is, the verdict function): one report subsection each, when it has sentences.
VERDICT_SUBSECTIONS = (
    (
        "What pretraining added",
        "Measured against a randomly initialised encoder of the same shape, read out the same way on the "
        "same label subsets (paired by label seed); a gain the random encoder also gets is not credited to pretraining.",
        pretraining_verdict,
    ),
    (
        "Against the raw input",
        "The raw input read out by a linear classifier on the same labels (pixels, feature columns, or TF-IDF "
        "of text), run by run on the same label subsets: an encoder that loses to its own input is not worth "
        "using, whatever it gains over a random one.",
        raw_input_verdict,
    ),
    (
        "Against features built from no data",
        "A linear classifier on fixed features built from no data, on the same label subsets: for images a Gabor "
        "filter bank's responses (the first order of a scattering transform; fedssl/evaluation/handcrafted.py), for "
        "time series ROCKET's random convolutional kernels (fedssl/evaluation/rocket.py). Nothing in them is "
        "learned, so any site could use them at ε = 0 without federating: the ε spent buys only what the encoder "
        "adds over them. Fine-tuned rows are compared with the same probe (fixed features have nothing to fine-tune).",
        handcrafted_verdict,
    ),
    (
        "What the private federated step added over its warm start",
        "The federation started from a warm start pretrained on public data at no privacy cost, so the "
        "gains above include what that warm start already gave. Here each pretrained row is compared with "
        "the warm start read out the same way, run by run on the same label subsets and seeds: the gain is "
        "the mean ± std of the per-seed differences, and a gain within that spread is not credited to the "
        "ε spent.",
        warm_start_verdict,
    ),
)


def _verdict_subsections(results: EvalResults) -> list[str]:
    lines: list[str] = []
    for heading, explanation, verdict in VERDICT_SUBSECTIONS:
        sentences = verdict(results)
        if sentences:
            lines += ["", f"### {heading}", "", explanation, "", *(f"- {sentence}" for sentence in sentences)]
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
    sentences = headline(run.evaluation)
    if not sentences:
        return []
    return ["**Headline**", "", *(f"- {sentence}" for sentence in sentences), "", ONE_RUN_IS_ONE_DRAW, "",
            *(line for note in run.evaluation.scored_set_notes() for line in (note, ""))]


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
    lines = [f"{results.scored_set + ' accuracy':<{NAME_WIDTH}}" + "".join(f"{format_fraction(f):>{CELL_WIDTH}}" for f in fractions)]
    for row in results.rows:
        cells = [results.cell(row, f) for f in fractions]
        lines.append(f"{results.row_title(row):<{NAME_WIDTH}}" + "".join(f"{f'{c.mean:.3f}±{c.std:.3f}':>{CELL_WIDTH}}" for c in cells))
    for readout, gains in pretraining_gains(results).items():
        lines.append(_gain_line(f"pretraining gain ({readout})", gains))
    for readout, gains in raw_input_gains(results).items():
        lines.append(_gain_line(f"gain over raw input ({readout})", gains))
    over_handcrafted = handcrafted_gains(results)
    for readout, gains in over_handcrafted.items():
        lines.append(_gain_line(f"gain over handcrafted ({readout})", gains))
    private_step_gains = warm_start_gains(results)
    for readout, gains in private_step_gains.items():
        lines.append(_gain_line(f"private-step gain ({readout})", gains))
    lines += results.skip_notes()
    verdicts = headline(results)
    lines += verdicts + ([ONE_RUN_IS_ONE_DRAW, *results.scored_set_notes()] if verdicts else [])
    if private_step_gains:
        lines.append("private-step gain = pretrained minus its warm start (no ε), paired by label seed")
    if over_handcrafted:
        lines.append(f"gain over handcrafted = pretrained minus the probe of {results.handcrafted_features} (features "
                     "built from no data, no ε), paired by label seed")
    return lines + ["pretraining gain = pretrained minus its random-init control (scratch for finetune), paired by "
                    "label seed; ns = within the seed spread, 1s = single seed: "
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
