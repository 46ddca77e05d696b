"""Bring your own encoder: ``model.encoder: "package.module:factory"``, checked before anything trains.

The factory is called as ``factory(input_shape=(C, H, W) or (D,), width=model.width, depth=model.depth)``
and returns an ``nn.Module`` mapping a batch to ``(batch, features)``; fedssl reads ``out_dim`` from the
module if it has one, else from one forward pass on zeros. The coordinator and every site build it from
the same spec, so the module must be installed (importable) on each of them: a site runs only code it
installed itself (docs/threat-model.md), never code shipped in the app bundle.

A model Opacus cannot make private is refused at the edge by fedssl.models.private (kept apart: the
ServerApp builds encoders too and never imports Opacus), and again by each site's clipping engine.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

import torch
from torch import nn

from fedssl.errors import ConfigError
from fedssl.inputs import is_custom_spec  # noqa: F401 - the rule is torch-free (fedssl.inputs); re-exported


def load_factory(spec: str) -> Callable[..., nn.Module]:
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # an import error of any kind is the user's module, not fedssl
        raise ConfigError(
            f"model.encoder: cannot import {module_name!r} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            "install the module on the coordinator and at every site, or fix the name"
        ) from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ConfigError(f"model.encoder: {module_name!r} has no callable {attribute!r}; name a function or class that builds the encoder")
    return factory


def build_custom_encoder(spec: str, input_shape: Sequence[int], width: int, depth: int) -> nn.Module:
    """The user's encoder, with ``out_dim`` and ``input_shape`` set (Opacus' check: fedssl.models.private)."""
    shape = tuple(int(d) for d in input_shape)
    try:
        model = load_factory(spec)(input_shape=shape, width=width, depth=depth)
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(f"model.encoder: {spec}(input_shape={shape}, width={width}, depth={depth}) failed: "
                          f"{type(err).__name__}: {err}; it must accept those keyword arguments") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.encoder: {spec} returned {type(model).__name__}, not a torch.nn.Module")
    model.input_shape = shape
    if not isinstance(getattr(model, "out_dim", None), int):
        model.out_dim = _feature_count(model, spec, shape)
    return model


def _feature_count(model: nn.Module, spec: str, shape: tuple[int, ...]) -> int:
    with torch.no_grad():
        out = model(torch.zeros(2, *shape))
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"model.encoder: {spec} must return (batch, features) for input {shape}, got {got}; "
                          "end it with pooling and flatten, or set an out_dim attribute")
    return int(out.shape[1])
