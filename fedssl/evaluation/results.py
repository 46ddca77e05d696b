"""Label-efficiency results: per-seed accuracies, their summary, and an honest comparison."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fedssl.config import EvaluationConfig

RAW_INPUT = "raw_input"
RAW_TREES = "raw_input_trees"  # gradient-boosted trees on the raw features: vectors and tables only
# A linear probe on features built from no data (images: a fixed Gabor bank; time series: ROCKET's random kernels;
# fedssl.evaluation.baselines): the
# best zero-privacy-cost start for the modality, where one is known. Only present for such modalities.
HANDCRAFTED_PROBE = "handcrafted_probe"
RANDOM_INIT_PROBE = "random_init_probe"
PRETRAINED_PROBE = "pretrained_probe"
SCRATCH_FINETUNE = "scratch_finetune"
PRETRAINED_FINETUNE = "pretrained_finetune"
# The encoder the federation started from (warm_start.pt), read out like the pretrained rows:
# only present when the run used a warm start. Pretrained minus warm start is what the
# private federated step (the ε spent) added over its zero-cost starting point.
WARM_START_PROBE = "warm_start_probe"
WARM_START_FINETUNE = "warm_start_finetune"
WARM_START_ROWS = (WARM_START_PROBE, WARM_START_FINETUNE)
# Every row a table can have, in display order: control, zero-cost start, federated result.
ROW_ORDER = (
    RAW_INPUT,
    RAW_TREES,
    HANDCRAFTED_PROBE,
    RANDOM_INIT_PROBE,
    WARM_START_PROBE,
    PRETRAINED_PROBE,
    SCRATCH_FINETUNE,
    WARM_START_FINETUNE,
    PRETRAINED_FINETUNE,
)


def format_fraction(fraction: float) -> str:
    """1% rather than 0.01; `g` drops float noise such as 5.000000000000001."""
    return f"{fraction * 100:g}%"


@dataclass(frozen=True)
class SeedRun:
    """One accuracy; `init_seed` is set for rows that start from a random encoder."""

    label_seed: int
    init_seed: int | None
    accuracy: float


@dataclass(frozen=True)
class Cell:
    """All runs of one row at one label fraction."""

    runs: tuple[SeedRun, ...]

    @property
    def accuracies(self) -> np.ndarray:
        return np.array([run.accuracy for run in self.runs])

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def mean(self) -> float:
        return float(self.accuracies.mean())

    @property
    def std(self) -> float:
        # Sample std (ddof=1): with three seeds the population std would understate the spread.
        return float(self.accuracies.std(ddof=1)) if self.n > 1 else 0.0


@dataclass(frozen=True)
class FractionInfo:
    """A label fraction, the label count it became, and why it was skipped if it was."""

    fraction: float
    num_labels: int
    skipped: str | None = None


@dataclass(frozen=True)
class Gain:
    """Mean accuracy of `row` minus `baseline`, and the seed spread it must exceed to count.

    Paired (``paired=True``, what every verdict uses): `delta` is the mean of the differences
    between runs on the same label subset (label seed), `spread` their sample std, and `seeds`
    the number of pairs. Unpaired (``paired=False``): `spread` is the sum of both cells' stds and
    `seeds` the runs behind the thinner cell; it counts the label-subset noise both rows share
    twice, so it is kept only to show what pairing removes.
    """

    row: str
    baseline: str
    fraction: float
    delta: float
    spread: float
    seeds: int
    paired: bool = False

    @property
    def within_spread(self) -> bool:
        return abs(self.delta) <= self.spread

    @property
    def spread_known(self) -> bool:
        """A single run has no spread, so a difference from it cannot be told from seed noise."""
        return self.seeds >= 2


# Said wherever a run scored on validation shows what it found: its numbers choose settings, they are not results.
SCORED_ON_VALIDATION = ("Scored on a validation set carved from the consented training pool (evaluation.score_on: "
                        "validation), to choose settings: no test label was read. Report the chosen settings from one "
                        "run scored on the test set (evaluation.score_on: test).")


@dataclass
class EvalResults:
    plan: EvaluationConfig
    rows: list[str]
    fractions: list[FractionInfo]
    cells: dict[tuple[str, float], Cell]
    num_train: int
    num_consented_train: int
    num_test: int
    seconds: float
    raw_features: str = "pixels"  # what the raw_input row probed (fedssl.evaluation.baselines): pixels, features, tf-idf
    handcrafted_features: str | None = None  # what the handcrafted_probe row probed (gabor bank, rocket); None: none
    class_names: list[str] | None = None  # class i's name where the labels were names; None for integer labels

    @property
    def scored_set(self) -> str:
        """What every accuracy here was measured on: "test", or "validation" (evaluation.score_on)."""
        return self.plan.score_on

    def row_title(self, row: str) -> str:
        """A row's name as tables show it: the baseline rows say which fixed features they probed."""
        features = {RAW_INPUT: self.raw_features, HANDCRAFTED_PROBE: self.handcrafted_features}.get(row)
        return f"{row} ({features})" if features else row

    def evaluated_fractions(self) -> list[float]:
        return [info.fraction for info in self.fractions if info.skipped is None]

    def cell(self, row: str, fraction: float) -> Cell:
        if (row, fraction) not in self.cells:
            raise KeyError(f"no result for row {row!r} at label fraction {fraction}: skipped or not planned")
        return self.cells[(row, fraction)]

    def gain(self, row: str, baseline: str, fraction: float) -> Gain:
        ours, theirs = self.cell(row, fraction), self.cell(baseline, fraction)
        return Gain(row, baseline, fraction, ours.mean - theirs.mean, ours.std + theirs.std, min(ours.n, theirs.n))

    def paired_gain(self, row: str, baseline: str, fraction: float) -> Gain:
        """`row` minus `baseline` label seed by label seed: the runs on one label subset are a pair.

        Both rows must hold the same label seeds (they do when they were evaluated on the same
        label subsets); the label-subset noise they share then cancels out of each difference. A
        row with several init seeds on one subset (the random-init probe) enters as their mean, so
        the control's init spread is in the differences. `spread` is the sample std of the
        differences: the seed spread a gain must exceed.
        """
        ours, theirs = self._mean_by_label_seed(row, fraction), self._mean_by_label_seed(baseline, fraction)
        if ours.keys() != theirs.keys():
            raise ValueError(
                f"{row} and {baseline} at label fraction {fraction} do not share their seeds "
                f"({sorted(ours)} vs {sorted(theirs)}): they cannot be paired"
            )
        differences = np.array([ours[seed] - theirs[seed] for seed in ours])
        spread = float(differences.std(ddof=1)) if len(differences) > 1 else 0.0
        return Gain(row, baseline, fraction, float(differences.mean()), spread, len(differences), paired=True)

    def _mean_by_label_seed(self, row: str, fraction: float) -> dict[int, float]:
        runs = self.cell(row, fraction).runs
        if len({(run.label_seed, run.init_seed) for run in runs}) != len(runs):
            raise ValueError(f"{row} at label fraction {fraction} has two runs with the same seeds: cannot pair")
        by_label_seed: dict[int, list[float]] = {}
        for run in runs:
            by_label_seed.setdefault(run.label_seed, []).append(run.accuracy)
        return {seed: float(np.mean(accuracies)) for seed, accuracies in by_label_seed.items()}

    def gain_over_random_init(self, fraction: float) -> Gain:
        """What pretraining added to the probe beyond what a random encoder already gives, paired by label seed."""
        return self.paired_gain(PRETRAINED_PROBE, RANDOM_INIT_PROBE, fraction)

    def gain_over_warm_start(self, fraction: float, finetune: bool = False) -> Gain:
        """What the private federated step added over its zero-cost warm start, paired by label seed.

        Probe readout by default, fine-tuning with ``finetune=True``. Raises KeyError when
        the run had no warm start (no warm-start rows).
        """
        if finetune:
            return self.paired_gain(PRETRAINED_FINETUNE, WARM_START_FINETUNE, fraction)
        return self.paired_gain(PRETRAINED_PROBE, WARM_START_PROBE, fraction)

    @property
    def has_warm_start(self) -> bool:
        return any(row in self.rows for row in WARM_START_ROWS)

    def markdown_table(self) -> str:
        header = ["row"] + [f"{format_fraction(info.fraction)} ({info.num_labels} labels)" for info in self.fractions]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in self.rows:
            values = [self._format_cell(row, info) for info in self.fractions]
            lines.append("| " + " | ".join([self.row_title(row), *values]) + " |")
        notes = [f"- {note}" for note in self.skip_notes()]
        return "\n".join(lines + ([""] + notes if notes else []))

    def scored_set_notes(self) -> list[str]:
        """SCORED_ON_VALIDATION for a run scored on validation; nothing for one scored on the test set."""
        return [SCORED_ON_VALIDATION] if self.plan.scores_validation else []

    def skip_notes(self) -> list[str]:
        return [f"{format_fraction(info.fraction)}: skipped, {info.skipped}" for info in self.fractions if info.skipped]

    def _format_cell(self, row: str, info: FractionInfo) -> str:
        if info.skipped is not None:
            return "skipped"
        cell = self.cell(row, info.fraction)
        return f"{cell.mean:.3f} ± {cell.std:.3f}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan": asdict(self.plan),
            "rows": list(self.rows),
            "fractions": [asdict(info) for info in self.fractions],
            "cells": [
                {
                    "row": row,
                    "fraction": fraction,
                    "mean": cell.mean,
                    "std": cell.std,
                    "n": cell.n,
                    "runs": [asdict(run) for run in cell.runs],
                }
                for (row, fraction), cell in self.cells.items()
            ],
            "num_train": self.num_train,
            "num_consented_train": self.num_consented_train,
            "num_test": self.num_test,
            "seconds": self.seconds,
            "raw_features": self.raw_features,
            "handcrafted_features": self.handcrafted_features,
            "class_names": self.class_names,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalResults:
        """Inverse of `to_dict` (mean/std/n are recomputed from the runs, not trusted)."""
        return cls(
            plan=EvaluationConfig(**data["plan"]),
            rows=list(data["rows"]),
            fractions=[FractionInfo(**info) for info in data["fractions"]],
            cells={
                (entry["row"], entry["fraction"]): Cell(tuple(SeedRun(**run) for run in entry["runs"]))
                for entry in data["cells"]
            },
            num_train=data["num_train"],
            num_consented_train=data["num_consented_train"],
            num_test=data["num_test"],
            seconds=data["seconds"],
            raw_features=data.get("raw_features", "pixels"),  # files written before it probed pixels
            handcrafted_features=data.get("handcrafted_features"),  # files written before the row existed have none
            class_names=data.get("class_names"),
        )
