"""The encoder registry: one factory, so the server's initial weights and every site's model match."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from fedssl.config import ModelConfig
from fedssl.inputs import AUTO_READOUT, IMAGE_ENCODERS, READOUT_ENCODERS, is_custom_spec, readout_problem  # noqa: F401 - IMAGE_ENCODERS re-exported
from fedssl.models.custom import build_custom_encoder
from fedssl.models.encoders import ConvEncoder, Encoder, MLPEncoder
from fedssl.models.resnet import ResNetGNEncoder
from fedssl.models.series import Conv1dEncoder
from fedssl.models.text import TextTransformerEncoder
from fedssl.models.vit import ViTEncoder

# The names and which of them take images are fedssl.inputs' (torch-free, for the config and preflight).
ENCODERS: dict[str, Callable[..., Encoder]] = {"cnn": ConvEncoder, "conv1d": Conv1dEncoder, "mlp": MLPEncoder,
                                           "resnet": ResNetGNEncoder,
                                           "transformer": TextTransformerEncoder, "vit": ViTEncoder}


def build_encoder(
    kind: str, input_shape: Sequence[int], width: int = 64, depth: int = 3, seed: int | None = None,
    readout: int = AUTO_READOUT,
) -> Encoder:
    """Build an encoder by name or ``package.module:factory`` spec; the same call on server and sites gives the same keys.

    ``readout``: the image encoders' pooling grid (model.readout; 0 = chosen from the image size). It
    holds no weights, so it changes the features, not the keys."""
    if kind not in ENCODERS and not is_custom_spec(kind):
        raise ValueError(f"unknown encoder {kind!r}; valid choices: {', '.join(sorted(ENCODERS))}, or 'package.module:factory'")
    problem = readout_problem(kind, readout)
    if problem:
        raise ValueError(f"readout {problem}, got {readout!r}")

    def build() -> Encoder:
        if kind in READOUT_ENCODERS:
            return ENCODERS[kind](input_shape, width=width, depth=depth, readout=readout)
        if kind in ENCODERS:
            return ENCODERS[kind](input_shape, width=width, depth=depth)
        return build_custom_encoder(kind, input_shape, width, depth)

    if seed is None:
        return build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def encoder_for(model: ModelConfig, input_shape: Sequence[int] | None = None, seed: int | None = None) -> Encoder:
    """The encoder a run's ``model`` settings describe, on ``input_shape`` (default: model.input_shape)."""
    shape = model.input_shape if input_shape is None else input_shape
    return build_encoder(model.encoder, shape, width=model.width, depth=model.depth, seed=seed, readout=model.readout)


def encoder_state_keys(encoder: nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter/buffer names and shapes of an encoder: the only arrays allowed to leave a site."""
    return {name: tuple(t.shape) for name, t in encoder.state_dict().items()}
