"""From an experiment config to concrete data: the edge loader, the central split and simulated sites.

Flower-free. The run pipeline, the ClientApp (in simulation) and evaluation all call
these functions, so a site in a Ray worker rebuilds exactly the partition the pipeline meant.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedssl.config import ExperimentConfig, load_config
from fedssl.data.dataset import SiteDataset
from fedssl.data.loaders import load_digits_labeled, load_site_data
from fedssl.data.partition import make_site_dataset, partition
from fedssl.errors import ConfigError
from fedssl.layout import RunDir
from fedssl.training.local import SiteSettings


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """An experiment entering at the edge: ``load_config``'s checks plus the pretext registry's."""
    from fedssl.pretext import check_config

    config = load_config(path, overrides)
    check_config(config)
    return config


@dataclass(frozen=True)
class CentralData:
    """The pool sites pretrain on (``train``) and the held-out ``test`` set.

    ``labels`` exist only for simulation bookkeeping: the partitioner may use them to
    shape label skew, and evaluation reads them only through the consent manifest.
    """

    train: SiteDataset
    test: SiteDataset
    train_labels: np.ndarray | None
    test_labels: np.ndarray | None


@functools.lru_cache(maxsize=4)
def central_data(source: str, kind: str, test_fraction: float, seed: int) -> CentralData:
    if source == "digits":
        full, labels = load_digits_labeled()
    else:
        full, labels = load_site_data(source, kind), None
    rng = np.random.default_rng(seed)
    train_idx, test_idx = _split(len(full), labels, test_fraction, rng)
    return CentralData(
        train=make_site_dataset(full, train_idx),
        test=make_site_dataset(full, test_idx),
        train_labels=None if labels is None else labels[train_idx],
        test_labels=None if labels is None else labels[test_idx],
    )


def central_data_for(config: ExperimentConfig) -> CentralData:
    return central_data(config.data.source, config.data.kind, config.data.test_fraction, config.run.seed)


def _split(n: int, labels: np.ndarray | None, test_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Stratified by label when labels exist, so small label fractions still see every class."""
    if labels is None:
        order = rng.permutation(n)
        cut = int(round(n * (1 - test_fraction)))
        return np.sort(order[:cut]), np.sort(order[cut:])
    return stratified_split(labels, test_fraction, rng)


def stratified_split(labels: np.ndarray, test_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices with ``test_fraction`` of every class in test."""
    train, test = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        cut = int(round(len(members) * (1 - test_fraction)))
        train.append(members[:cut])
        test.append(members[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def site_partitions(config: ExperimentConfig) -> list[np.ndarray]:
    data = central_data_for(config)
    if data.train_labels is None and config.data.partition == "dirichlet":
        raise ConfigError("data.partition: dirichlet label skew needs labels; use iid or quantity_skew for unlabelled data")
    labels = data.train_labels if data.train_labels is not None else np.zeros(len(data.train), dtype=int)
    return partition(
        config.data.partition,
        labels=labels,
        num_sites=config.federation.num_sites,
        seed=config.run.seed,
        alpha=config.data.alpha,
    )


@functools.lru_cache(maxsize=2)
def _cached_partitions(config_path: str) -> tuple[ExperimentConfig, list[np.ndarray]]:
    config = load_config(config_path)
    return config, site_partitions(config)


def site_settings(config: ExperimentConfig, run_dir: Path, site_id: int) -> SiteSettings:
    return SiteSettings(
        site_id=site_id,
        state_dir=RunDir(run_dir).site_state(site_id),
        privacy=config.privacy,
        device=config.run.device,
        highwater_path=RunDir(run_dir).site_highwater(site_id),
    )


def simulated_site(config_path: str, run_dir: str, site_id: int) -> tuple[SiteDataset, SiteSettings]:
    """Site ``site_id``'s unlabelled rows and its settings; cached per worker process."""
    config, parts = _cached_partitions(config_path)
    return _site_from_parts(config, parts, Path(run_dir), site_id)


def simulated_site_from_config(config: ExperimentConfig, site_id: int, run_dir: Path | None = None) -> tuple[SiteDataset, SiteSettings]:
    return _site_from_parts(config, site_partitions(config), run_dir or config.run_dir(), site_id)


def _site_from_parts(config: ExperimentConfig, parts: list[np.ndarray], run_dir: Path, site_id: int) -> tuple[SiteDataset, SiteSettings]:
    if not 0 <= site_id < len(parts):
        raise ConfigError(f"partition-id {site_id} out of range: the config has federation.num_sites={len(parts)}")
    data = central_data_for(config)
    return make_site_dataset(data.train, parts[site_id]), site_settings(config, run_dir, site_id)
