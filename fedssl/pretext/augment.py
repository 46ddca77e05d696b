"""Batched, torch-only augmentations for the two-view methods (BYOL, SimSiam, SimCLR).

Every random draw has a shape fixed by the batch size alone, one draw per sample, taken from
the global torch RNG: each sample gets independent randomness, a seeded run repeats exactly (without
DP: under DP the site reseeds that RNG from OS entropy, fedssl.training.local.train_round), and
sample i's view never depends on another sample's values (which keeps the losses per-sample).

Images (B, C, H, W) get a random crop-and-resize with small rotation and shift (one affine
resampling), Gaussian noise and random erasing. No flips: a mirrored 2 or 5 is another glyph,
so flip-invariance would teach the encoder to confuse classes. Vectors (B, D) get Gaussian
noise and random feature masking, following the corruption used for tabular SSL in
VIME (Yoon et al., NeurIPS 2020).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch.nn import functional as F

from fedssl.pretext.base import IMAGE, PretextParams, param


@dataclasses.dataclass(frozen=True)
class AugmentParams(PretextParams):
    """View-generation strengths; defaults suit 8x8 digits scaled to [0, 1]."""

    crop_scale: float = param(0.75, gt=0, le=1)  # smallest crop side, as a fraction of the image side
    max_rotation: float = param(15.0, ge=0, le=180)  # degrees
    max_shift: float = param(0.1, ge=0, le=0.5)  # fraction of the image side
    noise_std: float = param(0.05, ge=0)  # images and vectors
    erase_prob: float = param(0.25, ge=0, le=1)
    erase_max_frac: float = param(0.5, gt=0, le=1)  # largest erased side, as a fraction of the image side
    feature_mask_prob: float = param(0.2, ge=0, lt=1)  # vectors only


@dataclasses.dataclass(frozen=True)
class TwoViewParams(AugmentParams):
    """Augmentation plus the projector sizes shared by BYOL, SimSiam and SimCLR."""

    hidden_dim: int = param(256, ge=1)
    projection_dim: int = param(64, ge=1)


def _uniform(batch: int, low: float, high: float, like: torch.Tensor) -> torch.Tensor:
    return low + (high - low) * torch.rand(batch, device=like.device, dtype=like.dtype)


def random_affine(x: torch.Tensor, crop_scale: float, max_rotation: float, max_shift: float) -> torch.Tensor:
    """Random crop-and-resize, rotation and shift of each image in one bilinear resampling.

    The affine map takes output coordinates to input coordinates in [-1, 1]; a scale below one
    reads a smaller region and stretches it over the output, i.e. crop-and-resize.
    """
    batch = x.shape[0]
    if batch == 0:
        return x  # affine_grid rejects an empty batch, and there is nothing to transform
    scale = _uniform(batch, crop_scale, 1.0, x)
    angle = _uniform(batch, -1.0, 1.0, x) * math.radians(max_rotation)
    # (1 - scale) keeps the crop inside the image; 2 * max_shift moves it further (an image side spans 2).
    reach = (1.0 - scale) + 2.0 * max_shift
    shift_x = _uniform(batch, -1.0, 1.0, x) * reach
    shift_y = _uniform(batch, -1.0, 1.0, x) * reach
    cos, sin = scale * torch.cos(angle), scale * torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, shift_x], dim=-1), torch.stack([sin, cos, shift_y], dim=-1)], dim=1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def gaussian_noise(x: torch.Tensor, std: float) -> torch.Tensor:
    return x + std * torch.randn_like(x)


def random_erasing(x: torch.Tensor, prob: float, max_frac: float) -> torch.Tensor:
    """With probability ``prob`` per image, zero one random rectangle (Zhong et al., AAAI 2020)."""
    batch, height, width = x.shape[0], x.shape[-2], x.shape[-1]
    erase = _uniform(batch, 0.0, 1.0, x) < prob
    inside = []
    for size in (height, width):
        extent = torch.ceil(_uniform(batch, 0.0, max_frac * size, x)).clamp(min=1)
        start = torch.floor(_uniform(batch, 0.0, 1.0, x) * (size - extent + 1))
        coords = torch.arange(size, device=x.device, dtype=x.dtype)
        inside.append((coords >= start[:, None]) & (coords < (start + extent)[:, None]))
    rectangle = inside[0][:, :, None] & inside[1][:, None, :] & erase[:, None, None]
    return x.masked_fill(rectangle[:, None], 0.0)


def random_feature_mask(x: torch.Tensor, prob: float) -> torch.Tensor:
    """Zero each feature independently with probability ``prob``."""
    keep = torch.rand(x.shape, device=x.device, dtype=x.dtype) >= prob
    return x * keep


class Augmenter:
    """Callable producing one random view of a batch; call it twice for two views."""

    def __init__(self, params: AugmentParams, modality: str) -> None:
        self.params = params
        self.modality = modality

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        p = self.params
        if self.modality == IMAGE:
            view = random_affine(x, p.crop_scale, p.max_rotation, p.max_shift)
            view = gaussian_noise(view, p.noise_std)
            return random_erasing(view, p.erase_prob, p.erase_max_frac)
        return random_feature_mask(gaussian_noise(x, p.noise_std), p.feature_mask_prob)
