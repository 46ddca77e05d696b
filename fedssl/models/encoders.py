"""Small Opacus-compatible encoders: a CNN for images and an MLP for vectors."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedssl.inputs import AUTO_READOUT, readout_grid


class Encoder(nn.Module):
    """Base class: maps a batch of inputs to a (batch, out_dim) feature matrix."""

    out_dim: int
    input_shape: tuple[int, ...]
    readout: int | None = None  # the image encoders' pooling grid side (model.readout resolved); None: no grid


def groups_for(channels: int) -> int:
    # GroupNorm needs channels divisible by the group count; 8 groups where possible.
    for groups in (8, 4, 2):
        if channels % groups == 0:
            return groups
    return 1


class ConvEncoder(Encoder):
    """``depth`` 3x3 conv blocks with GroupNorm, then adaptive average pooling to a readout grid.

    The pooled feature map (``readout**2 * width`` values) keeps the spatial layout a linear probe
    relies on; ``readout`` 0 picks the grid from the image size (fedssl.inputs.readout_grid says how).
    """

    def __init__(self, input_shape: Sequence[int], width: int = 64, depth: int = 3, readout: int = AUTO_READOUT) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(
                f"model.encoder=cnn needs image inputs shaped (channels, height, width), got {tuple(input_shape)}; "
                "use model.encoder=mlp for vector data"
            )
        self.input_shape = tuple(int(d) for d in input_shape)
        channels = self.input_shape[0]
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [
                nn.Conv2d(channels, width, kernel_size=3, padding=1),
                nn.GroupNorm(groups_for(width), width),
                nn.ReLU(),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        self.readout = readout_grid(readout, self.input_shape)
        self.pool = nn.AdaptiveAvgPool2d((self.readout, self.readout))
        self.out_dim = width * self.readout**2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


class MLPEncoder(Encoder):
    """Fully connected blocks with LayerNorm for tabular or flattened inputs."""

    def __init__(self, input_shape: Sequence[int], width: int = 128, depth: int = 2) -> None:
        super().__init__()
        self.input_shape = tuple(int(d) for d in input_shape)
        in_dim = 1
        for d in self.input_shape:
            in_dim *= d
        layers: list[nn.Module] = [nn.Flatten()]
        for _ in range(depth):
            layers += [nn.Linear(in_dim, width), nn.LayerNorm(width), nn.ReLU()]
            in_dim = width
        self.net = nn.Sequential(*layers)
        self.out_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
