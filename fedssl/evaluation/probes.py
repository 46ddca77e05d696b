"""The two ways to read out an encoder: a linear probe on frozen features, and end-to-end fine-tuning."""

from __future__ import annotations

import copy

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from fedssl.models.encoders import Encoder

FEATURE_BATCH = 512


def encode(model: nn.Module, inputs: torch.Tensor) -> np.ndarray:
    """Frozen outputs, computed in no-grad batches so large pools fit in memory."""
    model.eval()
    with torch.no_grad():
        # torch.split keeps one empty batch for an empty input, so an empty pool still has a shape.
        return torch.cat([model(batch) for batch in torch.split(inputs, FEATURE_BATCH)]).numpy()


def flatten_inputs(inputs: torch.Tensor) -> np.ndarray:
    return inputs.flatten(1).numpy()


def linear_probe_accuracy(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, C: float,
    standardize: bool = True,
) -> float:
    """Test accuracy of a (standardized) multinomial logistic regression; ``train_x`` may be sparse (TF-IDF)."""
    # Standardizing puts raw pixels, random features and pretrained features on one scale,
    # so a single C is a fair setting for every row.
    steps = [StandardScaler()] if standardize else []
    probe = make_pipeline(*steps, LogisticRegression(C=C, max_iter=2000))
    probe.fit(train_x, train_y)
    return float(np.mean(probe.predict(test_x) == test_y))


def trees_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, seed: int) -> float:
    """Test accuracy of gradient-boosted trees (scikit-learn's histogram GBDT, default settings): on tables
    the usual strong baseline, which a linear probe of the raw columns may understate."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    trees = HistGradientBoostingClassifier(random_state=seed, early_stopping=False)
    trees.fit(train_x, train_y)
    return float(np.mean(trees.predict(test_x) == test_y))


def finetune_accuracy(
    encoder: Encoder,
    train_inputs: torch.Tensor,
    train_y: np.ndarray,
    test_inputs: torch.Tensor,
    test_y: np.ndarray,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> float:
    """Train a copy of `encoder` plus a linear head end-to-end with Adam; return test accuracy.

    The caller's encoder is left untouched, so one pretrained model serves every label subset.
    """
    classes, targets = np.unique(train_y, return_inverse=True)
    generator = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(encoder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(model.out_dim, len(classes))
    net = nn.Sequential(model, head)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    target_tensor = torch.as_tensor(targets, dtype=torch.long)
    net.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(train_inputs), generator=generator).split(batch_size):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(net(train_inputs[batch]), target_tensor[batch])
            loss.backward()
            optimizer.step()
    logits = encode(net, test_inputs)
    return float(np.mean(classes[logits.argmax(axis=1)] == test_y))
