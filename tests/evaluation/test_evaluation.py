"""Label-efficiency evaluation on a small slice of digits, and its consent boundary."""

from __future__ import annotations

import json
from typing import NamedTuple

import numpy as np
import pytest
import torch

from fedssl.data import ConsentedLabels, ConsentManifest, SiteDataset, label_source_from_array, load_digits_labeled
from fedssl.errors import ConfigError, ConsentError
from fedssl.config import EvaluationConfig
from fedssl.evaluation import (
    HANDCRAFTED_PROBE,
    PRETRAINED_FINETUNE,
    PRETRAINED_PROBE,
    RANDOM_INIT_PROBE,
    RAW_INPUT,
    ROW_ORDER,
    SCRATCH_FINETUNE,
    WARM_START_FINETUNE,
    WARM_START_PROBE,
    WARM_START_ROWS,
    Cell,
    EvalResults,
    FractionInfo,
    SeedRun,
    evaluate_label_efficiency,
)
from fedssl.data.pixels import unit_float
from fedssl.data.sampling import stratified_subset
from fedssl.evaluation.handcrafted import gabor_features
from fedssl.evaluation.probes import linear_probe_accuracy
from fedssl.evaluation.results import RAW_TREES
from fedssl.models import Encoder, build_encoder

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


def run(digits: Digits, labels: ConsentedLabels, plan: EvaluationConfig, warm_start_state=None) -> EvalResults:
    return evaluate_label_efficiency(
        encoder_factory=small_cnn,
        pretrained_state=small_cnn(99).state_dict(),
        train=digits.train,
        test=digits.test,
        labels=labels,
        plan=plan,
        warm_start_state=warm_start_state,
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
        EvaluationConfig(methods=["knn"]).validate()


def test_all_rows_on_digits(digits: Digits) -> None:
    plan = EvaluationConfig(label_fractions=[0.10], label_seeds=[0, 1], random_init_seeds=[0, 1], finetune_epochs=3)
    # Two threads whatever the suite runs with (make test sets OMP_NUM_THREADS=1), so a leaked
    # single-thread setting would show.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = run(digits, guarded_labels(digits, digits.everything())[0], plan)
        assert torch.get_num_threads() == 2  # the single-thread speed-up must not leak to the caller
    finally:
        torch.set_num_threads(threads)

    # No warm start: no warm-start rows, not even empty ones.
    # images: no trees on pixels (that row is for vectors and tables)
    assert results.rows == [row for row in ROW_ORDER if row not in WARM_START_ROWS and row != RAW_TREES]
    assert not results.has_warm_start and not any(row in WARM_START_ROWS for row, _ in results.cells)
    assert results.fractions == [FractionInfo(0.10, 50)]
    for row in results.rows:
        cell = results.cell(row, 0.10)
        assert all(0.0 <= accuracy <= 1.0 for accuracy in cell.accuracies)
        assert cell.n == (4 if row == RANDOM_INIT_PROBE else 2)  # 2 label seeds x 2 init seeds for the control
    assert results.cell(RAW_INPUT, 0.10).mean > 0.7
    restored = EvalResults.from_dict(json.loads(json.dumps(results.to_dict())))
    assert restored.cells == results.cells and restored.fractions == results.fractions
    assert "| pretrained_probe | " in results.markdown_table()
    assert "warm_start" not in results.markdown_table()
    with pytest.raises(KeyError, match="warm_start_probe"):
        results.gain_over_warm_start(0.10)


def test_warm_start_rows_score_the_warm_start_on_the_same_subsets_and_seeds(digits: Digits) -> None:
    """A warm start with the weights of random-init seed 7 must reproduce that control run by run.

    Same weights, same label subsets, same fine-tuning seeds -> identical accuracies; any slip
    (other weights, other subsets, unpaired seeds) breaks the equality.
    """
    plan = EvaluationConfig(label_fractions=[0.10], label_seeds=[0, 1], random_init_seeds=[7], finetune_epochs=2)
    results = run(digits, guarded_labels(digits, digits.everything())[0], plan, warm_start_state=small_cnn(7).state_dict())

    assert results.rows == [row for row in ROW_ORDER if row != RAW_TREES] and results.has_warm_start
    for warm, control in ((WARM_START_PROBE, RANDOM_INIT_PROBE), (WARM_START_FINETUNE, SCRATCH_FINETUNE)):
        warm_runs, control_runs = results.cell(warm, 0.10).runs, results.cell(control, 0.10).runs
        assert [(r.label_seed, r.init_seed) for r in warm_runs] == [(0, None), (1, None)]
        assert [(r.label_seed, r.accuracy) for r in warm_runs] == [(r.label_seed, r.accuracy) for r in control_runs]
    # ... and the federated rows are scored on their own weights, paired with the warm start.
    pretrained = results.cell(PRETRAINED_PROBE, 0.10).accuracies
    assert not np.array_equal(pretrained, results.cell(WARM_START_PROBE, 0.10).accuracies)
    gain = results.gain_over_warm_start(0.10)
    assert gain.paired and gain.seeds == 2 and (gain.row, gain.baseline) == (PRETRAINED_PROBE, WARM_START_PROBE)
    assert gain.delta == pytest.approx(np.mean(pretrained - results.cell(WARM_START_PROBE, 0.10).accuracies))
    restored = EvalResults.from_dict(json.loads(json.dumps(results.to_dict())))
    assert restored.rows == results.rows and restored.gain_over_warm_start(0.10) == gain
    assert "| warm_start_probe | " in results.markdown_table()


def test_unconsented_train_labels_are_never_read(digits: Digits) -> None:
    consented = digits.everything() - frozenset(digits.train.sample_ids[::2])
    labels, source = guarded_labels(digits, consented)
    plan = EvaluationConfig(label_fractions=[0.10], label_seeds=[0], random_init_seeds=[0], methods=["linear_probe"])
    results = run(digits, labels, plan)
    assert set(source.reads) <= consented
    assert results.num_consented_train == NUM_TRAIN // 2
    assert results.cell(PRETRAINED_PROBE, 0.10).n == 1


def test_unconsented_test_id_raises_before_any_label_is_read(digits: Digits) -> None:
    unconsented = digits.test.sample_ids[-1]
    labels, source = guarded_labels(digits, digits.everything() - {unconsented})
    with pytest.raises(ConsentError, match=unconsented):
        run(digits, labels, EvaluationConfig(methods=["linear_probe"]))
    assert source.reads == []


def test_fraction_beyond_consented_pool_is_skipped_with_a_note(digits: Digits) -> None:
    consented = frozenset(digits.train.sample_ids[:100]) | frozenset(digits.test.sample_ids)
    plan = EvaluationConfig(label_fractions=[0.05, 0.5], label_seeds=[0], random_init_seeds=[0], methods=["linear_probe"])
    results = run(digits, guarded_labels(digits, consented)[0], plan)
    assert results.evaluated_fractions() == [0.05]
    skipped = results.fractions[1]
    assert skipped.skipped == "needs 250 labels but only 100 train examples are consented"
    assert "skipped, needs 250 labels" in results.markdown_table()
    with pytest.raises(KeyError, match="skipped or not planned"):
        results.cell(PRETRAINED_PROBE, 0.5)


def test_no_consented_train_example_skips_every_fraction(digits: Digits) -> None:
    plan = EvaluationConfig(label_fractions=[0.05, 0.1], label_seeds=[0], random_init_seeds=[0], methods=["linear_probe"])
    results = run(digits, guarded_labels(digits, frozenset(digits.test.sample_ids))[0], plan)
    assert results.evaluated_fractions() == [] and results.num_consented_train == 0
    assert len(results.skip_notes()) == 2


def results_with(pretrained: list[float], random_init: list[float]) -> EvalResults:
    cells = {
        (PRETRAINED_PROBE, 0.1): Cell(tuple(SeedRun(i, None, a) for i, a in enumerate(pretrained))),
        (RANDOM_INIT_PROBE, 0.1): Cell(tuple(SeedRun(i, 0, a) for i, a in enumerate(random_init))),
    }
    return EvalResults(EvaluationConfig(label_fractions=[0.1]), [RANDOM_INIT_PROBE, PRETRAINED_PROBE],
                       [FractionInfo(0.1, 10)], cells, 100, 100, 50, 0.0)


def test_gain_over_random_init_is_paired_by_label_seed_and_reports_spread() -> None:
    # Label subsets of very different difficulty, the same +0.05 on each: paired, a clear gain;
    # unpaired, the subsets' spread would swamp it.
    clear = results_with([0.80, 0.90, 1.00], [0.75, 0.85, 0.95]).gain_over_random_init(0.1)
    assert clear.paired and clear.delta == pytest.approx(0.05) and clear.spread == pytest.approx(0.0, abs=1e-9)
    assert not clear.within_spread
    noisy = results_with([0.80, 0.90, 1.00], [0.85, 0.80, 0.95]).gain_over_random_init(0.1)  # -0.05, +0.10, +0.05
    assert noisy.delta == pytest.approx(0.10 / 3) and noisy.spread == pytest.approx(np.std([-0.05, 0.10, 0.05], ddof=1))
    assert noisy.within_spread
    single = results_with([0.9], [0.7]).gain_over_random_init(0.1)
    assert single.within_spread is False and single.spread_known is False


def test_random_init_control_enters_each_pair_as_the_mean_over_its_init_seeds() -> None:
    results = results_with([0.90, 0.80], [0.0, 0.0])
    results.cells[(RANDOM_INIT_PROBE, 0.1)] = Cell(tuple(
        SeedRun(label_seed, init_seed, accuracy)
        for label_seed, accuracies in ((0, (0.84, 0.86)), (1, (0.70, 0.74)))
        for init_seed, accuracy in zip((3, 4), accuracies)
    ))  # fmt: skip
    gain = results.gain_over_random_init(0.1)  # differences 0.90 - 0.85, 0.80 - 0.72
    assert gain.seeds == 2 and gain.delta == pytest.approx((0.05 + 0.08) / 2)
    assert gain.spread == pytest.approx(np.std([0.05, 0.08], ddof=1))


def runs(accuracies: dict[int, float], init_seed: int | None = None) -> Cell:
    """A cell from {label_seed: accuracy}, in the dict's order."""
    return Cell(tuple(SeedRun(seed, init_seed, accuracy) for seed, accuracy in accuracies.items()))


def warm_start_results() -> EvalResults:
    """Warm-start runs stored in another seed order than the pretrained ones: only pairing by seed matches them."""
    cells = {
        (RANDOM_INIT_PROBE, 0.1): runs({0: 0.50, 1: 0.55, 2: 0.60}, init_seed=0),
        (WARM_START_PROBE, 0.1): runs({2: 0.86, 0: 0.77, 1: 0.83}),
        (PRETRAINED_PROBE, 0.1): runs({0: 0.80, 1: 0.85, 2: 0.90}),
        (SCRATCH_FINETUNE, 0.1): runs({0: 0.40, 1: 0.45, 2: 0.50}, init_seed=0),
        (WARM_START_FINETUNE, 0.1): runs({0: 0.90, 1: 0.92, 2: 0.94}),
        (PRETRAINED_FINETUNE, 0.1): runs({0: 0.89, 1: 0.93, 2: 0.91}),
    }
    rows = [row for row in ROW_ORDER if row != RAW_INPUT]
    return EvalResults(EvaluationConfig(label_fractions=[0.1]), rows, [FractionInfo(0.1, 10)], cells, 100, 100, 50, 0.0)


def test_gain_over_warm_start_is_paired_by_seed_against_the_warm_start_row() -> None:
    results = warm_start_results()
    probe = results.gain_over_warm_start(0.1)
    assert (probe.row, probe.baseline, probe.paired, probe.seeds) == (PRETRAINED_PROBE, WARM_START_PROBE, True, 3)
    # per-seed differences 0.03, 0.02, 0.04 (seed 0, 1, 2): mean 0.03, sample std 0.01
    assert probe.delta == pytest.approx(0.03) and probe.spread == pytest.approx(0.01)
    assert not probe.within_spread and probe.spread_known
    # Unpaired, the label-subset noise both rows share swamps the same difference.
    unpaired = results.gain(PRETRAINED_PROBE, WARM_START_PROBE, 0.1)
    assert unpaired.delta == pytest.approx(0.03) and unpaired.spread == pytest.approx(0.05 + np.std([0.77, 0.83, 0.86], ddof=1))
    assert unpaired.within_spread and not unpaired.paired
    # Against the random-init control the same pretrained row gains far more: a different baseline.
    assert results.gain_over_random_init(0.1).delta == pytest.approx(0.30)

    finetune = results.gain_over_warm_start(0.1, finetune=True)
    assert (finetune.row, finetune.baseline) == (PRETRAINED_FINETUNE, WARM_START_FINETUNE)
    # differences -0.01, +0.01, -0.03: mean -0.01, std 0.02 -> within the spread
    assert finetune.delta == pytest.approx(-0.01) and finetune.spread == pytest.approx(0.02)
    assert finetune.within_spread


def test_paired_gain_refuses_rows_that_do_not_share_their_seeds() -> None:
    results = warm_start_results()
    results.cells[(WARM_START_PROBE, 0.1)] = runs({0: 0.77, 1: 0.83, 5: 0.86})
    with pytest.raises(ValueError, match="do not share their seeds"):
        results.gain_over_warm_start(0.1)
    results.cells[(WARM_START_PROBE, 0.1)] = Cell((SeedRun(0, None, 0.7), SeedRun(0, None, 0.8), SeedRun(1, None, 0.8)))
    with pytest.raises(ValueError, match="two runs with the same seeds"):
        results.gain_over_warm_start(0.1)
    single = warm_start_results()
    single.cells[(WARM_START_PROBE, 0.1)] = runs({0: 0.77})
    single.cells[(PRETRAINED_PROBE, 0.1)] = runs({0: 0.80})
    gain = single.gain_over_warm_start(0.1)
    assert gain.delta == pytest.approx(0.03) and gain.seeds == 1 and not gain.spread_known


def test_handcrafted_row_is_the_gabor_bank_probed_on_the_same_subsets(digits: Digits) -> None:
    """The images' zero-cost row, recomputed directly: the bank's features of the consented pool and the test set,
    the probe on each label seed's subset. Other features, subsets or C break the equality."""
    plan = EvaluationConfig(label_fractions=[0.10], label_seeds=[0, 1], random_init_seeds=[0], methods=["linear_probe"])
    labels = guarded_labels(digits, digits.everything())[0]
    results = run(digits, labels, plan)

    assert results.rows == [RAW_INPUT, HANDCRAFTED_PROBE, RANDOM_INIT_PROBE, PRETRAINED_PROBE]
    assert results.handcrafted_features == "gabor bank"
    assert "| handcrafted_probe (gabor bank) | " in results.markdown_table()
    pool, test = (gabor_features(unit_float(split.inputs)) for split in (digits.train, digits.test))
    assert pool.shape == (NUM_TRAIN, 25 * 4 * 4)  # 8x8 digits: 4x4 cells of 2 pixels (handcrafted.grid_for)
    pool_labels = np.asarray(labels.labels_for(digits.train.sample_ids))
    test_labels = np.asarray(labels.labels_for(digits.test.sample_ids))
    expected = []
    for seed in plan.label_seeds:
        subset = stratified_subset(pool_labels, 50, seed)
        expected.append(linear_probe_accuracy(pool[subset], pool_labels[subset], test, test_labels, plan.probe_C))
    runs = results.cell(HANDCRAFTED_PROBE, 0.10).runs
    assert [(run.label_seed, run.init_seed) for run in runs] == [(0, None), (1, None)]
    assert [run.accuracy for run in runs] == expected
    restored = EvalResults.from_dict(json.loads(json.dumps(results.to_dict())))
    assert restored.handcrafted_features == "gabor bank" and restored.cells == results.cells
    written_before = {key: value for key, value in results.to_dict().items() if key != "handcrafted_features"}
    assert EvalResults.from_dict(written_before).handcrafted_features is None


def test_the_handcrafted_control_can_be_turned_off(digits: Digits) -> None:
    plan = EvaluationConfig(label_fractions=[0.10], label_seeds=[0, 1], random_init_seeds=[0], methods=["linear_probe"],
                            handcrafted=False)
    results = run(digits, guarded_labels(digits, digits.everything())[0], plan)
    assert results.rows == [RAW_INPUT, RANDOM_INIT_PROBE, PRETRAINED_PROBE] and results.handcrafted_features is None
    assert not any(row == HANDCRAFTED_PROBE for row, _ in results.cells)
