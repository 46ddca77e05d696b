"""Tables and vectors get a second raw-feature row: gradient-boosted trees on the same features and label
subsets as the logistic-regression row, checked against a direct fit; images do not (test_evaluation.py)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.ensemble import HistGradientBoostingClassifier

from fedssl.config import EvaluationConfig
from fedssl.data import ConsentedLabels, ConsentManifest, SiteDataset, label_source_from_array
from fedssl.data.sampling import stratified_subset
from fedssl.evaluation import PRETRAINED_PROBE, RANDOM_INIT_PROBE, RAW_INPUT, evaluate_label_efficiency
from fedssl.evaluation.results import RAW_TREES
from fedssl.models import build_encoder


def _table(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Numbers and a one-hot column; the class is an interaction (xor) a linear model cannot draw, trees can."""
    rng = np.random.default_rng(seed)
    numbers = rng.normal(size=(count, 2)).astype(np.float32)
    category = rng.integers(0, 3, size=count)
    labels = ((numbers[:, 0] > 0) ^ (numbers[:, 1] > 0)).astype(np.int64)
    return np.concatenate([numbers, np.eye(3, dtype=np.float32)[category]], axis=1), labels


def test_trees_row_is_a_direct_gbdt_fit_on_the_same_label_subset() -> None:
    (train_x, train_y), (test_x, test_y) = _table(300, 0), _table(200, 1)
    train = SiteDataset(torch.from_numpy(train_x), tuple(f"a{i}" for i in range(300)), "vector", feature_blocks=(3,))
    test = SiteDataset(torch.from_numpy(test_x), tuple(f"b{i}" for i in range(200)), "vector", feature_blocks=(3,))
    ids = train.sample_ids + test.sample_ids
    labels = ConsentedLabels(ConsentManifest(frozenset(ids)), label_source_from_array(ids, np.concatenate([train_y, test_y])))
    plan = EvaluationConfig(label_fractions=[0.5], label_seeds=[3], random_init_seeds=[0], methods=["linear_probe"])

    def factory(seed: int | None):
        return build_encoder("mlp", (5,), width=8, depth=1, seed=seed)

    results = evaluate_label_efficiency(encoder_factory=factory, pretrained_state=factory(None).state_dict(),
                                        train=train, test=test, labels=labels, plan=plan)
    assert results.rows == [RAW_INPUT, RAW_TREES, RANDOM_INIT_PROBE, PRETRAINED_PROBE]
    subset = stratified_subset(train_y, 150, 3)  # the evaluation's subset: consented pool = the whole train set
    direct = HistGradientBoostingClassifier(random_state=3, early_stopping=False).fit(train_x[subset], train_y[subset])
    assert results.cell(RAW_TREES, 0.5).accuracies == (float(np.mean(direct.predict(test_x) == test_y)),)
    assert results.cell(RAW_TREES, 0.5).mean > 0.85 > results.cell(RAW_INPUT, 0.5).mean  # xor: trees, not a line
    assert "| raw_input_trees |" in results.markdown_table()
