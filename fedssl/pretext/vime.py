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

Categorical columns (a table's one-hot blocks, fedssl.tables) are one feature each, as in the
paper: the mask has one entry per column, a corrupted categorical column gets a category drawn
uniformly from its block's slots (fresh randomness, no other row's value: still per-sample), the
numeric columns are permuted among themselves only (a permuted one-hot bit would be no value of
any column), and a categorical column is reconstructed by cross-entropy over its slots instead of
MSE (:func:`vime_table_loss`). Without blocks the loss is exactly :func:`vime_loss`.

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


def table_corruption(x: torch.Tensor, blocks: tuple[int, ...], p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(corrupted rows, column mask) for rows of numeric features followed by one-hot ``blocks``.

    The mask is (B, numeric + len(blocks)): numeric entries as :func:`self_permuted_corruption`
    (permuted among the row's numeric features), a categorical entry replaces its block by a
    uniformly drawn one-hot slot."""
    numeric = x.shape[1] - sum(blocks)
    mask = bernoulli_mask(x.new_empty(x.shape[0], numeric + len(blocks)), p)
    parts = [self_permuted_corruption(x[:, :numeric], mask[:, :numeric])]
    start = numeric
    for j, size in enumerate(blocks):
        drawn = F.one_hot(torch.randint(size, (x.shape[0],), device=x.device), size).to(x.dtype)
        hit = mask[:, numeric + j : numeric + j + 1]
        parts.append(x[:, start : start + size] * (1 - hit) + drawn * hit)
        start += size
    return torch.cat(parts, dim=1), mask


def vime_table_loss(mask_logits: torch.Tensor, recon: torch.Tensor, x: torch.Tensor, mask: torch.Tensor,
                    blocks: tuple[int, ...], alpha: float) -> torch.Tensor:
    """Per-sample VIME loss on a table: (numeric squared errors + each block's cross-entropy against its
    true slot) averaged over the columns, + alpha * the mean mask BCE over the columns; shape (B,)."""
    numeric = x.shape[1] - sum(blocks)
    feature = ((recon[:, :numeric] - x[:, :numeric]) ** 2).sum(dim=1)
    start = numeric
    for size in blocks:
        target = x[:, start : start + size].argmax(dim=1)
        feature = feature + F.cross_entropy(recon[:, start : start + size], target, reduction="none")
        start += size
    bce = F.binary_cross_entropy_with_logits(mask_logits, mask, reduction="none").mean(dim=1)
    return feature / (numeric + len(blocks)) + alpha * bce


@dataclasses.dataclass(frozen=True)
class VIMEParams(PretextParams):
    mask_prob: float = param(0.3, gt=0, lt=1)  # the paper's p_m
    alpha: float = param(2.0, ge=0)  # weight of the mask-estimation term (the paper's alpha)
    head_hidden: int = param(0, ge=0)  # 0: linear heads; >0: one hidden layer of this width


class VIMEModel(PretextModel):
    def __init__(self, encoder: Encoder, params: VIMEParams, blocks: tuple[int, ...] = ()) -> None:
        super().__init__(encoder)
        self.params = params
        self.blocks = blocks
        width = math.prod(encoder.input_shape)
        if sum(blocks) > width:
            raise ValueError(f"categorical blocks {blocks} are wider than the {width} features")

        def head(out: int) -> nn.Module:
            if params.head_hidden == 0:
                return nn.Linear(encoder.out_dim, out)
            return mlp(encoder.out_dim, params.head_hidden, out)

        self.mask_head = head(width - sum(blocks) + len(blocks))  # one logit per column
        self.feature_head = head(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        if self.blocks:
            corrupted, mask = table_corruption(flat, self.blocks, self.params.mask_prob)
            z = self.encoder(corrupted.view_as(x))
            return vime_table_loss(self.mask_head(z), self.feature_head(z), flat, mask, self.blocks, self.params.alpha)
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

    takes_feature_blocks = True

    def _build(self, encoder: Encoder, modality: str) -> PretextModel:
        return VIMEModel(encoder, self.params)

    def _build_table(self, encoder: Encoder, feature_blocks: tuple[int, ...]) -> PretextModel:
        return VIMEModel(encoder, self.params, feature_blocks)
