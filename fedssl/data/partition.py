"""Split one data set into simulated sites.

Every partitioner is seeded and deterministic and returns, per site, a sorted array of
sample indices. The sites are disjoint, cover every sample and are never empty. Consented labels
may shape a partition (label skew; every other record is marked UNLABELLED and dealt at random),
but only indices come out, so labels never reach site code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from fedssl.data.dataset import SiteDataset
from fedssl.errors import ConfigError

Partition = list[np.ndarray]
# The label of a record whose label may not be read (no consent): label skew never looks at it.
UNLABELLED = -1


def iid(num_samples: int, num_sites: int, seed: int) -> Partition:
    """Shuffle, then deal out equal shares (sizes differ by at most one)."""
    _check_sites(num_samples, num_sites, min_size=1)
    order = np.random.default_rng(seed).permutation(num_samples)
    return _sorted_parts(np.array_split(order, num_sites))


def dirichlet(labels: np.ndarray, num_sites: int, alpha: float, seed: int, min_size: int = 1) -> Partition:
    """Label skew after Hsu, Qi & Brown (2019), "Measuring the effects of non-identical data
    distribution for federated visual classification", over the records whose label may be read.

    Each site draws its class mix q ~ Dir(alpha * p), where p is the class distribution of the
    labelled records, and fills an equal share of them by drawing classes from q without
    replacement; when a class runs out, the site's remaining draws follow q renormalised
    over the classes still available. alpha -> 0 gives one-class sites, alpha -> inf IID.

    Records labelled :data:`UNLABELLED` (no consent to read their label) are dealt out at random,
    after the skew, so the partition depends on consented labels only; with none, it is the
    original algorithm exactly. Site sizes are equal (within one record), so label skew is not
    confounded with quantity skew (that is ``quantity_skew``), and no resampling is needed to keep
    every site non-empty, which keeps it exact for a thousand sites. Sites are filled in order, so
    the last sites take what is left and may deviate most from their drawn mix.
    """
    labels = _check_labels(labels)
    _check_alpha(alpha)
    _check_sites(len(labels), num_sites, min_size)
    rng = np.random.default_rng(seed)
    labelled, unlabelled = np.flatnonzero(labels != UNLABELLED), np.flatnonzero(labels == UNLABELLED)
    skewed = _label_skew(labels[labelled], num_sites, alpha, rng)
    # Reversed: the sites that took one labelled record more take one unlabelled record fewer.
    dealt = np.array_split(rng.permutation(unlabelled), num_sites)[::-1]
    return _sorted_parts([np.concatenate([labelled[part], extra]) for part, extra in zip(skewed, dealt)])


def _label_skew(labels: np.ndarray, num_sites: int, alpha: float, rng: np.random.Generator) -> Partition:
    """Positions in ``labels`` per site, following each site's Dirichlet class mix (see :func:`dirichlet`)."""
    if len(labels) == 0:
        return [np.zeros(0, dtype=np.int64) for _ in range(num_sites)]
    classes, class_of = np.unique(labels, return_inverse=True)
    pools = [rng.permutation(np.flatnonzero(class_of == c)) for c in range(len(classes))]
    remaining = np.array([len(pool) for pool in pools])
    mixes = rng.dirichlet(alpha * remaining / len(labels), size=num_sites)
    parts: Partition = []
    for size, mix in zip(_equal_sizes(len(labels), num_sites), mixes):
        counts = _draw_class_counts(size, mix, remaining, rng)
        parts.append(np.concatenate([pools[c][remaining[c] - counts[c] : remaining[c]] for c in range(len(pools))]))
        remaining = remaining - counts
    return parts


def quantity_skew(num_samples: int, num_sites: int, seed: int, alpha: float, min_size: int = 1) -> Partition:
    """Site sizes follow Dirichlet(alpha) proportions; samples are assigned at random (labels ignored).

    Every site first gets ``min_size`` samples and the rest are shared out multinomially, so
    no site is empty without resampling. Smaller alpha means more unequal sizes.
    """
    _check_alpha(alpha)
    _check_sites(num_samples, num_sites, min_size)
    rng = np.random.default_rng(seed)
    shares = rng.dirichlet(np.full(num_sites, alpha))
    sizes = min_size + rng.multinomial(num_samples - num_sites * min_size, shares)
    order = rng.permutation(num_samples)
    return _sorted_parts(np.split(order, np.cumsum(sizes)[:-1]))


PartitionerFn = Callable[[np.ndarray, int, int, float], Partition]  # (labels, num_sites, seed, alpha)

PARTITIONERS: dict[str, PartitionerFn] = {
    "iid": lambda labels, num_sites, seed, alpha: iid(len(labels), num_sites, seed),
    "dirichlet": lambda labels, num_sites, seed, alpha: dirichlet(labels, num_sites, alpha, seed),
    "quantity_skew": lambda labels, num_sites, seed, alpha: quantity_skew(len(labels), num_sites, seed, alpha),
}


def partition(name: str, *, labels: np.ndarray, num_sites: int, seed: int, alpha: float) -> Partition:
    """Run the partitioner called ``name``; ``alpha`` is ignored by "iid"."""
    if name not in PARTITIONERS:
        raise ValueError(f"unknown partitioner {name!r}; valid choices: {', '.join(sorted(PARTITIONERS))}")
    return PARTITIONERS[name](np.asarray(labels), num_sites, seed, alpha)


def make_site_dataset(base: SiteDataset, indices: Sequence[int] | np.ndarray) -> SiteDataset:
    """The site's own rows of ``base``; copies only those rows, so a thousand sites cost one data set."""
    return base.subset(indices)


def _draw_class_counts(size: int, mix: np.ndarray, available: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Class counts for one site: ``size`` draws from ``mix`` without exceeding ``available``.

    Draws landing on an exhausted class are redrawn over the classes left, which matches
    drawing one sample at a time with renormalisation; each pass exhausts a class or finishes.
    """
    counts = np.zeros_like(available)
    while (missing := size - counts.sum()) > 0:
        open_classes = available - counts > 0
        weights = mix * open_classes
        if weights.sum() <= 0:  # the site's favoured classes are gone: take what is left uniformly
            weights = open_classes.astype(float)
        drawn = rng.multinomial(missing, weights / weights.sum())
        counts += np.minimum(drawn, available - counts)
    return counts


def _equal_sizes(num_samples: int, num_sites: int) -> np.ndarray:
    sizes = np.full(num_sites, num_samples // num_sites)
    sizes[: num_samples % num_sites] += 1
    return sizes


def _sorted_parts(parts: Sequence[np.ndarray]) -> Partition:
    # Sorted indices read the base data in order, which keeps site datasets reproducible.
    return [np.sort(part).astype(np.int64) for part in parts]


def _check_sites(num_samples: int, num_sites: int, min_size: int) -> None:
    if num_sites < 1:
        raise ConfigError(f"federation.num_sites must be >= 1, got {num_sites}")
    if min_size < 1:
        raise ConfigError(f"partition min_size must be >= 1, got {min_size}")
    if num_sites * min_size > num_samples:
        raise ConfigError(
            f"federation.num_sites={num_sites} needs {num_sites * min_size} samples ({min_size} per site) "
            f"but the data has {num_samples}; use fewer sites or more data"
        )


def _check_alpha(alpha: float) -> None:
    if not np.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"data.alpha must be a finite number > 0 (smaller = more skewed), got {alpha}")


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ConfigError(f"partition labels must be a 1-D array, got shape {labels.shape}")
    return labels
