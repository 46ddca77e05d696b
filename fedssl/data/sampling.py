"""Seeded, stratified draws by label: the central test split and the evaluation's label subsets.

Callers pass labels they were allowed to read, i.e. consented labels only (fedssl.data.consent);
the draws depend on nothing else, so labels outside the manifest cannot shape them.
The same seed gives the same subset to every row of the evaluation table.
"""

from __future__ import annotations

import numpy as np


def _class_quotas(counts: np.ndarray, size: int) -> np.ndarray:
    """Per-class counts summing to `size`: proportional, largest remainder, at least one each.

    The floor of one keeps rare classes in tiny subsets, where a purely proportional draw
    would drop them and the probe could never predict them.
    """
    quota = counts / counts.sum() * size
    take = np.clip(np.floor(quota).astype(int), 1, counts)
    remainder = quota - take
    while take.sum() < size:
        open_classes = np.flatnonzero(take < counts)
        pick = open_classes[np.argmax(remainder[open_classes])]
        take[pick] += 1
        remainder[pick] -= 1
    while take.sum() > size:  # only when the floor of one overshot
        shrinkable = np.flatnonzero(take > 1)
        pick = shrinkable[np.argmin(remainder[shrinkable])]
        take[pick] -= 1
        remainder[pick] += 1
    return take


def stratified_subset(labels: np.ndarray, size: int, seed: int | np.random.Generator) -> np.ndarray:
    """Sorted indices of `size` examples whose class mix follows `labels`."""
    classes, counts = np.unique(labels, return_counts=True)
    if size > len(labels):
        raise ValueError(f"cannot draw {size} labels from {len(labels)} examples")
    if size < len(classes):
        raise ValueError(f"{size} labels cannot cover {len(classes)} classes")
    rng = np.random.default_rng(seed)
    chosen = [
        rng.choice(np.flatnonzero(labels == cls), size=k, replace=False)
        for cls, k in zip(classes, _class_quotas(counts, size))
    ]
    return np.sort(np.concatenate(chosen))


def stratified_split(labels: np.ndarray, test_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices with ``test_fraction`` of every class in test (for a fully labelled set)."""
    train, test = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        cut = int(round(len(members) * (1 - test_fraction)))
        train.append(members[:cut])
        test.append(members[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
