"""The pretext-task interface every self-supervised method implements.

A :class:`PretextTask` is the validated configuration of one method; ``build_model`` turns an
encoder into a :class:`PretextModel`, the ``nn.Module`` that local training runs and that Opacus
wraps whole. The contract that keeps DP-SGD honest:

* ``forward(x)`` returns one loss per sample, shape ``(B,)``, and works for ``B == 0``
  (Poisson sampling yields empty batches);
* views, masks and rotations are drawn inside ``forward`` from the global torch RNG, with shapes
  that depend only on ``B``, so training is seedable;
* only layers Opacus computes per-sample gradients for (Linear, Conv2d, GroupNorm, LayerNorm),
  never BatchNorm, which mixes samples;
* site-only parts (heads, predictors, EMA targets) live beside ``encoder``, never inside it:
  only ``model.encoder.state_dict()`` leaves a site.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import typing
from typing import Any, ClassVar

import torch
from torch import nn

from fedssl.errors import ConfigError
from fedssl.inputs import IMAGE, VECTOR, modality_of_shape, modality_problem  # noqa: F401 - IMAGE, VECTOR re-exported
from fedssl.models.encoders import Encoder


def modality_of(encoder: Encoder) -> str:
    """``"image"`` for (channels, height, width) inputs, ``"vector"`` for anything flat."""
    return getattr(encoder, "modality", None) or modality_of_shape(encoder.input_shape)


# ---------------------------------------------------------------------------------------------
# Parameters: each task declares a frozen dataclass; bounds live in the field metadata so the
# declaration is also the validation and the error message.


@dataclasses.dataclass(frozen=True)
class Bounds:
    """A numeric interval; ``None`` leaves that side open-ended."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return ""


def param(
    default: Any,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A parameter field with its valid range, e.g. ``tau: float = param(0.99, ge=0, le=1)``."""
    bounds = Bounds(
        low=gt if gt is not None else ge,
        high=lt if lt is not None else le,
        low_open=gt is not None,
        high_open=lt is not None,
    )
    return dataclasses.field(default=default, metadata={"bounds": bounds})


@dataclasses.dataclass(frozen=True)
class PretextParams:
    """Base for a method's parameters (``pretext.params`` in the config)."""


_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number"}


def _check_param(key: str, value: Any, kind: type, bounds: Bounds | None) -> Any:
    # bool is an int subclass in Python; a YAML `true` must not pass as a width of 1.
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    rule = _TYPE_NAMES[kind] + (f" {bounds.describe()}" if bounds and bounds.describe() else "")
    if not ok or (bounds is not None and not bounds.contains(value)):
        raise ConfigError(f"pretext.params.{key}: must be {rule}, got {value!r}")
    return float(value) if kind is float else value


def parse_params(task_name: str, params_type: type[PretextParams], given: dict[str, Any]) -> PretextParams:
    """Validate user-given parameters against ``params_type``; unknown or invalid → ConfigError."""
    fields = {f.name: f for f in dataclasses.fields(params_type)}
    hints = typing.get_type_hints(params_type)
    checked: dict[str, Any] = {}
    for key, value in given.items():
        if key not in fields:
            valid = ", ".join(sorted(fields)) or "(none)"
            raise ConfigError(
                f"pretext.params.{key}: not a parameter of pretext {task_name!r}; valid parameters: {valid}"
            )
        checked[key] = _check_param(key, value, hints[key], fields[key].metadata.get("bounds"))
    return params_type(**checked)


# ---------------------------------------------------------------------------------------------
# Models and tasks


class PretextModel(nn.Module, abc.ABC):
    """Encoder + pretext head (+ any site-only parts). ``forward(x)`` -> per-sample loss, shape (B,)."""

    encoder: Encoder

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.encoder = encoder

    @abc.abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample pretext loss of a batch ``x``; shape ``(B,)``, also for ``B == 0``."""

    def after_optimizer_step(self) -> None:
        """Hook run after each optimizer step (BYOL moves its EMA target here). Default: nothing."""


# Every registered task by name: filled by fedssl.pretext.registry.register_pretext (which owns
# registration and lookup), held here so a task can name the alternatives that fit an encoder.
REGISTERED_TASKS: dict[str, type[PretextTask]] = {}


class PretextTask(abc.ABC):
    """A configured self-supervised method: validated parameters and a model factory."""

    name: ClassVar[str]
    paper: ClassVar[str]
    # True only if sample i's loss depends on sample i alone; DP-SGD's per-sample clipping is
    # meaningless otherwise, and the trainer refuses the method under DP.
    dp_compatible: ClassVar[bool]
    # For dp_compatible=False: how the loss couples samples, completing "pretext 'x' ...".
    coupling: ClassVar[str] = ""
    modalities: ClassVar[frozenset[str]]
    Params: ClassVar[type[PretextParams]] = PretextParams

    def __init__(self, **params: Any) -> None:
        self.params = parse_params(self.name, self.Params, params)

    def build_model(self, encoder: Encoder, feature_blocks: tuple[int, ...] = ()) -> PretextModel:
        """Wrap ``encoder`` in this method's model; the encoder object is used, not copied.

        ``feature_blocks``: a table's categorical one-hot block sizes at the end of each row
        (fedssl.tables); tasks that corrupt single features (VIME) treat a block as one feature,
        the others see plain vectors."""
        # The rule (and its message) is fedssl.inputs', which the preflight check applies before torch loads.
        if (problem := modality_problem(self.name, encoder.input_shape, modality_of(encoder))) is not None:
            raise ConfigError(f"pretext.name: {problem}")
        if feature_blocks and self.takes_feature_blocks:
            return self._build_table(encoder, tuple(feature_blocks))
        return self._build(encoder, modality_of(encoder))

    takes_feature_blocks: ClassVar[bool] = False

    def _build_table(self, encoder: Encoder, feature_blocks: tuple[int, ...]) -> PretextModel:
        """For ``takes_feature_blocks`` tasks: the model for rows ending in categorical one-hot blocks."""
        raise NotImplementedError

    @abc.abstractmethod
    def _build(self, encoder: Encoder, modality: str) -> PretextModel:
        """Build the model for an encoder whose modality is already known to be supported."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params})"


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear-LayerNorm-ReLU-Linear: the projector/predictor shape of BYOL, SimSiam and SimCLR.

    LayerNorm stands in for the papers' BatchNorm: it normalises within one sample, so the
    per-sample loss stays per-sample and Opacus can compute per-sample gradients.
    """
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, out_dim)
    )


@torch.no_grad()
def ema_update(online: list[nn.Module], target: list[nn.Module], tau: float) -> None:
    """``target <- tau * target + (1 - tau) * online`` for parameters; buffers copied (BYOL, MoCo).

    Run after the optimizer step, from weights the DP optimizer already clipped and noised: post-processing,
    no privacy cost."""
    for o_module, t_module in zip(online, target, strict=True):
        for o, t in zip(o_module.parameters(), t_module.parameters(), strict=True):
            t.lerp_(o, 1 - tau)  # t + (1 - tau) (o - t) = tau t + (1 - tau) o
        for o, t in zip(o_module.buffers(), t_module.buffers(), strict=True):
            t.copy_(o)  # buffers are statistics or counters, not weights to average


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity, shape ``(B,)``; safe for zero vectors and empty batches."""
    return (nn.functional.normalize(a, dim=-1) * nn.functional.normalize(b, dim=-1)).sum(dim=-1)
