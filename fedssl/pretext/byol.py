"""BYOL: Bootstrap Your Own Latent.

The online network (encoder, projector, predictor) predicts, for one augmented view, the
target network's projection of another view of the same sample. The target (an encoder and
projector) receives no gradient; it is an exponential moving average of the online weights.
No negatives: sample i's loss involves sample i's two views only, so BYOL is DP-compatible.

Under DP the target is updated in ``after_optimizer_step`` from the online weights the DP
optimizer has already clipped and noised: post-processing of a private output, so it costs no
privacy budget. The target stays on the site; only ``encoder`` is exchanged.

Differences from the paper, for small private models: LayerNorm instead of BatchNorm in the
projector and predictor (BatchNorm mixes samples), smaller widths, constant ``tau`` (the paper
anneals it towards 1 with a cosine schedule).

- [0] Grill et al., "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning",
  NeurIPS 2020, https://arxiv.org/abs/2006.07733
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from fedssl.inputs import PRETEXT_MODALITIES
from fedssl.models.encoders import Encoder
from fedssl.pretext.augment import Augmenter, TwoViewParams
from fedssl.pretext.base import PretextModel, PretextTask, cosine, ema_update, mlp, param
from fedssl.pretext.registry import register_pretext


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-sample ``2 - 2 cos(p, z)``: the squared distance of the L2-normalised vectors; shape (B,)."""
    return 2 - 2 * cosine(p, z)


@dataclasses.dataclass(frozen=True)
class BYOLParams(TwoViewParams):
    tau: float = param(0.99, ge=0, le=1)  # target momentum: target <- tau * target + (1 - tau) * online


class BYOLModel(PretextModel):
    def __init__(self, encoder: Encoder, augment: Augmenter, hidden_dim: int, projection_dim: int, tau: float) -> None:
        super().__init__(encoder)
        self.augment = augment
        self.tau = tau
        self.projector = mlp(encoder.out_dim, hidden_dim, projection_dim)
        self.predictor = mlp(projection_dim, hidden_dim, projection_dim)
        self.target_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)

    def _online(self) -> list[nn.Module]:
        return [self.encoder, self.projector]

    def _target(self) -> list[nn.Module]:
        return [self.target_encoder, self.target_projector]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        view1, view2 = self.augment(x), self.augment(x)
        p1 = self.predictor(self.projector(self.encoder(view1)))
        p2 = self.predictor(self.projector(self.encoder(view2)))
        with torch.no_grad():
            z1 = self.target_projector(self.target_encoder(view1))
            z2 = self.target_projector(self.target_encoder(view2))
        # Symmetrised as in the paper: each view's prediction of the other view's target.
        return byol_loss(p1, z2) + byol_loss(p2, z1)

    def after_optimizer_step(self) -> None:
        ema_update(self._online(), self._target(), self.tau)

    @torch.no_grad()
    def sync_target(self) -> None:
        """Copy the online encoder and projector into the target, e.g. after loading global weights."""
        for online, target in zip(self._online(), self._target()):
            target.load_state_dict(online.state_dict())


@register_pretext
class BYOL(PretextTask):
    name = "byol"
    paper = "Grill et al., NeurIPS 2020, Bootstrap Your Own Latent"
    dp_compatible = True
    modalities = PRETEXT_MODALITIES["byol"]  # fedssl.inputs
    Params = BYOLParams
    params: BYOLParams

    def _build(self, encoder: Encoder, modality: str) -> PretextModel:
        p = self.params
        return BYOLModel(encoder, Augmenter(p, modality), p.hidden_dim, p.projection_dim, p.tau)
