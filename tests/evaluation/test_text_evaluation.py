"""Text evaluates like images: probe and fine-tune on token ids (never scaled like pixels), the controls,
and a raw-input row that fits the modality (TF-IDF for text), all on tiny real lines."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedssl.config import EvaluationConfig
from fedssl.data import ConsentedLabels, ConsentManifest, SiteDataset, label_source_from_array
from fedssl.data.text import encode_all
from fedssl.evaluation import PRETRAINED_FINETUNE, PRETRAINED_PROBE, RANDOM_INIT_PROBE, RAW_INPUT, SCRATCH_FINETUNE
from fedssl.evaluation import evaluate_label_efficiency
from fedssl.evaluation.baselines import RAW_BASELINES, handcrafted_baseline, raw_baseline, tfidf
from fedssl.models import build_encoder

MAX_LENGTH = 24
# Each class has its own words; which word a line uses varies, so only word identity tells the class.
WORDS = (("stolen card", "lost card", "card blocked"), ("transfer fee", "wire cost", "fee refund"),
         ("new password", "reset login", "password locked"))


def _texts(count: int, seed: int) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=count)
    return [f"{rng.integers(100)} {WORDS[c][rng.integers(3)]} please" for c in labels], labels


def _dataset(texts: list[str], prefix: str) -> SiteDataset:
    ids = tuple(f"{prefix}-{i}" for i in range(len(texts)))
    return SiteDataset(torch.tensor(encode_all(texts, MAX_LENGTH), dtype=torch.float32), ids, "text")


def test_text_rows_probe_token_ids_and_tfidf() -> None:
    (train_texts, train_y), (test_texts, test_y) = _texts(90, 0), _texts(45, 1)
    train, test = _dataset(train_texts, "train"), _dataset(test_texts, "test")
    ids = train.sample_ids + test.sample_ids
    labels = ConsentedLabels(ConsentManifest(frozenset(ids)), label_source_from_array(ids, np.concatenate([train_y, test_y])))
    seen: list[float] = []

    def factory(seed: int | None):
        encoder = build_encoder("transformer", (MAX_LENGTH,), width=16, depth=1, seed=seed)
        encoder.register_forward_pre_hook(lambda _m, args: seen.append(float(args[0].max())))
        return encoder

    plan = EvaluationConfig(label_fractions=[0.5], label_seeds=[0], random_init_seeds=[0],
                            methods=["linear_probe", "finetune"], finetune_epochs=2)
    results = evaluate_label_efficiency(encoder_factory=factory, pretrained_state=factory(None).state_dict(),
                                        train=train, test=test, labels=labels, plan=plan)
    assert results.rows == [RAW_INPUT, RANDOM_INIT_PROBE, PRETRAINED_PROBE, SCRATCH_FINETUNE, PRETRAINED_FINETUNE]
    assert results.raw_features == "tf-idf" and "| raw_input (tf-idf) |" in results.markdown_table()
    # token ids reach the encoder as ids (bytes + 3 go past 100), not divided into [0, 1] like pixels
    assert min(seen) > 100
    # the words decide the class, so TF-IDF of the decoded text must nearly solve it
    assert results.cell(RAW_INPUT, 0.5).mean >= 0.9
    assert all(0 <= cell.mean <= 1 for cell in results.cells.values())


def test_tfidf_reads_the_decoded_text_fitted_on_the_pool_only() -> None:
    pool = torch.tensor(encode_all(["card card", "fee"], 8), dtype=torch.float32)
    test = torch.tensor(encode_all(["zzz unseen"], 8), dtype=torch.float32)
    pool_x, test_x = tfidf(pool, test)
    assert pool_x.shape[0] == 2 and test_x.shape == (1, pool_x.shape[1])
    assert test_x[0, :].count_nonzero() < pool_x[0, :].count_nonzero()  # 'z' n-grams are not in the pool's vocabulary


def test_the_raw_baseline_is_chosen_per_modality_in_one_place() -> None:
    from fedssl.data.dataset import SAMPLE_NDIM

    # every modality a SiteDataset can hold has its raw-input row: a new modality cannot go unbaselined
    assert set(RAW_BASELINES) == set(SAMPLE_NDIM)
    assert {m: b.name for m, b in RAW_BASELINES.items()} == {"image": "pixels", "vector": "features", "text": "tf-idf",
                                                            "timeseries": "series"}
    with pytest.raises(ValueError, match="valid choices: image, text, timeseries, vector"):
        raw_baseline("audio")
    # the zero-cost handcrafted row: where one is known, and an unknown modality is refused there too
    assert {m: getattr(handcrafted_baseline(m), "name", None) for m in SAMPLE_NDIM} == {
        "image": "gabor bank", "vector": None, "text": None, "timeseries": "rocket"}
    with pytest.raises(ValueError, match="valid choices: image, text, timeseries, vector"):
        handcrafted_baseline("audio")
