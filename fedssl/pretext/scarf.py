"""SCARF: contrastive learning on tables with random feature corruption. NOT DP-compatible.

Two views of each row are made by corrupting a random subset of its features (VIME-style, here
with the row's own values, see :func:`fedssl.pretext.vime.self_permuted_corruption`); both are
encoded and projected, and each view must pick its partner out of the batch with the InfoNCE /
NT-Xent loss (:func:`fedssl.pretext.simclr.nt_xent_loss`).

Why DP-SGD refuses it: as in SimCLR, the softmax denominator of row i holds every other row's
projection (in-batch negatives), so one row changes every row's loss and gradient and
per-sample clipping no longer bounds its influence. ``forward`` returns a (B,) vector, so the
method runs without DP; the registry's ``require_dp_compatible`` gate refuses it under DP. The
paper's corruption additionally draws values from other rows' marginals, a second coupling we
avoid anyway. For DP use ``vime``, which keeps the corruption and a per-sample loss.

- [0] Bahri, Jiang, Tay, Metzler, "SCARF: Self-Supervised Contrastive Learning using Random
  Feature Corruption", ICLR 2022, https://arxiv.org/abs/2106.15147
"""

from __future__ import annotations

import dataclasses

import torch

from fedssl.inputs import COUPLED_PRETEXTS, PRETEXT_MODALITIES
from fedssl.models.encoders import Encoder
from fedssl.pretext.base import PretextModel, PretextParams, PretextTask, mlp, param
from fedssl.pretext.registry import register_pretext
from fedssl.pretext.simclr import nt_xent_loss
from fedssl.pretext.vime import bernoulli_mask, self_permuted_corruption


@dataclasses.dataclass(frozen=True)
class SCARFParams(PretextParams):
    corruption_rate: float = param(0.6, gt=0, lt=1)  # the paper's c
    temperature: float = param(1.0, gt=0)
    hidden_dim: int = param(256, ge=1)
    projection_dim: int = param(128, ge=1)


class SCARFModel(PretextModel):
    def __init__(self, encoder: Encoder, params: SCARFParams) -> None:
        super().__init__(encoder)
        self.params = params
        self.projector = mlp(encoder.out_dim, params.hidden_dim, params.projection_dim)

    def view(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        corrupted = self_permuted_corruption(flat, bernoulli_mask(flat, self.params.corruption_rate))
        return self.projector(self.encoder(corrupted.view_as(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nt_xent_loss(self.view(x), self.view(x), self.params.temperature)


@register_pretext
class SCARF(PretextTask):
    name = "scarf"
    paper = "Bahri et al., ICLR 2022, SCARF: Self-Supervised Contrastive Learning using Random Feature Corruption"
    dp_compatible = False
    coupling = COUPLED_PRETEXTS["scarf"]
    modalities = PRETEXT_MODALITIES["scarf"]
    Params = SCARFParams
    params: SCARFParams

    def _build(self, encoder: Encoder, modality: str) -> PretextModel:
        return SCARFModel(encoder, self.params)
