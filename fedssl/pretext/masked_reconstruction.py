"""Masked reconstruction (MAE-style inpainting).

A random fraction of each input is hidden (image patches, or features of a vector), replaced by
zeros, encoded, and decoded back to the full input; the loss is the mean squared error on the
hidden positions only, so the encoder must infer missing content from context rather than copy
what it sees. Each sample's mask and loss involve that sample only: DP-compatible.

Unlike MAE we keep a convolutional/MLP encoder and feed it the zero-filled input (as context
encoders do) instead of dropping masked tokens, and the decoder is a light linear layer or MLP.

- [0] He, Chen, Xie, Li, Dollar, Girshick, "Masked Autoencoders Are Scalable Vision Learners",
  CVPR 2022, https://arxiv.org/abs/2111.06377
- [1] Pathak, Krahenbuhl, Donahue, Darrell, Efros, "Context Encoders: Feature Learning by
  Inpainting", CVPR 2016, https://arxiv.org/abs/1604.07379
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from fedssl.errors import ConfigError
from fedssl.inputs import DEFAULT_PATCH_SIZE, PRETEXT_MODALITIES, patch_problem
from fedssl.models.encoders import Encoder
from fedssl.pretext.base import IMAGE, PretextModel, PretextParams, PretextTask, mlp, param
from fedssl.pretext.registry import register_pretext


def masked_mse(recon: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error over positions where ``mask`` is 1; shape ``(B,)``."""
    dims = tuple(range(1, target.dim()))
    return ((recon - target) ** 2 * mask).sum(dim=dims) / mask.sum(dim=dims)


def random_unit_mask(batch: int, units: int, masked: int, device: torch.device) -> torch.Tensor:
    """(batch, units) float mask with exactly ``masked`` ones per row, at random positions.

    Ranking uniform noise (MAE's shuffle) gives every row the same masked count, so no sample
    ever has an empty mask and a zero denominator.
    """
    ranks = torch.rand(batch, units, device=device).argsort(dim=1).argsort(dim=1)
    return (ranks < masked).float()


@dataclasses.dataclass(frozen=True)
class MaskedReconstructionParams(PretextParams):
    mask_ratio: float = param(0.5, gt=0, lt=1)
    patch_size: int = param(DEFAULT_PATCH_SIZE, ge=1)  # images only; a vector masks single features
    decoder_hidden: int = param(0, ge=0)  # 0: linear decoder; >0: one hidden layer of this width


class MaskedReconstructionModel(PretextModel):
    def __init__(self, encoder: Encoder, decoder: nn.Module, patch_size: int, masked_units: int) -> None:
        super().__init__(encoder)
        self.decoder = decoder
        self.patch_size = patch_size
        self.masked_units = masked_units
        if len(encoder.input_shape) == 3:
            _, height, width = encoder.input_shape
            self.unit_grid: tuple[int, ...] = (height // patch_size, width // patch_size)
        else:
            self.unit_grid = (math.prod(encoder.input_shape),)

    def sample_mask(self, x: torch.Tensor) -> torch.Tensor:
        """A 0/1 mask shaped like ``x``: whole patches for images, single features for vectors."""
        units = random_unit_mask(x.shape[0], math.prod(self.unit_grid), self.masked_units, x.device).to(x.dtype)
        if len(self.unit_grid) == 1:
            return units.view_as(x)
        patches = units.view(x.shape[0], 1, *self.unit_grid)
        pixels = patches.repeat_interleave(self.patch_size, dim=2).repeat_interleave(self.patch_size, dim=3)
        return pixels.expand_as(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.sample_mask(x)
        recon = self.decoder(self.encoder(x * (1 - mask))).view_as(x)
        return masked_mse(recon, x, mask)


@register_pretext
class MaskedReconstruction(PretextTask):
    name = "masked_reconstruction"
    paper = "He et al., CVPR 2022, Masked Autoencoders Are Scalable Vision Learners (+ Pathak et al., CVPR 2016)"
    dp_compatible = True
    modalities = PRETEXT_MODALITIES["masked_reconstruction"]
    Params = MaskedReconstructionParams
    params: MaskedReconstructionParams

    def _build(self, encoder: Encoder, modality: str) -> PretextModel:
        p = self.params
        if (problem := patch_problem(encoder.input_shape, p.patch_size)) is not None:
            raise ConfigError(f"pretext.params.patch_size: {problem}")
        if modality == IMAGE:
            _, height, width = encoder.input_shape
            units = (height // p.patch_size) * (width // p.patch_size)
        else:
            units = math.prod(encoder.input_shape)
        # At least one unit hidden (a loss to compute) and one shown (context to infer from).
        masked = min(units - 1, max(1, round(p.mask_ratio * units)))
        out_dim = math.prod(encoder.input_shape)
        decoder: nn.Module = (
            nn.Linear(encoder.out_dim, out_dim)
            if p.decoder_hidden == 0
            else mlp(encoder.out_dim, p.decoder_hidden, out_dim)
        )
        return MaskedReconstructionModel(encoder, decoder, p.patch_size, masked)
