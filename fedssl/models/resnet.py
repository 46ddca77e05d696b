"""ResNet-GN: a ResNet-18-style encoder with GroupNorm, adapted to small images.

He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), with the changes private
training on small images needs:

- **GroupNorm instead of BatchNorm** (Wu & He, "Group Normalization", ECCV 2018): BatchNorm mixes the
  samples of a batch, so per-sample gradients, and with them DP-SGD, are undefined (Opacus refuses it).
  GroupNorm is the usual replacement in DP image models (Kurakin et al. 2022; De et al. 2022).
- **A 3x3 stride-1 stem and no max-pool**, as in the CIFAR variants of the paper: the ImageNet stem
  (7x7 stride 2 + max-pool) would shrink a 28x28 image to 7x7 before the first block.
- Four stages of ``depth`` basic blocks (ResNet-18: depth 2) with widths ``width x (1, 2, 4, 8)``; every
  stage after the first halves the resolution with a stride-2 3x3 conv and a 1x1 stride-2 shortcut.
- **Readout: adaptive average pooling to a ``readout x readout`` grid, flattened**
  (``readout**2 x 8 x width`` features), not the paper's global average pool (``readout`` 1). A linear
  probe on small, centred images (digits, Fashion-MNIST) uses *where* strokes and edges are: global
  pooling keeps only how much of each feature there is, a grid keeps the region it sits in. ``readout``
  0 (the default) picks 2x2 up to 16 px and 4x4 above, from linear probes of the random-init encoders
  (fedssl.inputs.readout_grid: on 28x28 Fashion-MNIST the CNN's probe gains 3.1 points through 4x4 over
  2x2). At 28x28 the last stage's map is 4x4, so a 4x4 readout pools nothing. The CNN and ViT share the rule.

Convolutions carry no bias (the GroupNorm after each adds one) and activations are not in-place, so
both clipping engines (fedssl.training.bookkeeping and Opacus' hooks) see every layer's input.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedssl.inputs import AUTO_READOUT, readout_grid
from fedssl.models.encoders import Encoder, groups_for

STAGE_WIDTHS = (1, 2, 4, 8)  # stage widths as multiples of ``width``, as in ResNet-18


def _conv_gn(in_channels: int, out_channels: int, kernel_size: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        nn.GroupNorm(groups_for(out_channels), out_channels),
    ]


class BasicBlock(nn.Module):
    """Two 3x3 conv + GroupNorm layers and a shortcut (1x1 conv + GroupNorm where the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_conv_gn(in_channels, out_channels, 3, stride), nn.ReLU(), *_conv_gn(out_channels, out_channels, 3, 1)
        )
        changes_shape = stride != 1 or in_channels != out_channels
        self.shortcut = nn.Sequential(*_conv_gn(in_channels, out_channels, 1, stride)) if changes_shape else nn.Identity()
        self.out = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x) + self.shortcut(x))


class ResNetGNEncoder(Encoder):
    """ResNet-18-GN for small images; ``width`` is the first stage's channel count, ``depth`` blocks per stage."""

    def __init__(self, input_shape: Sequence[int], width: int = 64, depth: int = 2, readout: int = AUTO_READOUT) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(
                f"model.encoder=resnet needs image inputs shaped (channels, height, width), got {tuple(input_shape)}; "
                "use model.encoder=mlp for vector data"
            )
        self.input_shape = tuple(int(d) for d in input_shape)
        layers: list[nn.Module] = [*_conv_gn(self.input_shape[0], width, 3, 1), nn.ReLU()]
        channels = width
        for stage, multiple in enumerate(STAGE_WIDTHS):
            for block in range(depth):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(BasicBlock(channels, width * multiple, stride))
                channels = width * multiple
        self.features = nn.Sequential(*layers)
        self.readout = readout_grid(readout, self.input_shape)
        self.pool = nn.AdaptiveAvgPool2d((self.readout, self.readout))
        self.out_dim = channels * self.readout**2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)
