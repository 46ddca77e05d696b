"""Masked-segment reconstruction for time series (model.encoder=conv1d).

Zerveas, Jayaraman, Patel, Bhamidipaty, Eickhoff, "A Transformer-based Framework for Multivariate
Time Series Representation Learning", KDD 2021, https://arxiv.org/abs/2010.02803

Each sample hides contiguous segments of each channel (set to 0, as in the paper), about
``mask_ratio`` of its time steps, and always at least one segment. The encoder's per-step feature
map (``encoder.steps``, downsampled by its strides) is stretched back to the input length by
linear interpolation (no parameters) and a linear layer per time step predicts every channel's
value, the paper's per-step output layer. Per-sample loss: the mean squared error over that
sample's masked (channel, step) entries only, so each loss involves one sample: DP-valid.

Difference from the paper: segments have a fixed length ``segment_length`` and independent
starts (probability ``mask_ratio / segment_length`` per step), instead of the paper's
geometric lengths from a two-state Markov chain; the mask's shape and draws depend on the batch
shape only, one independent draw per entry, so it is batched and seedable. Zero padding at a
series' end (fedssl.data.series) can be masked too: the target is then 0, as the input was.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.nn import functional as F

from fedssl.inputs import PRETEXT_MODALITIES
from fedssl.models.encoders import Encoder
from fedssl.pretext.base import PretextModel, PretextParams, PretextTask, param
from fedssl.pretext.registry import register_pretext


def segment_mask(shape: torch.Size | tuple[int, ...], ratio: float, segment_length: int,
                 device: torch.device | None = None) -> torch.Tensor:
    """(B, C, L) bool: segments of ``segment_length`` steps per channel covering about ``ratio``, at least one per sample."""
    batch, channels, length = shape
    if batch == 0:  # Poisson sampling's empty batch
        return torch.zeros(shape, dtype=torch.bool, device=device)
    segment_length = min(segment_length, length)
    scores = torch.rand(batch, channels, length - segment_length + 1, device=device)
    starts = scores < ratio / segment_length
    starts.view(batch, -1)[torch.arange(batch, device=device), scores.flatten(1).argmin(dim=1)] = True
    # Step t is masked when a segment starts within the segment_length steps ending at t.
    padded = F.pad(starts.to(torch.float32), (segment_length - 1, segment_length - 1))
    covered = F.max_pool1d(padded.reshape(batch * channels, 1, -1), segment_length, stride=1)
    return covered.reshape(batch, channels, -1)[..., :length] > 0


def masked_segment_loss(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error over the masked entries; shape (B,)."""
    weights = mask.to(prediction.dtype)
    return (((prediction - target) ** 2) * weights).flatten(1).sum(1) / weights.flatten(1).sum(1).clamp(min=1.0)


@dataclasses.dataclass(frozen=True)
class MaskedSegmentParams(PretextParams):
    mask_ratio: float = param(0.15, gt=0, lt=1)  # the paper's r
    segment_length: int = param(3, ge=1)  # the paper's mean masked length l_m, here fixed


class MaskedSegmentModel(PretextModel):
    def __init__(self, encoder: Encoder, params: MaskedSegmentParams) -> None:
        super().__init__(encoder)
        self.params = params
        self.head = nn.Linear(encoder.out_dim, encoder.input_shape[0])  # per time step: features -> channels

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, L) prediction of every entry of ``x`` from the encoder's per-step features."""
        steps = self.encoder.steps(x)  # (B, width, L')
        if steps.shape[-1] != x.shape[-1]:
            steps = F.interpolate(steps, size=x.shape[-1], mode="linear", align_corners=False)
        return self.head(steps.transpose(1, 2)).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = segment_mask(x.shape, self.params.mask_ratio, self.params.segment_length, x.device)
        return masked_segment_loss(self.reconstruct(x.masked_fill(mask, 0.0)), x, mask)


@register_pretext
class MaskedSegment(PretextTask):
    name = "masked_segment"
    paper = "Zerveas et al., KDD 2021, A Transformer-based Framework for Multivariate Time Series Representation Learning"
    dp_compatible = True
    modalities = PRETEXT_MODALITIES["masked_segment"]
    Params = MaskedSegmentParams
    params: MaskedSegmentParams

    def _build(self, encoder: Encoder, modality: str) -> PretextModel:
        if not hasattr(encoder, "steps"):
            raise ValueError(f"pretext.name: masked_segment needs an encoder with per-step outputs (steps(x)); "
                             f"{type(encoder).__name__} has none; use model.encoder=conv1d")
        return MaskedSegmentModel(encoder, self.params)
