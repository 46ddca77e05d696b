"""Central label-efficiency evaluation of a pretrained encoder, reading only consented labels.

Every row sees the same stratified label subsets (paired by label seed), and the random-init
rows are the control: a gain counts only if a random encoder of the same shape does not get it too.
When the run started from a warm start, that encoder is read out the same way (warm-start rows),
so the private federated step can be judged against its own zero-cost starting point. Images and time series
also get a probe of features built from no data (a fixed Gabor bank; ROCKET's random kernels:
fedssl.evaluation.baselines), the zero-cost start any site could use without federating at all.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from fedssl.config import FINETUNE, LINEAR_PROBE, EvaluationConfig
from fedssl.evaluation.baselines import Features, FeatureBaseline, handcrafted_baseline, raw_baseline
from fedssl.evaluation.probes import encode, finetune_accuracy, linear_probe_accuracy, trees_accuracy
from fedssl.evaluation.results import (
    HANDCRAFTED_PROBE,
    PRETRAINED_FINETUNE,
    PRETRAINED_PROBE,
    RANDOM_INIT_PROBE,
    RAW_INPUT,
    RAW_TREES,
    ROW_ORDER,
    SCRATCH_FINETUNE,
    WARM_START_FINETUNE,
    WARM_START_PROBE,
    Cell,
    EvalResults,
    FractionInfo,
    SeedRun,
    format_fraction,
)
from fedssl.progress import Progress, tick
from fedssl.data.pixels import unit_float
from fedssl.data.sampling import stratified_subset
from fedssl.models.encoders import Encoder

if TYPE_CHECKING:  # annotations only: results and reporting stay importable without the data layer
    from fedssl.data.consent import ConsentedLabels
    from fedssl.data.dataset import SiteDataset

EncoderFactory = Callable[[int | None], Encoder]


@dataclass(frozen=True)
class _ProbeView:
    """One frozen representation of the consented pool and the test set."""

    row: str
    init_seed: int | None
    pool: Features
    test: Features
    standardize: bool = True
    C: float | None = None  # None: the plan's probe_C
    trees: bool = False  # read out by gradient-boosted trees instead of the linear probe


@dataclass(frozen=True)
class _Bench:
    """Everything fixed across label subsets: data, labels, encoders and their frozen features."""

    pool_inputs: torch.Tensor
    pool_labels: np.ndarray
    test_inputs: torch.Tensor
    test_labels: np.ndarray
    pretrained: Encoder
    random_inits: dict[int, Encoder]
    views: list[_ProbeView]
    warm_start: Encoder | None = None
    device: torch.device | None = None  # where encoders run (None: the CPU); features and probes stay on the host


def _consented_pool(train: SiteDataset, labels: ConsentedLabels) -> tuple[torch.Tensor, np.ndarray]:
    """Inputs and labels of the consented train examples; unconsented labels are never requested."""
    consented = labels.consented_ids(train.sample_ids)
    position = {sample_id: i for i, sample_id in enumerate(train.sample_ids)}
    rows = torch.as_tensor([position[sample_id] for sample_id in consented], dtype=torch.long)
    return unit_float(train.inputs[rows]), np.asarray(labels.labels_for(consented))


def _probe_views(
    pool_inputs: torch.Tensor,
    test_inputs: torch.Tensor,
    pretrained: Encoder,
    random_inits: dict[int, Encoder],
    plan: EvaluationConfig,
    raw: FeatureBaseline,
    warm_start: Encoder | None = None,
    device: torch.device | None = None,
    handcrafted: FeatureBaseline | None = None,
) -> list[_ProbeView]:
    def frozen(row: str, init_seed: int | None, encoder: Encoder) -> _ProbeView:
        return _ProbeView(row, init_seed, encode(encoder, pool_inputs, device), encode(encoder, test_inputs, device))

    # The raw input is always probed (pixels, feature columns, TF-IDF of text: fedssl.evaluation.baselines):
    # it is the floor any learned representation must beat.
    raw_pool, raw_test = raw.features(pool_inputs, test_inputs)
    views = [_ProbeView(RAW_INPUT, None, raw_pool, raw_test, raw.standardize, raw.C)]
    if raw.trees:
        views.append(_ProbeView(RAW_TREES, None, raw_pool, raw_test, trees=True))
    # So is the modality's handcrafted start where one is known (images, series): no data, no ε.
    if handcrafted is not None:
        views.append(_ProbeView(HANDCRAFTED_PROBE, None, *handcrafted.features(pool_inputs, test_inputs),
                                handcrafted.standardize, handcrafted.C))
    if LINEAR_PROBE in plan.methods:
        views += [frozen(RANDOM_INIT_PROBE, seed, encoder) for seed, encoder in random_inits.items()]
        if warm_start is not None:
            views.append(frozen(WARM_START_PROBE, None, warm_start))
        views.append(frozen(PRETRAINED_PROBE, None, pretrained))
    return views


def _handcrafted(plan: EvaluationConfig, modality: str) -> FeatureBaseline | None:
    """The modality's handcrafted control, unless the plan turned it off (evaluation.handcrafted)."""
    return handcrafted_baseline(modality) if plan.handcrafted else None


def _build_bench(
    encoder_factory: EncoderFactory,
    pretrained_state: dict[str, torch.Tensor],
    train: SiteDataset,
    test: SiteDataset,
    labels: ConsentedLabels,
    plan: EvaluationConfig,
    warm_start_state: dict[str, torch.Tensor] | None = None,
    device: torch.device | None = None,
) -> _Bench:
    # Test labels first: an unconsented test id stops the run before any train label is read.
    test_labels = np.asarray(labels.labels_for(test.sample_ids))
    pool_inputs, pool_labels = _consented_pool(train, labels)
    pretrained = encoder_factory(None)
    pretrained.load_state_dict(pretrained_state)
    random_inits = {seed: encoder_factory(seed) for seed in plan.random_init_seeds}
    warm_start = None
    if warm_start_state is not None:
        warm_start = encoder_factory(None)
        warm_start.load_state_dict(warm_start_state)
    # uint8 pixels become [0, 1] floats here, as in training: only the consented pool and the test set.
    test_inputs = unit_float(test.inputs)
    views = _probe_views(pool_inputs, test_inputs, pretrained, random_inits, plan, raw_baseline(train.modality), warm_start,
                         device, _handcrafted(plan, train.modality))
    return _Bench(pool_inputs, pool_labels, test_inputs, test_labels, pretrained, random_inits, views, warm_start, device)


def _runs_on_subset(
    bench: _Bench, subset: np.ndarray, seed_index: int, plan: EvaluationConfig
) -> Iterator[tuple[str, SeedRun]]:
    """Every planned row on one label subset; all rows see exactly these labels."""
    label_seed = plan.label_seeds[seed_index]
    subset_labels = bench.pool_labels[subset]
    for view in bench.views:
        if view.trees:
            accuracy = trees_accuracy(view.pool[subset], subset_labels, view.test, bench.test_labels, seed=label_seed)
        else:
            accuracy = linear_probe_accuracy(view.pool[subset], subset_labels, view.test, bench.test_labels,
                                             plan.probe_C if view.C is None else view.C, view.standardize)
        yield view.row, SeedRun(label_seed, view.init_seed, accuracy)
    if FINETUNE not in plan.methods:
        return
    # One init seed per label seed (cycled) keeps scratch fine-tuning affordable while its
    # spread still includes init variance.
    init_seed = plan.random_init_seeds[seed_index % len(plan.random_init_seeds)]
    starts = [(SCRATCH_FINETUNE, bench.random_inits[init_seed], init_seed)]
    if bench.warm_start is not None:
        starts.append((WARM_START_FINETUNE, bench.warm_start, None))
    starts.append((PRETRAINED_FINETUNE, bench.pretrained, None))
    for row, encoder, start_seed in starts:
        accuracy = finetune_accuracy(
            encoder,
            bench.pool_inputs[torch.as_tensor(subset)],
            subset_labels,
            bench.test_inputs,
            bench.test_labels,
            epochs=plan.finetune_epochs,
            lr=plan.finetune_lr,
            batch_size=plan.finetune_batch_size,
            seed=label_seed,  # same head init and batch order for every row: paired
            device=bench.device,
        )
        yield row, SeedRun(label_seed, start_seed, accuracy)


@contextmanager
def _single_threaded() -> Iterator[None]:
    """Run torch and BLAS (used by the probes' L-BFGS) on one thread; restore the caller's settings.

    The models and probes are tiny, so a second thread only adds waiting: on a busy 2-core
    machine the full digits table took 56 s with two torch threads and 21 s with one, and
    two-thread OpenBLAS made the probes' L-BFGS the largest cost after fine-tuning.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(previous)


def _planned_rows(plan: EvaluationConfig, warm_start: bool, raw_trees: bool = False, handcrafted: bool = False) -> list[str]:
    rows = {RAW_INPUT} | ({RAW_TREES} if raw_trees else set()) | ({HANDCRAFTED_PROBE} if handcrafted else set())
    if LINEAR_PROBE in plan.methods:
        rows |= {RANDOM_INIT_PROBE, PRETRAINED_PROBE} | ({WARM_START_PROBE} if warm_start else set())
    if FINETUNE in plan.methods:
        rows |= {SCRATCH_FINETUNE, PRETRAINED_FINETUNE} | ({WARM_START_FINETUNE} if warm_start else set())
    return [row for row in ROW_ORDER if row in rows]


def _run_every_fraction(
    bench: _Bench, plan: EvaluationConfig, num_train: int, num_classes: int, say: Progress, progress: Progress | None
) -> tuple[dict[tuple[str, float], list[SeedRun]], list[FractionInfo]]:
    """Every row's runs at each label fraction and seed; a fraction with too few consented labels is skipped."""
    num_consented = len(bench.pool_labels)
    runs: dict[tuple[str, float], list[SeedRun]] = defaultdict(list)
    fractions: list[FractionInfo] = []
    done, total = 0, len(plan.label_fractions) * len(plan.label_seeds)
    for fraction in plan.label_fractions:
        needed = plan.labels_needed(fraction, num_train, num_classes)
        if needed > num_consented:
            reason = f"needs {needed} labels but only {num_consented} train examples are consented"
            fractions.append(FractionInfo(fraction, needed, skipped=reason))
            say(f"{format_fraction(fraction)} labels: skipped, {reason}")
            done += len(plan.label_seeds)
            continue
        fractions.append(FractionInfo(fraction, needed))
        for seed_index, label_seed in enumerate(plan.label_seeds):
            subset = stratified_subset(bench.pool_labels, needed, label_seed)
            for row, run in _runs_on_subset(bench, subset, seed_index, plan):
                runs[(row, fraction)].append(run)
            done += 1
            tick(progress, f"{format_fraction(fraction)} labels ({needed}), label seed {label_seed} done", done, total)
    return runs, fractions


def evaluate_label_efficiency(
    *,
    encoder_factory: EncoderFactory,
    pretrained_state: dict[str, torch.Tensor],
    train: SiteDataset,
    test: SiteDataset,
    labels: ConsentedLabels,
    plan: EvaluationConfig,
    progress: Progress | None = None,
    warm_start_state: dict[str, torch.Tensor] | None = None,
    device: torch.device | None = None,
) -> EvalResults:
    """Accuracy of each row at each label fraction, over label seeds (and init seeds for random rows).

    `encoder_factory(seed)` must build the pretrained architecture; `None` means "any init", used
    only as the container for `pretrained_state` (and `warm_start_state`). With `warm_start_state`
    (the encoder the federation started from) the warm-start rows are added, read out exactly like
    the pretrained rows on the same label subsets and seeds; without it there are none.
    ``device`` runs the encoders (features, fine-tuning) there, e.g. on a GPU; the probes run on the host.
    Raises ConsentError if a test id is unconsented.
    A fraction needing more labels than there are consented train examples is skipped, with the
    reason recorded in the results.
    """
    plan.validate()
    say = progress or (lambda _message: None)
    started = time.perf_counter()
    with _single_threaded():
        bench = _build_bench(encoder_factory, pretrained_state, train, test, labels, plan, warm_start_state, device)
        num_train, num_consented = len(train.sample_ids), len(bench.pool_labels)
        num_classes = len(np.unique(bench.pool_labels))
        say(f"{num_consented}/{num_train} train examples consented, {len(bench.test_labels)} test examples")
        runs, fractions = _run_every_fraction(bench, plan, num_train, num_classes, say, progress)
    raw, handcrafted = raw_baseline(train.modality), _handcrafted(plan, train.modality)
    return EvalResults(
        plan=plan,
        rows=_planned_rows(plan, warm_start=warm_start_state is not None, raw_trees=raw.trees,
                           handcrafted=handcrafted is not None),
        fractions=fractions,
        cells={key: Cell(tuple(values)) for key, values in runs.items()},
        num_train=num_train,
        num_consented_train=num_consented,
        num_test=len(bench.test_labels),
        seconds=time.perf_counter() - started,
        raw_features=raw.name,
        handcrafted_features=handcrafted.name if handcrafted else None,
        class_names=list(labels.class_names) if labels.class_names else None,
    )
