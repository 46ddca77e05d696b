"""SimCLR: contrastive learning with the NT-Xent loss. NOT DP-compatible.

Two augmented views of each sample are projected and L2-normalised; each of the 2B projections
must pick its partner out of the other 2B - 2 projections in the batch (the in-batch
negatives) by a softmax over cosine similarities divided by a temperature.

Why DP-SGD refuses it: sample i's loss has every other sample's projections in its softmax
denominator, so adding, removing or changing one sample changes every sample's loss and
gradient. DP-SGD clips per-sample gradients to bound one sample's influence on the update;
here one sample also acts through all the others' gradients, the bound no longer holds and the
privacy guarantee is void. ``forward`` still returns a (B,) vector, each sample's mean over its
two anchors, so the method runs without DP; the registry's ``require_dp_compatible`` gate
refuses it under DP.

- [0] Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual
  Representations", ICML 2020, https://arxiv.org/abs/2002.05709
"""

from __future__ import annotations

import dataclasses

import torch
from torch.nn import functional as F

from fedssl.inputs import COUPLED_PRETEXTS, PRETEXT_MODALITIES
from fedssl.models.encoders import Encoder
from fedssl.pretext.augment import Augmenter, TwoViewParams
from fedssl.pretext.base import PretextModel, PretextTask, mlp, param
from fedssl.pretext.registry import register_pretext


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent per sample: the mean of the terms with ``z1[i]`` and ``z2[i]`` as anchors; shape (B,).

    Its mean over the batch equals the paper's loss averaged over all 2B anchors.
    """
    batch = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / temperature
    # An anchor is never its own negative.
    logits = logits.masked_fill(torch.eye(2 * batch, dtype=torch.bool, device=z.device), float("-inf"))
    partner = torch.cat([torch.arange(batch, 2 * batch), torch.arange(batch)]).to(z.device)
    per_anchor = F.cross_entropy(logits, partner, reduction="none")
    return 0.5 * (per_anchor[:batch] + per_anchor[batch:])


@dataclasses.dataclass(frozen=True)
class SimCLRParams(TwoViewParams):
    temperature: float = param(0.5, gt=0)


class SimCLRModel(PretextModel):
    def __init__(self, encoder: Encoder, augment: Augmenter, params: SimCLRParams) -> None:
        super().__init__(encoder)
        self.augment = augment
        self.temperature = params.temperature
        self.projector = mlp(encoder.out_dim, params.hidden_dim, params.projection_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z1 = self.projector(self.encoder(self.augment(x)))
        z2 = self.projector(self.encoder(self.augment(x)))
        return nt_xent_loss(z1, z2, self.temperature)


@register_pretext
class SimCLR(PretextTask):
    name = "simclr"
    paper = "Chen et al., ICML 2020, A Simple Framework for Contrastive Learning of Visual Representations"
    dp_compatible = False
    coupling = COUPLED_PRETEXTS["simclr"]
    modalities = PRETEXT_MODALITIES["simclr"]  # fedssl.inputs
    Params = SimCLRParams
    params: SimCLRParams

    def _build(self, encoder: Encoder, modality: str) -> PretextModel:
        return SimCLRModel(encoder, Augmenter(self.params, modality), self.params)
