"""Batched time-series augmentations for two-view methods (ts_views), inputs (B, C, L).

The augmentations of TS-TCC (Eldele et al., "Time-Series Representation Learning via Temporal and
Contextual Contrasting", IJCAI 2021, https://arxiv.org/abs/2106.14112): jitter (additive Gaussian
noise), scaling (a random gain per channel) and permutation (the series cut into segments at
random points, the segments shuffled), plus a random crop stretched back to the full length
(the time-series counterpart of the image crop-and-resize, used by e.g. TF-C, Zhang et al. 2022).

As in fedssl.pretext.augment: every draw has a shape fixed by the batch shape, one draw per
sample (per channel for the gain), from the global torch RNG, and sample i's view depends on
sample i's values only, so losses over these views stay per-sample.
"""

from __future__ import annotations

import dataclasses

import torch

from fedssl.pretext.base import PretextParams, param


@dataclasses.dataclass(frozen=True)
class SeriesAugmentParams(PretextParams):
    """View-generation strengths; defaults suit series standardised to unit variance per channel."""

    crop_scale: float = param(0.8, gt=0, le=1)  # shortest kept window, as a fraction of the length
    permute_prob: float = param(0.5, ge=0, le=1)  # chance a view's segments are shuffled
    segments: int = param(4, ge=1)  # segments a shuffled view is cut into (TS-TCC's max_seg)
    scale_std: float = param(0.1, ge=0)  # per-channel gain ~ N(1, scale_std)
    jitter_std: float = param(0.1, ge=0)  # additive noise ~ N(0, jitter_std)


def _gather_steps(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, c, index[b, t]]``: the same time index map for every channel of a sample."""
    return torch.gather(x, 2, index[:, None, :].expand(-1, x.shape[1], -1))


def random_crop(x: torch.Tensor, min_scale: float) -> torch.Tensor:
    """A random window of ``[min_scale, 1]`` of each series, stretched back to its length (linear interpolation)."""
    batch, _, length = x.shape
    size = (min_scale + (1 - min_scale) * torch.rand(batch, 1, device=x.device)) * (length - 1)
    start = torch.rand(batch, 1, device=x.device) * (length - 1 - size)
    steps = torch.arange(length, device=x.device, dtype=size.dtype)[None, :] / max(length - 1, 1)
    position = start + steps * size  # (B, L), in [0, L - 1]
    low = position.floor().long().clamp(0, length - 1)
    high = (low + 1).clamp(max=length - 1)
    weight = (position - low.to(position.dtype))[:, None, :].to(x.dtype)
    return _gather_steps(x, low) * (1 - weight) + _gather_steps(x, high) * weight


def permutation_index(batch: int, length: int, segments: int, device: torch.device | None = None) -> torch.Tensor:
    """(B, L) time index: each row's series cut at ``segments - 1`` random points, the pieces in a random order."""
    cuts = (torch.rand(batch, segments - 1, device=device) * (length - 1)).floor().long().add(1).sort(dim=1).values
    zero, end = torch.zeros(batch, 1, dtype=torch.long, device=device), torch.full((batch, 1), length, device=device)
    starts, ends = torch.cat([zero, cuts], 1), torch.cat([cuts, end], 1)
    order = torch.rand(batch, segments, device=device).argsort(dim=1)
    new_ends = torch.gather(ends - starts, 1, order).cumsum(dim=1)  # where each shuffled piece ends in the view
    steps = torch.arange(length, device=device).expand(batch, -1).contiguous()
    slot = torch.searchsorted(new_ends, steps, right=True)  # the shuffled piece holding view step t
    piece = torch.gather(order, 1, slot)
    offset = steps - (torch.gather(new_ends, 1, slot) - torch.gather(ends - starts, 1, piece))
    return torch.gather(starts, 1, piece) + offset


def random_permutation(x: torch.Tensor, prob: float, segments: int) -> torch.Tensor:
    """With probability ``prob`` per series, its segments shuffled (TS-TCC's permutation)."""
    batch, _, length = x.shape
    shuffled = permutation_index(batch, length, segments, x.device)
    keep = torch.rand(batch, 1, device=x.device) >= prob
    index = torch.where(keep, torch.arange(length, device=x.device).expand(batch, -1), shuffled)
    return _gather_steps(x, index)


def random_scaling(x: torch.Tensor, std: float) -> torch.Tensor:
    """Each channel of each series times its own gain ~ N(1, std) (TS-TCC's scaling)."""
    return x * (1 + std * torch.randn(x.shape[0], x.shape[1], 1, device=x.device, dtype=x.dtype))


class SeriesAugmenter:
    """Callable producing one random view of a batch of series; call it twice for two views."""

    def __init__(self, params: SeriesAugmentParams) -> None:
        self.params = params

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        p = self.params
        if x.shape[0] == 0:
            return x
        view = random_permutation(random_crop(x, p.crop_scale), p.permute_prob, p.segments)
        view = random_scaling(view, p.scale_std)
        return view + p.jitter_std * torch.randn_like(view)
