"""A 1-D convolutional encoder for time series (model.encoder=conv1d), inputs (channels, length).

``depth`` blocks of Conv1d (kernel 5) + GroupNorm + ReLU; every block after the first halves the
length (stride 2), so deeper blocks see longer stretches of the series at the cost of the
ordinary (not dilated) receptive field. GroupNorm, never BatchNorm: BatchNorm's batch statistics
mix samples, which voids per-sample clipping (Opacus' ModuleValidator refuses it); GroupNorm
normalises within one sample. Both clipping engines support Conv1d and GroupNorm.

Readout: global average pooling over time, as the fully convolutional time-series classifiers
do (Wang, Yan, Oates, IJCNN 2017). Why global here where the image encoders keep a spatial grid (model.readout):
(1) the weights then do not depend on the series length, so sites whose series differ in length
still share one encoder, and ``data.series_length`` can change without changing the model;
(2) a motif means the same wherever in the window it occurs (windows of sensor streams are not
aligned the way centred digits are), so the features should not encode its position.

:meth:`Conv1dEncoder.steps` gives the feature map ``(B, width, L')`` before pooling, for
per-time-step pretexts (masked_segment).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedssl.inputs import TIMESERIES
from fedssl.models.encoders import Encoder, groups_for

KERNEL_SIZE = 5


class Conv1dEncoder(Encoder):
    modality = TIMESERIES

    def __init__(self, input_shape: Sequence[int], width: int = 64, depth: int = 3) -> None:
        super().__init__()
        if len(input_shape) != 2:
            raise ValueError(f"model.encoder=conv1d needs time series shaped (channels, length), got {tuple(input_shape)}; "
                             "set data.kind=timeseries for series data")
        self.input_shape = (int(input_shape[0]), int(input_shape[1]))
        channels = self.input_shape[0]
        layers: list[nn.Module] = []
        for block in range(depth):
            layers += [
                nn.Conv1d(channels, width, KERNEL_SIZE, stride=1 if block == 0 else 2, padding=KERNEL_SIZE // 2),
                nn.GroupNorm(groups_for(width), width),
                nn.ReLU(),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        self.out_dim = width

    def steps(self, x: torch.Tensor) -> torch.Tensor:
        """The feature map (B, width, L') before pooling; L' = ceil(L / 2**(depth-1))."""
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.steps(x).mean(dim=2)
