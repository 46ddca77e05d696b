"""The encoder registry: one factory, so the server's initial weights and every site's model match."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from fedssl.models.encoders import ConvEncoder, Encoder, MLPEncoder
from fedssl.models.resnet import ResNetGNEncoder

ENCODERS: dict[str, Callable[..., Encoder]] = {"cnn": ConvEncoder, "mlp": MLPEncoder, "resnet": ResNetGNEncoder}
# Encoders that take (channels, height, width) images; the others take any shape, flattened.
IMAGE_ENCODERS = frozenset({"cnn", "resnet"})


def build_encoder(
    kind: str, input_shape: Sequence[int], width: int = 64, depth: int = 3, seed: int | None = None
) -> Encoder:
    """Build an encoder by name; the same call on server and sites gives the same keys."""
    if kind not in ENCODERS:
        raise ValueError(f"unknown encoder {kind!r}; valid choices: {', '.join(sorted(ENCODERS))}")
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return ENCODERS[kind](input_shape, width=width, depth=depth)
    return ENCODERS[kind](input_shape, width=width, depth=depth)


def encoder_state_keys(encoder: nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter/buffer names and shapes of an encoder: the only arrays allowed to leave a site."""
    return {name: tuple(t.shape) for name, t in encoder.state_dict().items()}
