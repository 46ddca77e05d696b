"""Typed experiment configuration: YAML in, validated dataclasses out.

Validation happens once, here, at the edge: every later module may trust the values.
Errors are one line and name the dotted key and the fix, e.g.
``privacy.target_epsilon: must be > 0, got -1 (set a positive budget such as 8)``.

A YAML file may pull in others with ``include: [base.yaml, pretext/rotation.yaml]``
(paths relative to the including file); later files and the file's own keys win.
``--set a.b=c`` overrides are applied last and parsed as YAML scalars.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedssl.errors import ConfigError
from fedssl.warmstart import WarmStartConfig  # the `warm_start:` section (stdlib-only import)


@dataclass
class RunConfig:
    name: str = "fedssl-run"
    output_dir: str = "runs"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:<k>

    def validate(self) -> None:
        _check(bool(self.name) and "/" not in self.name, "run.name", "must be a non-empty name without '/'", self.name)
        _check(
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
            "run.device",
            "must be auto, cpu, cuda or cuda:<index>",
            self.device,
        )


@dataclass
class DataConfig:
    source: str = "digits"  # digits | a path to an image folder / .npy / .npz / .csv
    kind: str = "auto"
    partition: str = "dirichlet"  # iid | dirichlet | quantity_skew
    alpha: float = 0.5
    test_fraction: float = 0.3

    def validate(self) -> None:
        _check(self.alpha > 0, "data.alpha", "must be > 0 (smaller = more skewed)", self.alpha)
        _check(0 < self.test_fraction < 1, "data.test_fraction", "must be in (0, 1)", self.test_fraction)


@dataclass
class FederationConfig:
    num_sites: int = 5
    rounds: int = 5
    fraction_train: float = 1.0
    min_sites: int = 2
    strategy: str = "fedavg"
    # How long the server waits for a round's replies. A site killed mid-round that rejoins
    # under the same node id never answers the lost message, so without a bound the round
    # (and the run) would wait for the full default hour.
    round_timeout: float = 3600.0

    def validate(self) -> None:
        _check(self.num_sites >= 1, "federation.num_sites", "must be >= 1", self.num_sites)
        _check(self.rounds >= 1, "federation.rounds", "must be >= 1", self.rounds)
        _check(0 < self.fraction_train <= 1, "federation.fraction_train", "must be in (0, 1]", self.fraction_train)
        _check(
            1 <= self.min_sites <= self.num_sites,
            "federation.min_sites",
            f"must be between 1 and federation.num_sites ({self.num_sites})",
            self.min_sites,
        )
        _check(self.strategy in ("fedavg",), "federation.strategy", "valid choices: fedavg", self.strategy)
        _check(self.round_timeout > 0, "federation.round_timeout", "must be > 0 seconds", self.round_timeout)


@dataclass
class ModelConfig:
    encoder: str = "cnn"
    width: int = 64
    depth: int = 3
    # Shape of one input sample; empty = read from the data when the run starts. The
    # server needs it to build the initial encoder without touching any data.
    input_shape: list[int] = field(default_factory=list)

    def validate(self) -> None:
        from fedssl.models import ENCODERS

        _check(all(d >= 1 for d in self.input_shape), "model.input_shape", "must be positive sizes, e.g. [1, 8, 8]", self.input_shape)
        _check(self.encoder in ENCODERS, "model.encoder", f"valid choices: {', '.join(sorted(ENCODERS))}", self.encoder)
        _check(
            not self.input_shape or self.encoder != "cnn" or len(self.input_shape) == 3,
            "model.input_shape",
            "the cnn encoder needs images shaped [channels, height, width]; use model.encoder=mlp for vectors",
            self.input_shape,
        )
        _check(1 <= self.width <= 4096, "model.width", "must be in [1, 4096]", self.width)
        _check(1 <= self.depth <= 16, "model.depth", "must be in [1, 16]", self.depth)


@dataclass
class PretextConfig:
    name: str = "rotation"
    params: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        from fedssl.pretext import PRETEXT_TASKS, get_pretext

        _check(self.name in PRETEXT_TASKS, "pretext.name", f"valid choices: {', '.join(sorted(PRETEXT_TASKS))}", self.name)
        get_pretext(self.name, self.params)  # raises ConfigError naming pretext.params.<key>


@dataclass
class TrainingConfig:
    local_steps: int = 20
    batch_size: int = 32
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9

    def validate(self) -> None:
        _check(self.local_steps >= 1, "training.local_steps", "must be >= 1", self.local_steps)
        _check(self.batch_size >= 1, "training.batch_size", "must be >= 1", self.batch_size)
        _check(0 < self.lr <= 10, "training.lr", "must be in (0, 10]", self.lr)
        _check(self.optimizer in ("sgd", "adam"), "training.optimizer", "valid choices: adam, sgd", self.optimizer)
        _check(0 <= self.momentum < 1, "training.momentum", "must be in [0, 1)", self.momentum)


CLIPPING_ENGINES = ("bookkeeping", "opacus")


@dataclass
class PrivacyConfig:
    enabled: bool = True
    target_epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    # Per-sample clipping engine; both clip exactly, with Opacus' noise and accounting.
    # bookkeeping: fedssl.privacy.bookkeeping, one backward pass without ordinary weight
    # gradients (faster: benchmarks/README.md section 1); opacus: Opacus' hooks mode.
    clipping: str = "bookkeeping"

    def validate(self) -> None:
        if not self.enabled:
            return
        _check(
            0 < self.target_epsilon < math.inf,
            "privacy.target_epsilon",
            "must be a finite number > 0 (for no DP set privacy.enabled=false)",
            self.target_epsilon,
        )
        _check(0 < self.delta < 1, "privacy.delta", "must be in (0, 1), typically below 1/num_samples", self.delta)
        _check(self.max_grad_norm > 0, "privacy.max_grad_norm", "must be > 0", self.max_grad_norm)
        # Opacus' "gdp" accountant under-reports ε for subsampled mechanisms (the audit
        # measured 1.56 where PLD gives 2.18), so it is not offered.
        _check(self.accountant in ("rdp", "prv"), "privacy.accountant", "valid choices: prv, rdp", self.accountant)
        _check(self.clipping in CLIPPING_ENGINES, "privacy.clipping", f"valid choices: {', '.join(CLIPPING_ENGINES)}", self.clipping)


@dataclass
class EvaluationConfig:
    enabled: bool = True
    label_fractions: list[float] = field(default_factory=lambda: [0.01, 0.05, 0.10])
    label_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    random_init_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    consented_fraction: float = 0.5
    consent_manifest: str | None = None
    methods: list[str] = field(default_factory=lambda: ["linear_probe", "finetune"])
    finetune_epochs: int = 30
    finetune_lr: float = 0.003
    finetune_batch_size: int = 32
    probe_C: float = 1.0

    def validate(self) -> None:
        _check(
            bool(self.label_fractions) and all(0 < f <= 1 for f in self.label_fractions),
            "evaluation.label_fractions",
            "must be a non-empty list of fractions in (0, 1]",
            self.label_fractions,
        )
        _check(bool(self.label_seeds), "evaluation.label_seeds", "must list at least one seed", self.label_seeds)
        _check(0 < self.consented_fraction <= 1, "evaluation.consented_fraction", "must be in (0, 1]", self.consented_fraction)
        valid_methods = {"linear_probe", "finetune"}
        _check(
            bool(self.methods) and set(self.methods) <= valid_methods,
            "evaluation.methods",
            "valid choices: finetune, linear_probe",
            self.methods,
        )
        _check(self.finetune_epochs >= 1, "evaluation.finetune_epochs", "must be >= 1", self.finetune_epochs)
        _check(self.probe_C > 0, "evaluation.probe_C", "must be > 0", self.probe_C)


@dataclass
class SimulationConfig:
    client_cpus: float = 1.0
    max_parallel_sites: int = 2

    def validate(self) -> None:
        _check(self.client_cpus > 0, "simulation.client_cpus", "must be > 0", self.client_cpus)
        _check(self.max_parallel_sites >= 1, "simulation.max_parallel_sites", "must be >= 1", self.max_parallel_sites)


@dataclass
class SecureAggregationConfig:
    """Flower's SecAgg+ (legacy workflow + client mod): the server learns only the sum of site updates."""

    enabled: bool = False
    # Shares per site secret: a whole number >= 3, or a fraction in (0, 1] of the sites sampled per round.
    num_shares: float = 1.0
    # Shares needed to reconstruct a secret: a whole number >= 2 (below num_shares), or a fraction in (0, 1]
    # of num_shares. More = safer against colluding sites; fewer = more dropouts tolerated.
    reconstruction_threshold: float = 0.67
    clipping_range: float = 8.0  # weights are clipped to [-r, r] before quantization
    quantization_range: int = 4194304  # 2**22 levels over [-r, r]
    modulus_range: int = 4294967296  # 2**32: masks are uniform mod this
    max_weight: float = 1000.0  # largest FedAvg weight (examples) a site sends; larger ones are capped
    # Seconds to wait per protocol stage. None waits for every sampled site: fine in simulation (a crashed
    # site answers with an error), but in a deployment set it, or a site that vanishes stalls the round.
    timeout: float | None = None

    def validate(self) -> None:
        if not self.enabled:
            return
        shares, threshold = self.num_shares, self.reconstruction_threshold
        _check(
            0 < shares <= 1 or (shares >= 3 and float(shares).is_integer()),
            "secure_aggregation.num_shares",
            "must be a fraction in (0, 1] of the sampled sites or a whole number >= 3",
            shares,
        )
        _check(
            0 < threshold <= 1 or (threshold >= 2 and float(threshold).is_integer()),
            "secure_aggregation.reconstruction_threshold",
            "must be a fraction in (0, 1] of num_shares or a whole number >= 2",
            threshold,
        )
        if shares > 1 and threshold > 1:
            _check(threshold < shares, "secure_aggregation.reconstruction_threshold",
                   f"must be below secure_aggregation.num_shares ({shares:g})", threshold)
        _check(self.clipping_range > 0, "secure_aggregation.clipping_range", "must be > 0", self.clipping_range)
        _check(self.quantization_range >= 2, "secure_aggregation.quantization_range", "must be an integer >= 2", self.quantization_range)
        _check(
            self.modulus_range > self.quantization_range and self.modulus_range & (self.modulus_range - 1) == 0
            and self.modulus_range <= 2**32,
            "secure_aggregation.modulus_range",
            "must be a power of 2 above quantization_range and at most 2**32",
            self.modulus_range,
        )
        _check(self.max_weight > 0, "secure_aggregation.max_weight", "must be > 0", self.max_weight)
        _check(self.timeout is None or self.timeout > 0, "secure_aggregation.timeout", "must be > 0 seconds or null", self.timeout)


@dataclass
class SiteDPConfig:
    """Site-level (central) DP: each site's round update is clipped, the server noises the mean."""

    enabled: bool = False
    side: str = "client"  # where updates are clipped: client (Flower fixedclipping_mod) | server
    clipping_norm: float = 1.0  # L2 bound on one site's update (its weights minus the global) per round
    noise_multiplier: float | None = None  # sigma: noise std = sigma * clipping_norm on the sum of updates
    target_epsilon: float | None = None  # budget for the run; without noise_multiplier, sigma is calibrated to it
    delta: float = 1.0e-5

    def validate(self) -> None:
        if not self.enabled:
            return
        _check(self.side in ("client", "server"), "site_dp.side", "valid choices: client, server", self.side)
        _check(self.clipping_norm > 0, "site_dp.clipping_norm", "must be > 0", self.clipping_norm)
        _check(
            self.noise_multiplier is not None or self.target_epsilon is not None,
            "site_dp.noise_multiplier",
            "set it (or site_dp.target_epsilon to calibrate it)",
            self.noise_multiplier,
        )
        _check(self.noise_multiplier is None or 0 < self.noise_multiplier < math.inf, "site_dp.noise_multiplier",
               "must be a finite number > 0", self.noise_multiplier)
        _check(self.target_epsilon is None or 0 < self.target_epsilon < math.inf, "site_dp.target_epsilon",
               "must be a finite number > 0", self.target_epsilon)
        _check(0 < self.delta < 1, "site_dp.delta", "must be in (0, 1), well below 1/federation.num_sites", self.delta)


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
        for section in dataclasses.fields(self):
            getattr(self, section.name).validate()
        self._validate_aggregation()
        if self.privacy.enabled:
            from fedssl.pretext import get_pretext, require_dp_compatible

            try:
                require_dp_compatible(get_pretext(self.pretext.name, self.pretext.params))
            except Exception as err:  # PrivacyError: surface it as the config problem it is
                raise ConfigError(f"pretext.name: {err}") from None

    def _validate_aggregation(self) -> None:
        sa, sampled = self.secure_aggregation, sites_per_round(self.federation)
        if sa.enabled:
            _check(sampled >= 2, "secure_aggregation.enabled", f"needs >= 2 sites per round, the federation samples {sampled}", sa.enabled)
            _check(sa.num_shares <= 1 or sa.num_shares <= sampled, "secure_aggregation.num_shares",
                   f"must be at most the {sampled} sites sampled per round", sa.num_shares)
            _check(sa.reconstruction_threshold <= 1 or sa.reconstruction_threshold <= sampled,
                   "secure_aggregation.reconstruction_threshold", f"must be at most the {sampled} sites sampled per round",
                   sa.reconstruction_threshold)
        if self.site_dp.enabled and sa.enabled:
            _check(self.site_dp.side == "client", "site_dp.side",
                   "must be client when secure_aggregation.enabled (the server cannot clip updates it never sees)", self.site_dp.side)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name


def sites_per_round(federation: FederationConfig) -> int:
    """How many sites Flower's FedAvg samples per round: max(int(N * fraction_train), min_sites)."""
    return max(int(federation.num_sites * federation.fraction_train), federation.min_sites)


def _check(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: {rule}, got {value!r}")


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load, merge includes, apply ``a.b=c`` overrides, convert to dataclasses, validate."""
    raw = _load_yaml_with_includes(Path(path), seen=())
    for item in overrides or []:
        _apply_override(raw, item)
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> ExperimentConfig:
    config = _build(ExperimentConfig, raw, prefix="")
    config.validate()
    return config


def save_config(config: ExperimentConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def read_yaml_mapping(path: Path, sections: str) -> dict[str, Any]:
    """The top-level mapping of the YAML file at ``path``; anything else is a one-line ConfigError
    naming the file (and line) and the fix. ``sections`` names the expected top-level keys."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read it as a text file ({type(err).__name__}); pass a UTF-8 YAML file") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', err)}); fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections ({sections})")
    return data


def _load_yaml_with_includes(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"include: {path} includes itself (cycle through {' -> '.join(map(str, seen))})")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass the path of a YAML file, e.g. configs/experiments/digits-demo.yaml")
    data = read_yaml_mapping(path, "run, data, privacy, ...")
    includes = data.pop("include", []) or []
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(inc, str) for inc in includes):
        raise ConfigError(f"include: in {path} must be a file name or a list of file names, got {includes!r}")
    merged: dict[str, Any] = {}
    for inc in includes:
        _deep_merge(merged, _load_yaml_with_includes(path.parent / inc, seen + (path,)))
    _deep_merge(merged, data)
    return merged


def _deep_merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if value is None and isinstance(into.get(key), dict):
            continue  # an empty `section:` in a later file keeps what earlier files set
        if isinstance(value, dict) and isinstance(into.get(key), dict) and key != "params":
            _deep_merge(into[key], value)
        else:
            into[key] = value


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set privacy.target_epsilon=4")
    dotted, _, text = item.partition("=")
    parts = dotted.strip().split(".")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    node = raw
    for part in parts[:-1]:
        if node.get(part) is None:  # absent, or an empty section (`run:` with nothing under it)
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {part} is not a section")
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known, key=str)  # YAML keys may be numbers too
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key; valid keys under {prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(known))}"
        )
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, prefix=f"{key}.")
        else:
            values[name] = _coerce(value, hint, key)
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 1e-5 as a string
            except ValueError:
                pass
        raise ConfigError(f"{key}: must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: must be a string, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: must be a mapping, got {value!r}")
        return dict(value)
    return value
