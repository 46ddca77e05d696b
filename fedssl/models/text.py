"""A small pre-norm transformer over byte tokens (model.encoder=transformer).

Reuses the ViT's blocks (fedssl.models.vit: attention from nn.Linear, LayerNorm, no BatchNorm),
so both clipping engines and Opacus' ModuleValidator handle it. Token embedding and learned
positions are ``nn.Embedding`` layers.

Padding is invisible: every block gets a key-padding mask built from the ids (``ids == PAD``, see
:func:`padding_mask`), so no query attends to a PAD key. A text's outputs at its own positions, and
its pooled features, are then the same whatever data.max_length pads it to (as long as nothing is
truncated), and pads do not dilute attention. Only PAD is hidden: MASK (masked_tokens' corrupted
bytes) and CLS are ordinary keys. Pad positions still get outputs (their queries see the text) but
they are excluded from the pooled features and from masked_tokens' loss. The mask is a per-sample
function of the sample's own ids, with no parameters: it couples no samples, and the per-sample
gradient engines stay exact (tests/training/test_bookkeeping.py checks them against autograd).

Two readouts: :meth:`TextTransformerEncoder.tokens` gives per-token outputs ``(B, T, width)`` for
token-level pretexts (masked_tokens); ``forward`` gives the mean over non-pad tokens,
``(B, width)``, for everything else (probe, other pretexts).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedssl.inputs import PAD, TEXT, VOCAB_SIZE
from fedssl.models.encoders import Encoder
from fedssl.models.vit import HEAD_DIM, TransformerBlock


def padding_mask(ids: torch.Tensor) -> torch.Tensor:
    """(B, T) bool, True at PAD tokens only (MASK and CLS are real tokens)."""
    return ids.long() == PAD


class TextTransformerEncoder(Encoder):
    modality = TEXT

    def __init__(self, input_shape: Sequence[int], width: int = 64, depth: int = 2) -> None:
        super().__init__()
        if len(input_shape) != 1:
            raise ValueError(f"model.encoder=transformer needs token ids shaped (max_length,), got {tuple(input_shape)}")
        self.input_shape = (int(input_shape[0]),)
        self.vocab_size = VOCAB_SIZE
        self.token_embedding = nn.Embedding(VOCAB_SIZE, width)
        self.position_embedding = nn.Embedding(self.input_shape[0], width)
        self.register_buffer("positions", torch.arange(self.input_shape[0]), persistent=False)
        heads = max(1, width // HEAD_DIM)
        if width % heads:
            heads = 1
        # A ModuleList, not nn.Sequential: each block also takes the padding mask (same state-dict keys).
        self.blocks = nn.ModuleList([TransformerBlock(width, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.out_dim = width

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token outputs (B, T, width) of token ids ``x`` (B, T); no position attends to a PAD."""
        ids = x.long()
        pad = padding_mask(ids)
        h = self.token_embedding(ids) + self.position_embedding(self.positions.expand(ids.shape[0], -1))
        for block in self.blocks:
            h = block(h, pad)
        return self.norm(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of the per-token outputs over the non-pad tokens, (B, width)."""
        keep = (~padding_mask(x)).unsqueeze(-1).to(torch.float32)
        return (self.tokens(x) * keep).sum(1) / keep.sum(1).clamp(min=1.0)
