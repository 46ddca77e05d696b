"""From an experiment config to concrete data: the edge loader, the central split and simulated sites.

Flower-free. The run pipeline, the ClientApp (in simulation) and evaluation all call
these functions, so a site in a Ray worker rebuilds exactly the partition the pipeline meant.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedssl.config import ExperimentConfig, load_config
from fedssl.data.consent import ConsentedLabels, ConsentManifest, label_source_from_array, make_demo_manifest
from fedssl.data.dataset import SiteDataset
from fedssl.data.labels import LabelTable, class_indexed, open_labels
from fedssl.data.loaders import load_digits_labeled, load_site_data
from fedssl.data.partition import UNLABELLED, make_site_dataset, partition
from fedssl.data.sampling import stratified_subset
from fedssl.errors import ConfigError, SimulatedDropoutError
from fedssl.layout import RunDir
from fedssl.sample_format import SampleFormat
from fedssl.training.local import SiteSettings


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """An experiment entering at the edge: ``load_config``'s checks plus the pretext registry's."""
    from fedssl.pretext import check_config

    config = load_config(path, overrides)
    check_config(config)
    return config


@dataclass(frozen=True)
class CentralData:
    """The pool sites pretrain on (``train``), the held-out ``test`` set and the only door to labels.

    ``labels`` (None for an unlabelled source) reads a label only for an id in its consent manifest,
    which is fixed from the ids alone before any label is read: the test split, the label-skew
    partition and the evaluation all see consented labels only, so an unconsented label shapes nothing.
    """

    train: SiteDataset
    test: SiteDataset
    labels: ConsentedLabels | None

    def train_partition_labels(self) -> np.ndarray:
        """The training pool's consented labels, UNLABELLED where there is no consent (for label skew)."""
        if self.labels is None:
            return np.full(len(self.train), UNLABELLED, dtype=np.int64)
        ids = self.train.sample_ids
        consented = consented_rows(ids, self.labels)
        out = np.full(len(ids), UNLABELLED, dtype=np.int64)
        out[consented] = self.labels.labels_for(ids[i] for i in consented)
        return out

    def validation_view(self, fraction: float, seed: int) -> CentralData:
        """The evaluation's view for ``evaluation.score_on: validation``: ``fraction`` of the consented training
        records (stratified by their consented labels, seeded) become the scored set, the rest stay the pool the
        label subsets are drawn from, and the test set is left out, so none of its labels is read.

        The sites pretrained on the whole training pool, validation records included (without their labels): the
        run scored on validation is the run that would be scored on the test set, only its scored set differs."""
        if self.labels is None:
            raise ConfigError("evaluation.score_on: validation needs consented labels; this data source has none")
        ids = self.train.sample_ids
        consented = consented_rows(ids, self.labels)
        size = int(round(len(consented) * fraction))
        consented_labels = self.labels.labels_for(ids[i] for i in consented)
        if size < len(np.unique(consented_labels)) or len(consented) - size < 2:
            raise ConfigError(f"evaluation.validation_fraction: {fraction:g} of the {len(consented)} consented training "
                              f"records leaves no class-covering validation set and label pool; consent more records "
                              f"or pick a fraction nearer 0.3")
        validation = consented[stratified_subset(consented_labels, size, seed)]
        pool = np.setdiff1d(np.arange(len(ids)), validation)
        return CentralData(make_site_dataset(self.train, pool), make_site_dataset(self.train, validation), self.labels)


@functools.lru_cache(maxsize=4)
def central_data(source: str, kind: str, test_fraction: float, seed: int,
                 consent_manifest: str | None = None, consented_fraction: float = 1.0,
                 labels: str | None = None, options: SampleFormat | None = None) -> CentralData:
    """The central split; ``consent_manifest`` (a file) or else a seeded demo consent of
    ``consented_fraction`` of the training pool plus the test set (fedssl.data.consent).
    ``labels`` is ``data.labels`` (fedssl.data.labels: an id,label CSV, ``folders``, an IDX label file); without labels (and not digits)
    the split is a seeded random one and there is nothing to evaluate against. ``options``: how the
    samples are read (``data.sample_format``: the cache keys on it, so not the config section itself)."""
    rng = np.random.default_rng(seed)
    full, table = _labelled_source(source, kind, labels, options)
    if table is None:
        order = rng.permutation(len(full))
        cut = int(round(len(full) * (1 - test_fraction)))
        return CentralData(make_site_dataset(full, np.sort(order[:cut])), make_site_dataset(full, np.sort(order[cut:])), None)
    ids = full.sample_ids
    # The demo consent draws from the labelled ids: which ids have a label row is not a label.
    labelled = [i for i in ids if i in table.ids]
    manifest = (ConsentManifest.load(consent_manifest) if consent_manifest
                else make_demo_manifest(labelled, test_fraction, consented_fraction, seed, round(test_fraction * len(ids))))
    label_source, class_names = class_indexed(table, [i for i in ids if i in manifest])
    consented = ConsentedLabels(manifest, label_source, class_names)
    train_idx, test_idx = consented_split(ids, consented, test_fraction, rng)
    return CentralData(make_site_dataset(full, train_idx), make_site_dataset(full, test_idx), consented)


def _labelled_source(source: str, kind: str, labels: str | None,
                     options: SampleFormat | None) -> tuple[SiteDataset, LabelTable | None]:
    """The full data set and its label table (None: unlabelled). No label is read here: class_indexed
    reads the consented ids' labels once the consent manifest is fixed."""
    if source == "digits":
        full, all_labels = load_digits_labeled()
        return full, LabelTable(frozenset(full.sample_ids), label_source_from_array(full.sample_ids, all_labels))
    full = load_site_data(source, kind, options)
    if labels is None:
        return full, None
    return full, open_labels(labels, full.sample_ids, source)


def central_data_for(config: ExperimentConfig) -> CentralData:
    ev, data = config.evaluation, config.data
    return central_data(data.source, data.kind, data.test_fraction, config.run.seed,
                        ev.consent_manifest, ev.consented_fraction, data.labels, data.sample_format)


def consented_rows(ids: Sequence[str], labels: ConsentedLabels) -> np.ndarray:
    """The positions in ``ids`` of consented samples, in order: the manifest is read, no label is."""
    return np.array([i for i, sample_id in enumerate(ids) if sample_id in labels.manifest], dtype=np.int64)


def consented_split(ids: Sequence[str], labels: ConsentedLabels, test_fraction: float,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices: a test set of ``test_fraction`` of all records, drawn from the consented
    ones and stratified by their labels; every other record, unconsented or not drawn, is training data."""
    consented = consented_rows(ids, labels)
    num_test = int(round(len(ids) * test_fraction))
    if num_test > len(consented):
        raise ConfigError(
            f"evaluation.consent_manifest: the test set ({num_test} records, data.test_fraction={test_fraction:g}) "
            f"is drawn from consented records but only {len(consented)} of {len(ids)} are consented; "
            "consent more records or lower data.test_fraction"
        )
    test = consented[stratified_subset(labels.labels_for(ids[i] for i in consented), num_test, rng)]
    train = np.setdiff1d(np.arange(len(ids)), test)
    return train, np.sort(test)


def site_partitions(config: ExperimentConfig) -> list[np.ndarray]:
    """Each simulated site's rows of the central training pool; [] with data.site_sources (each site has its own)."""
    if config.data.site_sources:
        return []
    data = central_data_for(config)
    labels = data.train_partition_labels()
    if config.data.partition == "dirichlet" and not (labels != UNLABELLED).any():
        raise ConfigError("data.partition: dirichlet label skew needs consented labels in the training pool; "
                          "use iid or quantity_skew, or consent some training records")
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


DROPOUT_STREAM = 0x0D0  # keeps the dropout draws apart from every other seeded stream of the run


def drops_out(config: ExperimentConfig, site_id: int, server_round: int) -> bool:
    """Whether simulated site ``site_id`` fails round ``server_round`` (``simulation.dropout``)."""
    if config.simulation.dropout == 0:
        return False
    draw = np.random.default_rng([config.run.seed, server_round, site_id, DROPOUT_STREAM]).random()
    return bool(draw < config.simulation.dropout)


def check_simulated_dropout(config_path: str, site_id: int, server_round: int) -> None:
    """Fail this round before any data is read or anything is charged, when the draw says so."""
    config, _ = _cached_partitions(config_path)
    if drops_out(config, site_id, server_round):
        raise SimulatedDropoutError(f"simulated dropout in round {server_round} (simulation.dropout={config.simulation.dropout:g})")


def simulated_site_from_config(config: ExperimentConfig, site_id: int, run_dir: Path | None = None) -> tuple[SiteDataset, SiteSettings]:
    return _site_from_parts(config, site_partitions(config), run_dir or config.run_dir(), site_id)


def _site_from_parts(config: ExperimentConfig, parts: list[np.ndarray], run_dir: Path, site_id: int) -> tuple[SiteDataset, SiteSettings]:
    sources = config.data.site_sources
    num_sites = len(sources) or len(parts)
    if not 0 <= site_id < num_sites:
        raise ConfigError(f"partition-id {site_id} out of range: the config has federation.num_sites={num_sites}")
    if sources:  # a real site partition: the whole file is the site's (the central test set is data.source's)
        return _site_source(sources[site_id], config.data.kind, config.data.sample_format), site_settings(config, run_dir, site_id)
    return make_site_dataset(central_data_for(config).train, parts[site_id]), site_settings(config, run_dir, site_id)


@functools.lru_cache(maxsize=4)
def _site_source(source: str, kind: str, options: SampleFormat) -> SiteDataset:
    return load_site_data(source, kind, options)
