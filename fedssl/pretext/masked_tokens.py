"""Masked-token modelling (BERT's masked LM on bytes).

Devlin, Chang, Lee, Toutanova, "BERT: Pre-training of Deep Bidirectional Transformers for Language
Understanding", NAACL 2019, https://arxiv.org/abs/1810.04805

Each sample hides ``mask_ratio`` (15 %) of its non-pad, non-CLS tokens -- at least one -- by
replacing them with MASK (plain masking, not BERT's 80/10/10 rule), and a linear head over the
encoder's per-token outputs (``encoder.tokens``) predicts the original byte. Per-sample loss: the
mean cross-entropy over that sample's masked positions, so each loss involves one sample: DP-valid.

Padding: MASK only ever replaces a byte, never a PAD, and the encoder hides only PAD keys from
attention (fedssl.models.text.padding_mask), so a masked position is still a key the others attend
to, as in BERT. Pad positions are never masked, so they carry no weight in the loss.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.nn import functional as F

from fedssl.inputs import MASK, PRETEXT_MODALITIES, SPECIALS
from fedssl.models.encoders import Encoder
from fedssl.pretext.base import PretextModel, PretextParams, PretextTask, param
from fedssl.pretext.registry import register_pretext


def token_mask(ids: torch.Tensor, ratio: float) -> torch.Tensor:
    """(B, T) bool: about ``ratio`` of each row's byte tokens, and always its first-ranked one."""
    maskable = ids >= SPECIALS
    scores = torch.rand(ids.shape, device=ids.device).masked_fill(~maskable, 2.0)
    first = torch.zeros_like(maskable).scatter_(1, scores.argmin(dim=1, keepdim=True), True)
    return maskable & ((scores < ratio) | first)


def masked_token_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean cross-entropy over masked positions; shape (B,)."""
    ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, T)
    weights = mask.to(ce.dtype)
    return (ce * weights).sum(1) / weights.sum(1).clamp(min=1.0)


@dataclasses.dataclass(frozen=True)
class MaskedTokensParams(PretextParams):
    mask_ratio: float = param(0.15, gt=0, lt=1)


class MaskedTokensModel(PretextModel):
    def __init__(self, encoder: Encoder, ratio: float) -> None:
        super().__init__(encoder)
        self.ratio = ratio
        self.head = nn.Linear(encoder.out_dim, encoder.vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x.long()
        mask = token_mask(ids, self.ratio)
        logits = self.head(self.encoder.tokens(ids.masked_fill(mask, MASK)))
        return masked_token_loss(logits, ids, mask)


@register_pretext
class MaskedTokens(PretextTask):
    name = "masked_tokens"
    paper = "Devlin et al., NAACL 2019, BERT (masked language modelling, on bytes)"
    dp_compatible = True
    modalities = PRETEXT_MODALITIES["masked_tokens"]
    Params = MaskedTokensParams
    params: MaskedTokensParams

    def _build(self, encoder: Encoder, modality: str) -> PretextModel:
        return MaskedTokensModel(encoder, self.params.mask_ratio)
