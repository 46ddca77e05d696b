"""ROCKET: random convolutional kernels, time-series features that cost no privacy because they are built from no data.

Dempster, Petitjean & Webb, "ROCKET: exceptionally fast and accurate time series classification using random
convolutional kernels", Data Mining and Knowledge Discovery 34 (2020): a linear classifier over the responses of
many random kernels matched the most accurate time-series classifiers of its day on the UCR archive. Each kernel
has a length of 7, 9 or 11 steps, weights drawn from N(0, 1) and centred, a bias from U(-1, 1), a dilation
2^U(0, log2((L - 1) / (length - 1))) and, half the time, the padding that keeps the series' length. For series
with several channels each kernel reads a random subset of them, as in the multivariate ROCKET of sktime and
aeon. Every kernel gives two features: the proportion of positive values of its response (PPV) and its maximum.
Each series is first normalised per channel over its own steps, as in the paper's experiments.

The kernels come from a fixed seed and the input shape alone, so the features are the same at every site and
cost ε = 0: the zero-privacy-cost start a private time-series encoder has to beat.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

NUM_KERNELS = 10_000  # the paper's default: 20,000 features
KERNEL_LENGTHS = (7, 9, 11)
SEED = 0
NORMALISE_EPS = 1e-8


@dataclass(frozen=True)
class Kernel:
    """One random kernel: ``weights`` (len(channels), length) over the ``channels`` it reads."""

    weights: np.ndarray
    channels: tuple[int, ...]
    bias: float
    dilation: int
    padding: int

    @property
    def length(self) -> int:
        return self.weights.shape[1]


def random_kernels(channels: int, length: int, num_kernels: int = NUM_KERNELS, seed: int = SEED) -> list[Kernel]:
    """ROCKET's kernels for series of ``channels`` x ``length``, from ``seed`` alone (no data).

    Every random quantity is drawn for all kernels at once (the per-kernel draws of the reference code cost seconds
    in Python at 10,000 kernels); each kernel's distribution is the paper's."""
    if channels < 1 or length < 1 or num_kernels < 1:
        raise ValueError(f"ROCKET needs >= 1 channel, >= 1 step and >= 1 kernel; got {channels}, {length}, {num_kernels}")
    rng = np.random.default_rng(seed)
    sizes = rng.choice(KERNEL_LENGTHS, num_kernels)
    reads = np.minimum(channels, (2 ** rng.uniform(0, math.log2(channels + 1), num_kernels)).astype(int))
    channel_order = np.argsort(rng.random((num_kernels, channels)), axis=1)  # a random subset: the first `reads`
    weights = rng.normal(0.0, 1.0, (num_kernels, channels, max(KERNEL_LENGTHS)))
    biases = rng.uniform(-1.0, 1.0, num_kernels)
    # Series shorter than the kernel get dilation 1 (the paper's formula would give 0 there).
    spread = np.log2(np.maximum((length - 1) / (sizes - 1), 1.0))
    dilations = np.maximum(1, (2 ** (rng.uniform(0, 1, num_kernels) * spread)).astype(int))
    padded = (rng.integers(0, 2, num_kernels) == 1) | ((sizes - 1) * dilations >= length)  # else an empty response
    kernels = []
    for k in range(num_kernels):
        size, dilation = int(sizes[k]), int(dilations[k])
        kernel_weights = weights[k, : reads[k], :size]
        kernels.append(Kernel(kernel_weights - kernel_weights.mean(axis=1, keepdims=True),
                              tuple(sorted(int(c) for c in channel_order[k, : reads[k]])), float(biases[k]), dilation,
                              (size - 1) * dilation // 2 if padded[k] else 0))
    return kernels


def normalise(series: torch.Tensor) -> torch.Tensor:
    """Each channel of each series to zero mean and unit std over its steps: a per-series transform, no data shared."""
    if series.numel() == 0:
        return series  # an empty pool: nothing to normalise (and no std to warn about)
    mean = series.mean(dim=-1, keepdim=True)
    std = series.std(dim=-1, keepdim=True, unbiased=False)
    return (series - mean) / (std + NORMALISE_EPS)


class Rocket(nn.Module):
    """Series (N, C, L) -> (N, 2 · num_kernels) features: each kernel's PPV, then its maximum, kernel by kernel.

    No parameters (it learns nothing); read a pool through fedssl.evaluation.probes.encode, which batches it."""

    def __init__(self, channels: int, length: int, num_kernels: int = NUM_KERNELS, seed: int = SEED) -> None:
        super().__init__()
        self.channels, self.length = channels, length
        self.kernels = random_kernels(channels, length, num_kernels, seed)
        # Kernels sharing a length, dilation and padding run as one convolution: the channels a kernel does not
        # read get zero weights.
        groups: dict[tuple[int, int, int], list[int]] = defaultdict(list)
        for index, kernel in enumerate(self.kernels):
            groups[(kernel.length, kernel.dilation, kernel.padding)].append(index)
        self.groups = []
        for (size, dilation, padding), members in groups.items():
            weights = np.zeros((len(members), channels, size), dtype=np.float32)
            for row, index in enumerate(members):
                weights[row, list(self.kernels[index].channels)] = self.kernels[index].weights
            biases = torch.tensor([self.kernels[index].bias for index in members], dtype=torch.float32)
            self.groups.append((torch.tensor(members), torch.from_numpy(weights), biases, dilation, padding))

    def forward(self, series: torch.Tensor) -> torch.Tensor:
        if series.dim() != 3 or tuple(series.shape[1:]) != (self.channels, self.length):
            raise ValueError(f"expected series of shape (N, {self.channels}, {self.length}), got {tuple(series.shape)}")
        series = normalise(series.float())
        device = series.device  # the kernels are plain tensors, not buffers: they follow the series (no-op on the CPU)
        features = torch.empty(series.shape[0], 2 * len(self.kernels), device=device)  # kernel k: PPV 2k, max 2k + 1
        for members, weights, biases, dilation, padding in self.groups:
            response = F.conv1d(series, weights.to(device), biases.to(device), padding=padding, dilation=dilation)
            columns = 2 * members.to(device)
            features[:, columns] = (response > 0).float().mean(dim=-1)
            features[:, columns + 1] = response.amax(dim=-1)
        return features
