"""The baselines that learn nothing from the sites: linear classifiers on fixed features of the inputs, per modality.

The raw-input baseline is the floor any learned representation must beat, so it must be a fair one for the data:
flattened pixels or feature columns for images and vectors, but for text the flattened byte ids would be a straw
man (a byte's id at position 17 means nothing), so text gets TF-IDF of character n-grams, the standard
bag-of-n-grams text classifier. One mapping, :data:`RAW_BASELINES`, decides; a new modality adds one entry.

The handcrafted baseline is the best zero-privacy-cost start known for a modality, where one is: features
built from no data and no training, so any site could use them at ε = 0 (images: a fixed Gabor filter bank,
fedssl.evaluation.handcrafted; time series: ROCKET's random convolutional kernels, fedssl.evaluation.rocket). A
private encoder that does not beat it has bought nothing with its ε.
:data:`HANDCRAFTED_BASELINES` holds them; a modality without an entry has no such row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy import sparse

from fedssl.evaluation.handcrafted import gabor_features
from fedssl.evaluation.probes import encode, flatten_inputs
from fedssl.evaluation.rocket import Rocket

Features = np.ndarray | sparse.spmatrix
# (consented pool inputs, test inputs) -> (pool features, test features); fitted on the pool's inputs only
FeatureFit = Callable[[torch.Tensor, torch.Tensor], tuple[Features, Features]]


@dataclass(frozen=True)
class FeatureBaseline:
    """How a baseline row reads a modality: its fixed features and the probe that fits them."""

    name: str  # shown in the report: "raw_input (<name>)", "handcrafted_probe (<name>)"
    features: FeatureFit
    # Standardize the features (one C fits pixels and encoder features alike); TF-IDF is already scaled.
    standardize: bool = True
    C: float | None = None  # None: the plan's probe_C, as every other probe row
    # Also fit gradient-boosted trees on the same features (row raw_input_trees): for feature columns (tables:
    # numbers and one-hot categories) trees are the baseline to beat, and they cost seconds on such tables.
    trees: bool = False


def flattened(pool: torch.Tensor, test: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    return flatten_inputs(pool), flatten_inputs(test)


# TF-IDF over character 1-4-grams within word boundaries: robust to the byte tokenizer's truncation and to
# spelling, with no trained vocabulary leaving the coordinator. Settings picked on a validation split of the
# fortunes training pool (configs/experiments/fortunes-mlm.yaml), never on the test set.
TFIDF_NGRAMS = (1, 4)
TFIDF_MAX_FEATURES = 50_000
TFIDF_C = 10.0


def tfidf(pool: torch.Tensor, test: torch.Tensor) -> tuple[sparse.spmatrix, sparse.spmatrix]:
    from sklearn.feature_extraction.text import TfidfVectorizer

    from fedssl.data.text import decode

    vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=TFIDF_NGRAMS, sublinear_tf=True,
                                 max_features=TFIDF_MAX_FEATURES)
    pool_texts, test_texts = ([decode(row) for row in inputs.long().tolist()] for inputs in (pool, test))
    return vectorizer.fit_transform(pool_texts), vectorizer.transform(test_texts)


def gabor_bank(pool: torch.Tensor, test: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    return gabor_features(pool), gabor_features(test)


def rocket(pool: torch.Tensor, test: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    transform = Rocket(*pool.shape[1:])  # the kernels depend on the series' shape and a fixed seed only
    return encode(transform, pool), encode(transform, test)


PIXELS = FeatureBaseline("pixels", flattened)
RAW_BASELINES: dict[str, FeatureBaseline] = {
    "image": PIXELS,
    "vector": FeatureBaseline("features", flattened, trees=True),
    "text": FeatureBaseline("tf-idf", tfidf, standardize=False, C=TFIDF_C),
    "timeseries": FeatureBaseline("series", flattened),  # every channel's every step, standardized
}
# Standardized like the encoders' features and read with the plan's probe_C, as on the flagship's validation screens.
HANDCRAFTED_BASELINES: dict[str, FeatureBaseline] = {
    "image": FeatureBaseline("gabor bank", gabor_bank),
    "timeseries": FeatureBaseline("rocket", rocket),
}


def raw_baseline(modality: str) -> FeatureBaseline:
    if modality not in RAW_BASELINES:
        raise ValueError(f"no raw-input baseline for modality {modality!r}; valid choices: {', '.join(sorted(RAW_BASELINES))}")
    return RAW_BASELINES[modality]


def handcrafted_baseline(modality: str) -> FeatureBaseline | None:
    """The modality's zero-cost handcrafted features, or None where none is known (tables: the trees on the raw
    columns are the strong baseline; text: TF-IDF, already the raw-input row)."""
    raw_baseline(modality)  # an unknown modality is refused here too, with the valid choices
    return HANDCRAFTED_BASELINES.get(modality)
