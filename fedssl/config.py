"""Typed experiment configuration: every section's dataclass and its validation.

Validated once, at the edge (with the pretext registry's own checks: fedssl.experiment.load_experiment);
every later module may trust the values. Errors are one line naming the dotted key and the fix, e.g.
``privacy.target_epsilon: must be a finite number > 0 (...), got -1.0``. Files are read by
fedssl.typed_yaml: ``include: [base.yaml, ...]`` merges others under a file, ``--set a.b=c`` comes last.
Imports no training code (nor torch), so the ServerApp and the preflight check (fedssl.preflight) may load a config.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedssl.inputs import AUTO_READOUT, ENCODER_NAMES, IMAGE_ENCODERS, is_custom_spec, readout_problem
from fedssl.sample_format import SampleFormat

# The privacy sections live with the privacy code; importing them here keeps `fedssl.config` the one entry point.
from fedssl.privacy.settings import ACCOUNTANTS, CLIPPING_ENGINES, PrivacyConfig, SecureAggregationConfig, SiteDPConfig  # noqa: F401
from fedssl.typed_yaml import apply_override, build_section, check, load_yaml_with_includes, validate_sections


@dataclass
class RunConfig:
    name: str = "fedssl-run"
    output_dir: str = "runs"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:<k>

    def validate(self) -> None:
        check(bool(self.name) and "/" not in self.name, "run.name", "must be a non-empty name without '/'", self.name)
        check_device("run.device", self.device)


LABEL_FOLDERS = "folders"
LABELS_HELP = ("must be an id,label CSV (ids: the source's sample ids), 'folders' (image folders: the first folder "
               "is the class), an IDX label file for IDX images, or null")


PARTITIONS = ("iid", "dirichlet", "quantity_skew")  # fedssl.data.partition.PARTITIONERS' names (a test keeps them equal)


@dataclass
class DataConfig(SampleFormat):
    """The ``data:`` section: where the data is, how it is split, and (inherited from SampleFormat, one type
    with a deployed site's ``data:``) how its samples are read: image_size, max_length, categorical,
    categories, hash_buckets, series_length."""

    source: str = "digits"  # digits | a path to an image folder / .npy / .npz / .csv / IDX images
    kind: str = "auto"
    # The evaluation's labels (fedssl.data.labels): an id,label CSV keyed by the source's sample ids, "folders"
    # (an image folder's class folders) or an IDX label file of IDX images; read only through the consent
    # manifest (evaluation.consent_manifest, or a seeded demo consent), like every label.
    labels: str | None = None
    partition: str = "dirichlet"  # iid | dirichlet | quantity_skew
    alpha: float = 0.5
    # Simulation with real site partitions: one source per site (site i trains on all of site_sources[i]);
    # then data.partition is not used and data.source (+ data.labels) is only the central evaluation's data.
    site_sources: list[str] = field(default_factory=list)
    test_fraction: float = 0.3

    def validate(self) -> None:
        check(self.partition in PARTITIONS, "data.partition", f"valid choices: {', '.join(PARTITIONS)}", self.partition)
        check(self.alpha > 0, "data.alpha", "must be > 0 (smaller = more skewed)", self.alpha)
        check(0 < self.test_fraction < 1, "data.test_fraction", "must be in (0, 1)", self.test_fraction)
        super().validate()
        check(isinstance(self.site_sources, list) and all(isinstance(p, str) and p for p in self.site_sources),
              "data.site_sources", "must be a list of paths, one data source per simulated site, or [] to partition data.source",
              self.site_sources)
        check(self.labels is None or bool(self.labels), "data.labels", LABELS_HELP, self.labels)
        if self.labels:
            fmt = label_format(self.labels)
            check(fmt != "idx" or self.kind in ("auto", "idx"), "data.labels", "an IDX label file pairs with IDX images "
                  f"(data.kind idx or auto), not data.kind {self.kind}; give an id,label CSV keyed by the source's sample ids", self.labels)
            check(fmt != "folders" or self.kind in ("auto", "image_folder"), "data.labels", "folders labels an image folder's "
                  f"images by their first folder, not data.kind {self.kind}; give an id,label CSV keyed by the source's sample ids",
                  self.labels)
        check(self.labels is None or self.source != "digits", "data.labels",
              "must be null for data.source digits (its labels are built in)", self.labels)
        self.check_kind(self.kind)


def label_format(labels: str) -> str:
    """How data.labels is read (fedssl.data.labels): ``folders``, ``csv`` (a .csv path) or ``idx`` (another path)."""
    if labels == LABEL_FOLDERS:
        return LABEL_FOLDERS
    return "csv" if Path(labels).suffix.lower() == ".csv" else "idx"


STRATEGIES = ("fedavg", "fedmedian", "fedtrimmedavg")
ROBUST_STRATEGIES = ("fedmedian", "fedtrimmedavg")


@dataclass
class FederationConfig:
    num_sites: int = 5
    rounds: int = 5
    fraction_train: float = 1.0
    min_sites: int = 2
    strategy: str = "fedavg"  # fedavg | fedmedian | fedtrimmedavg (Flower's robust strategies; server/strategy.py)
    trim_fraction: float = 0.2  # fedtrimmedavg: the fraction cut off each tail, per coordinate (Flower's beta)
    # Reply validation (fedssl.fl.validation): an update may be at most this multiple of the global model's norm (null: no
    # bound). Honest rounds, DP noise included, move it by a fraction of its norm: 10x stops gross scaling, not subtle poison.
    max_update_norm: float | None = 10.0
    max_num_examples: int = 1_000_000  # largest FedAvg weight accepted: one site claiming 1e9 would own the average
    # How long the server waits for a round's replies. A site killed mid-round that rejoins
    # under the same node id never answers the lost message, so without a bound the round
    # (and the run) would wait for the full default hour.
    round_timeout: float = 3600.0
    # Where each site's local training starts: the global encoder, or FedEMA's divergence-aware mix with the
    # site's own last encoder (Zhuang et al., ICLR 2022; fedssl/training/fedema.py), kept at the site.
    local_update: str = "global"  # global | fedema
    fedema_tau: float = 0.7  # FedEMA's autoscaler: the mix weight of the site's own encoder at its second round

    @property
    def sites_per_round(self) -> int:
        """How many sites Flower's FedAvg samples per round: max(int(N * fraction_train), min_sites)."""
        return max(int(self.num_sites * self.fraction_train), self.min_sites)

    def validate(self) -> None:
        check(self.num_sites >= 1, "federation.num_sites", "must be >= 1", self.num_sites)
        check(self.rounds >= 1, "federation.rounds", "must be >= 1", self.rounds)
        check(0 < self.fraction_train <= 1, "federation.fraction_train", "must be in (0, 1]", self.fraction_train)
        check(1 <= self.min_sites <= self.num_sites, "federation.min_sites",
              f"must be between 1 and federation.num_sites ({self.num_sites})", self.min_sites)
        check(self.strategy in STRATEGIES, "federation.strategy", f"valid choices: {', '.join(STRATEGIES)}", self.strategy)
        check(0 <= self.trim_fraction < 0.5, "federation.trim_fraction", "must be in [0, 0.5)", self.trim_fraction)
        check(self.max_update_norm is None or 0 < self.max_update_norm < math.inf, "federation.max_update_norm",
              "must be a finite number > 0 (a multiple of the global model's norm), or null for no bound", self.max_update_norm)
        check(self.max_num_examples >= 1, "federation.max_num_examples", "must be an integer >= 1", self.max_num_examples)
        check(self.round_timeout > 0, "federation.round_timeout", "must be > 0 seconds", self.round_timeout)
        check(self.local_update in ("global", "fedema"), "federation.local_update", "valid choices: global, fedema", self.local_update)
        check(0 <= self.fedema_tau <= 1, "federation.fedema_tau", "must be in [0, 1]", self.fedema_tau)


@dataclass
class ModelConfig:
    encoder: str = "cnn"
    width: int = 64
    depth: int = 3
    # Shape of one input sample; empty = read from the data when the run starts. The
    # server needs it to build the initial encoder without touching any data.
    input_shape: list[int] = field(default_factory=list)
    # The image encoders' features: their last map averaged over a readout x readout grid. 0 = from
    # the image size (2x2 up to 16 px, 4x4 above; fedssl.inputs.readout_grid says why), 1 = global.
    readout: int = AUTO_READOUT

    def validate(self) -> None:
        check(all(d >= 1 for d in self.input_shape), "model.input_shape", "must be positive sizes, e.g. [1, 8, 8]", self.input_shape)
        check(self.encoder in ENCODER_NAMES or is_custom_spec(self.encoder), "model.encoder",
              f"valid choices: {', '.join(sorted(ENCODER_NAMES))}, or your own as 'package.module:factory'", self.encoder)
        check(
            not self.input_shape or self.encoder not in IMAGE_ENCODERS or len(self.input_shape) == 3,
            "model.input_shape",
            f"the {self.encoder} encoder needs images shaped [channels, height, width]; use model.encoder=mlp for vectors",
            self.input_shape,
        )
        check(1 <= self.width <= 4096, "model.width", "must be in [1, 4096]", self.width)
        check(1 <= self.depth <= 16, "model.depth", "must be in [1, 16]", self.depth)
        problem = readout_problem(self.encoder, self.readout)
        check(problem is None, "model.readout", problem or "", self.readout)


@dataclass
class PretextConfig:
    """Which pretext task, with its parameters. The task registry (fedssl.pretext) checks both,
    at the edge (fedssl.experiment.load_experiment): this module never imports training code."""

    name: str = "rotation"
    params: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        check(bool(self.name), "pretext.name", "must name a pretext task, e.g. rotation", self.name)


@dataclass
class TrainingConfig:
    local_steps: int = 20
    batch_size: int = 32
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9

    def validate(self) -> None:
        check(self.local_steps >= 1, "training.local_steps", "must be >= 1", self.local_steps)
        check(self.batch_size >= 1, "training.batch_size", "must be >= 1", self.batch_size)
        check(0 < self.lr <= 10, "training.lr", "must be in (0, 10]", self.lr)
        check(self.optimizer in ("sgd", "adam"), "training.optimizer", "valid choices: adam, sgd", self.optimizer)
        check(0 <= self.momentum < 1, "training.momentum", "must be in [0, 1)", self.momentum)


LINEAR_PROBE = "linear_probe"
FINETUNE = "finetune"
EVALUATION_METHODS = (FINETUNE, LINEAR_PROBE)
# What the evaluation scores on: the test set, or a validation set (fedssl.experiment.CentralData.validation_view).
SCORE_ON = (SCORE_ON_TEST, SCORE_ON_VALIDATION) = ("test", "validation")


@dataclass
class EvaluationConfig:
    """The central evaluation: which consented labels, and the probe / fine-tune recipe every row shares
    (fedssl.evaluation takes this section itself, so the recipe cannot drift from the config)."""

    enabled: bool = True
    label_fractions: list[float] = field(default_factory=lambda: [0.01, 0.05, 0.10])
    label_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    random_init_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    consented_fraction: float = 0.5
    consent_manifest: str | None = None
    methods: list[str] = field(default_factory=lambda: [LINEAR_PROBE, FINETUNE])
    finetune_epochs: int = 30
    finetune_lr: float = 0.003
    finetune_batch_size: int = 32
    probe_C: float = 1.0
    # Also probe features built from no data (fedssl.evaluation.baselines); off saves ROCKET's ~100 CPU-s per 1,000 x 1,000 series
    handcrafted: bool = True
    # Below this many labels a stratified sample cannot cover typical class counts, and
    # accuracies from a handful of labels are mostly noise.
    min_labels: int = 10
    # "validation": score on validation_fraction of the consented training records instead of the test set, whose
    # labels are then never read: for choosing settings (pretext, lr, rounds, ...) before one run scores the test set.
    score_on: str = SCORE_ON_TEST
    validation_fraction: float = 0.3

    def validate(self) -> None:
        fractions = self.label_fractions
        check(bool(fractions) and all(0 < f <= 1 for f in fractions) and len(set(fractions)) == len(fractions),
              "evaluation.label_fractions", "must be a non-empty list of distinct fractions in (0, 1]", fractions)
        check(bool(self.label_seeds), "evaluation.label_seeds", "must list at least one seed", self.label_seeds)
        check(bool(self.random_init_seeds), "evaluation.random_init_seeds", "must list at least one seed (the random-init control)",
              self.random_init_seeds)
        check(0 < self.consented_fraction <= 1, "evaluation.consented_fraction", "must be in (0, 1]", self.consented_fraction)
        check(bool(self.methods) and set(self.methods) <= set(EVALUATION_METHODS), "evaluation.methods",
              f"valid choices: {', '.join(EVALUATION_METHODS)}", self.methods)
        check(self.finetune_epochs >= 1, "evaluation.finetune_epochs", "must be >= 1", self.finetune_epochs)
        check(self.finetune_lr > 0, "evaluation.finetune_lr", "must be > 0", self.finetune_lr)
        check(self.finetune_batch_size >= 1, "evaluation.finetune_batch_size", "must be >= 1", self.finetune_batch_size)
        check(self.probe_C > 0, "evaluation.probe_C", "must be > 0", self.probe_C)
        check(self.min_labels >= 2, "evaluation.min_labels", "must be >= 2", self.min_labels)
        check(self.score_on in SCORE_ON, "evaluation.score_on", f"valid choices: {', '.join(SCORE_ON)}", self.score_on)
        check(0 < self.validation_fraction < 1, "evaluation.validation_fraction",
              "must be in (0, 1): the share of the consented training records scored on", self.validation_fraction)

    @property
    def scores_validation(self) -> bool:
        return self.score_on == SCORE_ON_VALIDATION

    def labels_needed(self, fraction: float, pool_size: int, num_classes: int) -> int:
        """Label count for a fraction of the central pool: never below the floor or one per class."""
        return max(self.min_labels, num_classes, round(fraction * pool_size))


@dataclass
class SimulationConfig:
    client_cpus: float = 1.0
    # How many simulated sites train at once (Flower's Ray actors; each imports torch, Opacus and fedssl once,
    # ~4 CPU-s, and then trains site after site). 0: as many as the machine's CPUs allow at client_cpus each.
    max_parallel_sites: int = 0
    # The chance that a sampled simulated site fails its round before training, as a crashed or unreachable
    # site would: to try a federation's dropout tolerance. Drawn from (run.seed, round, site), so reproducible.
    dropout: float = 0.0

    def validate(self) -> None:
        check(self.client_cpus > 0, "simulation.client_cpus", "must be > 0", self.client_cpus)
        check(isinstance(self.max_parallel_sites, int) and self.max_parallel_sites >= 0, "simulation.max_parallel_sites",
              "must be an integer >= 1, or 0 for as many as the machine's CPUs allow", self.max_parallel_sites)
        check(float(self.max_parallel_sites * self.client_cpus).is_integer(), "simulation.max_parallel_sites",
              f"times simulation.client_cpus ({self.client_cpus:g}) must be a whole number of CPUs (Ray's CPU count)",
              self.max_parallel_sites)
        check(0 <= self.dropout < 1, "simulation.dropout", "must be in [0, 1)", self.dropout)

    @property
    def ray_cpus(self) -> int | None:
        """The CPUs Ray is told it has, so that max_parallel_sites actors fit; None: Ray counts the machine's."""
        return int(self.max_parallel_sites * self.client_cpus) if self.max_parallel_sites else None


WARM_START_SOURCES = ("none", "synthetic", "path")


@dataclass
class WarmStartConfig:
    """The ``warm_start`` section: the initial encoder, pretrained on public data at no privacy cost.

    source: none | synthetic | path
      none       the server starts from a random encoder (seeded by run.seed)
      synthetic  pretrain on ``num_samples`` synthetic digits (fedssl.warmstart.pretrain)
      path       load ``path``: a checkpoint written by fedssl.warmstart or a plain encoder
                 state_dict; ``description`` must say what public data it was trained on
    ``pretext`` is checked against the task registry with the experiment's own pretext.
    """

    source: str = "none"
    path: str | None = None
    description: str = ""
    num_samples: int = 10000
    steps: int = 2000
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    pretext: str = "rotation"
    seed: int = 0

    def validate(self) -> None:
        check(self.source in WARM_START_SOURCES, "warm_start.source", f"valid choices: {', '.join(WARM_START_SOURCES)}", self.source)
        if self.source == "path":
            check(bool(self.path), "warm_start.path", "must name a checkpoint file when warm_start.source is path", self.path)
            check(
                bool(self.description.strip()),
                "warm_start.description",
                "say what public data the checkpoint was trained on (it goes into the privacy statement), e.g. 'ImageNet-1k, public'",
                self.description,
            )
        if self.source == "synthetic":
            for key, value, low in (("num_samples", self.num_samples, 10), ("steps", self.steps, 1), ("batch_size", self.batch_size, 1)):
                check(value >= low, f"warm_start.{key}", f"must be an integer >= {low}", value)
            check(0 < self.lr <= 10, "warm_start.lr", "must be in (0, 10]", self.lr)
            check(0 <= self.momentum < 1, "warm_start.momentum", "must be in [0, 1)", self.momentum)

    @property
    def enabled(self) -> bool:
        return self.source != "none"


@dataclass
class ExperimentConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretext: PretextConfig = field(default_factory=PretextConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    secure_aggregation: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)
    site_dp: SiteDPConfig = field(default_factory=SiteDPConfig)

    def validate(self) -> None:
        validate_sections(self)
        self._validate_aggregation()
        sources = self.data.site_sources
        check(not sources or self.federation.num_sites == len(sources), "federation.num_sites",
              f"must equal the {len(sources)} data.site_sources (one source per site; data.partition is not used)",
              self.federation.num_sites)

    def _validate_aggregation(self) -> None:
        sa, sampled = self.secure_aggregation, self.federation.sites_per_round
        if sa.enabled:
            check(sampled >= 2, "secure_aggregation.enabled", f"needs >= 2 sites per round, the federation samples {sampled}", sa.enabled)
            check(sa.num_shares <= 1 or sa.num_shares <= sampled, "secure_aggregation.num_shares",
              f"must be at most the {sampled} sites sampled per round", sa.num_shares)
            check(sa.reconstruction_threshold <= 1 or sa.reconstruction_threshold <= sampled,
              "secure_aggregation.reconstruction_threshold", f"must be at most the {sampled} sites sampled per round",
              sa.reconstruction_threshold)
        check(self.federation.strategy not in ROBUST_STRATEGIES or not (sa.enabled or self.site_dp.enabled), "federation.strategy",
              "must be fedavg with secure_aggregation (the server sees only the masked sum) or site_dp (its noise assumes the mean)",
              self.federation.strategy)
        if self.site_dp.enabled and sa.enabled:
            check(self.site_dp.side == "client", "site_dp.side",
              "must be client when secure_aggregation.enabled (the server cannot clip updates it never sees)", self.site_dp.side)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name


def check_device(key: str, device: str) -> None:
    check(device in ("auto", "cpu", "cuda") or device.startswith("cuda:"), key, "must be auto, cpu, cuda or cuda:<index>", device)


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load, merge includes, apply ``a.b=c`` overrides, convert to dataclasses, validate.

    Validates everything this module owns; the pretext task's own parameters are checked by its
    registry (``fedssl.experiment.load_experiment`` does both, for a config entering at the edge).
    """
    raw = load_yaml_with_includes(Path(path), "run, data, privacy, ...")
    for item in overrides or []:
        apply_override(raw, item)
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> ExperimentConfig:
    config = build_section(ExperimentConfig, raw)
    config.validate()
    return config


def save_config(config: ExperimentConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
