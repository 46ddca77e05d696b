"""SimSiam: Simple Siamese representation learning.

Two augmented views go through the same encoder and projector; a predictor maps one view's
projection to the other's, whose projection is held fixed by a stop-gradient. The stop-gradient
alone prevents collapse: no negatives, no momentum target. Sample i's loss involves sample i's
two views only, so SimSiam is DP-compatible.

Differences from the paper, for small private models: LayerNorm instead of BatchNorm in the
projector and predictor (BatchNorm mixes samples) and smaller widths; the predictor keeps the
paper's bottleneck (hidden width a quarter of the projection width by default).

- [0] Chen, He, "Exploring Simple Siamese Representation Learning", CVPR 2021,
  https://arxiv.org/abs/2011.10566
"""

from __future__ import annotations

import dataclasses

import torch

from fedssl.inputs import PRETEXT_MODALITIES
from fedssl.models.encoders import Encoder
from fedssl.pretext.augment import Augmenter, TwoViewParams
from fedssl.pretext.base import PretextModel, PretextTask, cosine, mlp, param
from fedssl.pretext.registry import register_pretext


def simsiam_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-sample negative cosine similarity ``-cos(p, stopgrad(z))``; shape (B,)."""
    return -cosine(p, z.detach())


@dataclasses.dataclass(frozen=True)
class SimSiamParams(TwoViewParams):
    predictor_hidden_dim: int = param(16, ge=1)


class SimSiamModel(PretextModel):
    def __init__(self, encoder: Encoder, augment: Augmenter, params: SimSiamParams) -> None:
        super().__init__(encoder)
        self.augment = augment
        self.projector = mlp(encoder.out_dim, params.hidden_dim, params.projection_dim)
        self.predictor = mlp(params.projection_dim, params.predictor_hidden_dim, params.projection_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z1 = self.projector(self.encoder(self.augment(x)))
        z2 = self.projector(self.encoder(self.augment(x)))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return 0.5 * simsiam_loss(p1, z2) + 0.5 * simsiam_loss(p2, z1)


@register_pretext
class SimSiam(PretextTask):
    name = "simsiam"
    paper = "Chen & He, CVPR 2021, Exploring Simple Siamese Representation Learning"
    dp_compatible = True
    modalities = PRETEXT_MODALITIES["simsiam"]  # fedssl.inputs
    Params = SimSiamParams
    params: SimSiamParams

    def _build(self, encoder: Encoder, modality: str) -> PretextModel:
        return SimSiamModel(encoder, Augmenter(self.params, modality), self.params)
