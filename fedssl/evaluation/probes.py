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


def encode(model: nn.Module, inputs: torch.Tensor, device: torch.device | None = None) -> np.ndarray:
    """Frozen outputs, computed in no-grad batches so large pools fit in memory (and, on ``device``, in
    the GPU's: the pool stays in host memory and goes over one batch at a time). The model is left where it was."""
    model.eval()
    home = _device_of(model)
    target = device or home
    model.to(target)
    try:
        with torch.no_grad():
            # torch.split keeps one empty batch for an empty input, so an empty pool still has a shape.
            return torch.cat([model(batch.to(target, non_blocking=True)).cpu()
                              for batch in torch.split(inputs, FEATURE_BATCH)]).numpy()
    finally:
        model.to(home)


def _device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


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
    device: torch.device | None = None,
) -> float:
    """Train a copy of `encoder` plus a linear head end-to-end with Adam (on ``device``, default the encoder's);
    return test accuracy.

    The caller's encoder is left untouched, so one pretrained model serves every label subset. The head's init
    and the batch order come from CPU generators, so they are the same on every device.
    """
    classes, targets = np.unique(train_y, return_inverse=True)
    generator = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(encoder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(model.out_dim, len(classes))
    target = device or _device_of(model)
    net = nn.Sequential(model, head).to(target)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    # The labelled subset is small: it moves to the device once, not per batch.
    train_inputs = train_inputs.to(target)
    target_tensor = torch.as_tensor(targets, dtype=torch.long, device=target)
    net.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(train_inputs), generator=generator).split(batch_size):
            batch = batch.to(target)
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(net(train_inputs[batch]), target_tensor[batch])
            loss.backward()
            optimizer.step()
    logits = encode(net, test_inputs)
    return float(np.mean(classes[logits.argmax(axis=1)] == test_y))
