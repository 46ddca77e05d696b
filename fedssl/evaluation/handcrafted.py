"""A fixed Gabor filter bank: image features that cost no privacy, because they are built from no data.

Tramèr & Boneh ("Differentially Private Learning Needs Better Features (or Much More Data)", ICLR 2021) found
that on small images a linear model over handcrafted ScatterNet features (Oyallon & Mallat's scattering
transform) beats end-to-end private deep learning. The bank here is the first order of such a transform
(Bruna & Mallat, "Invariant Scattering Convolution Networks", TPAMI 2013): each image is filtered by complex
Gabor wavelets at several orientations and scales, the modulus of each response is taken, and the moduli and
one Gaussian low-pass of the image are averaged over a grid of cells. Nothing in it is learned, so it is a
start any site could use at ε = 0: the bar a private encoder has to clear before its privacy cost buys anything.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedssl.evaluation.probes import encode

ORIENTATIONS = 8
SCALES = (1.5, 2.5, 4.0)  # the Gaussian envelope's σ in pixels; each wavelet's frequency is 1 / (2σ) cycles per pixel
FILTER_SIZE = 9
LOW_PASS_SIGMA = 2.0
# 14x14 cells at 28x28 (2-pixel cells): on a Fashion-MNIST validation split carved from train, the probe at 600
# labels scored 84.8 % at its best C, against 84.1 / 83.7 / 82.4 / 77.9 % through 7x7 / 5x5 / 4x4 / 2x2 cells
# (`benchmarks/readout_screen.py --gabor`, benchmarks/README.md section 10).
GRID = 14
# The grid for any image size: 2-pixel cells, the size both validation screens picked (28x28 Fashion-MNIST: 14 of
# 2/4/5/7/14 cells; 8x8 digits at 100 labels: 4 of 2/4/8, 95.2 %), capped at GRID per side so the features stay at
# most 25 · channels · 196 for large images (a cap not screened above 28 px).
CELL_PIXELS = 2


def gabor_filters(orientations: int = ORIENTATIONS, scales: tuple[float, ...] = SCALES,
                  size: int = FILTER_SIZE) -> torch.Tensor:
    """(2 · orientations · scales, 1, size, size): for each scale and orientation, the even (cosine, zero-mean)
    and odd (sine) parts of one complex Gabor wavelet, each of unit L2 norm, in that order."""
    if orientations < 1 or not scales or size < 3 or size % 2 == 0:
        raise ValueError(f"a Gabor bank needs >= 1 orientation, >= 1 scale and an odd size >= 3; got "
                         f"{orientations}, {scales}, {size}")
    y, x = _pixel_offsets(size)
    filters = []
    for scale in scales:
        envelope = torch.exp(-(x**2 + y**2) / (2 * scale**2))
        for k in range(orientations):
            angle = math.pi * k / orientations
            phase = 2 * math.pi / (2 * scale) * (x * math.cos(angle) + y * math.sin(angle))
            even = envelope * torch.cos(phase)
            even = even - even.mean()  # no response to a flat image: the low-pass channel carries brightness
            odd = envelope * torch.sin(phase)
            filters += [even / even.norm(), odd / odd.norm()]
    return torch.stack(filters).unsqueeze(1).float()


def low_pass_filter(size: int = FILTER_SIZE, sigma: float = LOW_PASS_SIGMA) -> torch.Tensor:
    """(1, 1, size, size): a Gaussian that sums to 1."""
    y, x = _pixel_offsets(size)
    kernel = torch.exp(-(x**2 + y**2) / (2 * sigma**2))
    return (kernel / kernel.sum())[None, None].float()


def _pixel_offsets(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, x): each filter pixel's offset from the centre of a size x size filter."""
    offsets = torch.arange(size, dtype=torch.float64) - size // 2
    y, x = torch.meshgrid(offsets, offsets, indexing="ij")
    return y, x


class GaborBank(nn.Module):
    """Images (N, C, H, W) -> (N, C · (orientations · scales + 1) · grid²) features; no parameters.

    Each input channel is filtered on its own (zero padding, same size), so an RGB image gives three times the
    features of a grey one."""

    def __init__(self, channels: int = 1, orientations: int = ORIENTATIONS, scales: tuple[float, ...] = SCALES,
                 size: int = FILTER_SIZE, grid: int = GRID) -> None:
        super().__init__()
        if channels < 1 or grid < 1:
            raise ValueError(f"a Gabor bank needs >= 1 channel and a grid >= 1; got {channels} and {grid}")
        self.channels, self.grid, self.size = channels, grid, size
        self.register_buffer("wavelets", gabor_filters(orientations, scales, size).repeat(channels, 1, 1, 1))
        self.register_buffer("low_pass", low_pass_filter(size).repeat(channels, 1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != self.channels:
            raise ValueError(f"expected images of shape (N, {self.channels}, H, W), got {tuple(images.shape)}")
        responses = F.conv2d(images, self.wavelets, padding=self.size // 2, groups=self.channels)
        n, _, h, w = responses.shape
        pairs = responses.view(n, responses.shape[1] // 2, 2, h, w)  # (even, odd) of each wavelet; n may be 0
        modulus = torch.sqrt(pairs[:, :, 0] ** 2 + pairs[:, :, 1] ** 2)
        low = F.conv2d(images, self.low_pass, padding=self.size // 2, groups=self.channels)
        features = torch.cat([modulus, low], dim=1)
        return F.adaptive_avg_pool2d(features, self.grid).flatten(1)


def grid_for(height: int, width: int) -> int:
    """Cells per side for images of this size: 2-pixel cells, at most GRID (see CELL_PIXELS)."""
    return max(1, min(GRID, min(height, width) // CELL_PIXELS))


def gabor_features(images: torch.Tensor) -> np.ndarray:
    """Float images (N, C, H, W) -> the bank's features for their size (:func:`grid_for`), as float32 numpy."""
    if images.dim() != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(images.shape)}")
    return encode(GaborBank(channels=images.shape[1], grid=grid_for(*images.shape[2:])), images)  # in batches
