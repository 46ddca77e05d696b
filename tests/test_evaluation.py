"""Label-efficiency evaluation on a small slice of digits, and its consent boundary."""

from __future__ import annotations

import json
from typing import NamedTuple

import numpy as np
import pytest
import torch

from fedssl.data import ConsentedLabels, ConsentManifest, SiteDataset, label_source_from_array, load_digits_labeled
from fedssl.errors import ConfigError, ConsentError
from fedssl.evaluation import (
    PRETRAINED_PROBE,
    RANDOM_INIT_PROBE,
    RAW_INPUT,
    ROW_ORDER,
    Cell,
    EvalPlan,
    EvalResults,
    FractionInfo,
    SeedRun,
    evaluate_label_efficiency,
)
from fedssl.evaluation.sampling import stratified_subset
from fedssl.models.encoders import Encoder, build_encoder

NUM_TRAIN, NUM_TEST = 500, 200


class GuardedSource:
    """A label source that fails loudly if asked for an unconsented label, and logs every read."""

    def __init__(self, ids: tuple[str, ...], labels: np.ndarray, consented: frozenset[str]) -> None:
        self._read = label_source_from_array(ids, labels)
        self._consented = consented
        self.reads: list[str] = []

    def __call__(self, sample_id: str) -> int:
        if sample_id not in self._consented:
            raise AssertionError(f"unconsented label {sample_id!r} was read")
        self.reads.append(sample_id)
        return self._read(sample_id)


class Digits(NamedTuple):
    data: SiteDataset
    train: SiteDataset
    test: SiteDataset
    labels: np.ndarray

    def everything(self) -> frozenset[str]:
        return frozenset(self.train.sample_ids) | frozenset(self.test.sample_ids)


@pytest.fixture(scope="module")
def digits() -> Digits:
    data, labels = load_digits_labeled()
    order = np.random.default_rng(0).permutation(len(data))
    return Digits(data, data.subset(order[:NUM_TRAIN]), data.subset(order[NUM_TRAIN : NUM_TRAIN + NUM_TEST]), labels)


def small_cnn(seed: int | None) -> Encoder:
    return build_encoder("cnn", (1, 8, 8), width=8, depth=2, seed=seed)


def guarded_labels(digits: Digits, consented: frozenset[str]) -> tuple[ConsentedLabels, GuardedSource]:
    source = GuardedSource(digits.data.sample_ids, digits.labels, consented)
    return ConsentedLabels(ConsentManifest(consented), source), source


def run(digits: Digits, labels: ConsentedLabels, plan: EvalPlan) -> EvalResults:
    return evaluate_label_efficiency(
        encoder_factory=small_cnn,
        pretrained_state=small_cnn(99).state_dict(),
        train=digits.train,
        test=digits.test,
        labels=labels,
        plan=plan,
    )


def test_stratified_subset_covers_every_class_and_is_seeded() -> None:
    labels = np.array([0] * 50 + [1] * 30 + [2] * 3)
    subset = stratified_subset(labels, 10, seed=4)
    counts = np.bincount(labels[subset], minlength=3)
    assert len(subset) == len(set(subset.tolist())) == 10
    assert counts.min() >= 1 and counts[0] > counts[1] > 0
    assert np.array_equal(subset, stratified_subset(labels, 10, seed=4))
    assert not np.array_equal(subset, stratified_subset(labels, 10, seed=5))
    with pytest.raises(ValueError, match="cannot cover 3 classes"):
        stratified_subset(labels, 2, seed=0)


def test_plan_rejects_unknown_method() -> None:
    with pytest.raises(ConfigError, match="methods"):
        EvalPlan(methods=["knn"])


def test_all_rows_on_digits(digits: Digits) -> None:
    plan = EvalPlan(label_fractions=[0.10], label_seeds=[0, 1], random_init_seeds=[0, 1], finetune_epochs=3)
    threads = torch.get_num_threads()
    results = run(digits, guarded_labels(digits, digits.everything())[0], plan)
    assert torch.get_num_threads() == threads  # the single-thread speed-up must not leak to the caller

    assert results.rows == list(ROW_ORDER)
    assert results.fractions == [FractionInfo(0.10, 50)]
    for row in ROW_ORDER:
        cell = results.cell(row, 0.10)
        assert all(0.0 <= accuracy <= 1.0 for accuracy in cell.accuracies)
        assert cell.n == (4 if row == RANDOM_INIT_PROBE else 2)  # 2 label seeds x 2 init seeds for the control
    assert results.cell(RAW_INPUT, 0.10).mean > 0.7
    restored = EvalResults.from_dict(json.loads(json.dumps(results.to_dict())))
    assert restored.cells == results.cells and restored.fractions == results.fractions
    assert "| pretrained_probe | " in results.markdown_table()


def test_unconsented_train_labels_are_never_read(digits: Digits) -> None:
    consented = digits.everything() - frozenset(digits.train.sample_ids[::2])
    labels, source = guarded_labels(digits, consented)
    plan = EvalPlan(label_fractions=[0.10], label_seeds=[0], random_init_seeds=[0], methods=["linear_probe"])
    results = run(digits, labels, plan)
    assert set(source.reads) <= consented
    assert results.num_consented_train == NUM_TRAIN // 2
    assert results.cell(PRETRAINED_PROBE, 0.10).n == 1


def test_unconsented_test_id_raises_before_any_label_is_read(digits: Digits) -> None:
    unconsented = digits.test.sample_ids[-1]
    labels, source = guarded_labels(digits, digits.everything() - {unconsented})
    with pytest.raises(ConsentError, match=unconsented):
        run(digits, labels, EvalPlan(methods=["linear_probe"]))
    assert source.reads == []


def test_fraction_beyond_consented_pool_is_skipped_with_a_note(digits: Digits) -> None:
    consented = frozenset(digits.train.sample_ids[:100]) | frozenset(digits.test.sample_ids)
    plan = EvalPlan(label_fractions=[0.05, 0.5], label_seeds=[0], random_init_seeds=[0], methods=["linear_probe"])
    results = run(digits, guarded_labels(digits, consented)[0], plan)
    assert results.evaluated_fractions() == [0.05]
    skipped = results.fractions[1]
    assert skipped.skipped == "needs 250 labels but only 100 train examples are consented"
    assert "skipped, needs 250 labels" in results.markdown_table()
    with pytest.raises(KeyError, match="skipped or not planned"):
        results.cell(PRETRAINED_PROBE, 0.5)


def test_no_consented_train_example_skips_every_fraction(digits: Digits) -> None:
    plan = EvalPlan(label_fractions=[0.05, 0.1], label_seeds=[0], random_init_seeds=[0], methods=["linear_probe"])
    results = run(digits, guarded_labels(digits, frozenset(digits.test.sample_ids))[0], plan)
    assert results.evaluated_fractions() == [] and results.num_consented_train == 0
    assert len(results.skip_notes()) == 2


def results_with(pretrained: list[float], random_init: list[float]) -> EvalResults:
    cells = {
        (PRETRAINED_PROBE, 0.1): Cell(tuple(SeedRun(i, None, a) for i, a in enumerate(pretrained))),
        (RANDOM_INIT_PROBE, 0.1): Cell(tuple(SeedRun(i, 0, a) for i, a in enumerate(random_init))),
    }
    return EvalResults(EvalPlan(label_fractions=[0.1]), [RANDOM_INIT_PROBE, PRETRAINED_PROBE],
                       [FractionInfo(0.1, 10)], cells, 100, 100, 50, 0.0)


def test_gain_over_random_init_reports_spread() -> None:
    clear = results_with([0.90, 0.92, 0.94], [0.70, 0.72, 0.74]).gain_over_random_init(0.1)
    assert clear.delta == pytest.approx(0.20) and clear.spread == pytest.approx(0.04)
    assert not clear.within_spread
    noisy = results_with([0.80, 0.90, 1.00], [0.75, 0.85, 0.95]).gain_over_random_init(0.1)
    assert noisy.delta == pytest.approx(0.05) and noisy.within_spread
    single = results_with([0.9], [0.7]).gain_over_random_init(0.1)
    assert single.within_spread is False and single.spread_known is False
