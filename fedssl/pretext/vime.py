"""VIME: value imputation and mask estimation on tables, with a per-sample corruption.

Each row has a random subset of its features corrupted; the encoder sees the corrupted row and
two heads learn (a) which features were corrupted (binary cross-entropy, "mask estimation") and
(b) the original values of all features (mean squared error, "feature estimation"). The loss of
a row is ``mse + alpha * bce``, one value per sample.

The paper's corruption replaces a feature by the same feature of another (random) row of the
batch, i.e. a draw from the empirical marginal. Under DP-SGD that couples samples: row j's
value would enter row i's loss, so one person's data would act through another's gradient that
per-sample clipping does not bound. We draw the replacement values from the SAME row instead,
a random permutation of the row's own features (:func:`self_permuted_corruption`): the corrupted
row, the mask and the loss depend on that row and fresh randomness only, so the per-sample
gradient bound, and with it the DP guarantee, holds. The task stays the same in spirit (a
corrupted value is plausible for the row's scale, and the mask is not readable from zeros);
on standardised tables the row's own values are a draw from a similar range.

- [0] Yoon, Zhang, Jordon, van der Schaar, "VIME: Extending the Success of Self- and
  Semi-supervised Learning to Tabular Domain", NeurIPS 2020,
  https://proceedings.neurips.cc/paper/2020/hash/7d97667a3e056acab9aaf653807b4a03-Abstract.html
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from torch.nn import functional as F

from fedssl.inputs import PRETEXT_MODALITIES
from fedssl.models.encoders import Encoder
from fedssl.pretext.base import PretextModel, PretextParams, PretextTask, mlp, param
from fedssl.pretext.registry import register_pretext


def self_permuted_corruption(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` (B, F) with the features where ``mask`` is 1 replaced by the same row's values in a random order.

    Each row gets its own permutation of its own features: nothing crosses rows.
    """
    order = torch.rand(x.shape, device=x.device).argsort(dim=1)
    shuffled = torch.gather(x, 1, order)
    return x * (1 - mask) + shuffled * mask


def bernoulli_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A 0/1 mask shaped like ``x``, each entry 1 with probability ``p`` (VIME's mask generator)."""
    return (torch.rand(x.shape, device=x.device) < p).to(x.dtype)


def vime_loss(mask_logits: torch.Tensor, recon: torch.Tensor, x: torch.Tensor, mask: torch.Tensor,
              alpha: float) -> torch.Tensor:
    """Per-sample VIME loss: feature MSE + alpha * mask BCE, each the mean over features; shape (B,)."""
    mse = ((recon - x) ** 2).mean(dim=1)
    bce = F.binary_cross_entropy_with_logits(mask_logits, mask, reduction="none").mean(dim=1)
    return mse + alpha * bce


@dataclasses.dataclass(frozen=True)
class VIMEParams(PretextParams):
    mask_prob: float = param(0.3, gt=0, lt=1)  # the paper's p_m
    alpha: float = param(2.0, ge=0)  # weight of the mask-estimation term (the paper's alpha)
    head_hidden: int = param(0, ge=0)  # 0: linear heads; >0: one hidden layer of this width


class VIMEModel(PretextModel):
    def __init__(self, encoder: Encoder, params: VIMEParams) -> None:
        super().__init__(encoder)
        self.params = params
        width = math.prod(encoder.input_shape)

        def head() -> nn.Module:
            if params.head_hidden == 0:
                return nn.Linear(encoder.out_dim, width)
            return mlp(encoder.out_dim, params.head_hidden, width)

        self.mask_head = head()
        self.feature_head = head()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        mask = bernoulli_mask(flat, self.params.mask_prob)
        z = self.encoder(self_permuted_corruption(flat, mask).view_as(x))
        return vime_loss(self.mask_head(z), self.feature_head(z), flat, mask, self.params.alpha)


@register_pretext
class VIME(PretextTask):
    name = "vime"
    paper = "Yoon et al., NeurIPS 2020, VIME: Extending the Success of Self- and Semi-supervised Learning to Tabular Domain"
    dp_compatible = True
    modalities = PRETEXT_MODALITIES["vime"]
    Params = VIMEParams
    params: VIMEParams

    def _build(self, encoder: Encoder, modality: str) -> PretextModel:
        return VIMEModel(encoder, self.params)
