"""A small pre-norm transformer over byte tokens (model.encoder=transformer).

Reuses the ViT's blocks (fedssl.models.vit: attention from nn.Linear, LayerNorm, no BatchNorm),
so both clipping engines and Opacus' ModuleValidator handle it. Token embedding and learned
positions are ``nn.Embedding`` layers. Pad tokens are attended to (they carry a learned
embedding) but excluded from the pooled features.

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
        self.blocks = nn.Sequential(*[TransformerBlock(width, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.out_dim = width

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token outputs (B, T, width) of token ids ``x`` (B, T)."""
        ids = x.long()
        h = self.token_embedding(ids) + self.position_embedding(self.positions.expand(ids.shape[0], -1))
        return self.norm(self.blocks(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = (x.long() != PAD).unsqueeze(-1).to(torch.float32)
        return (self.tokens(x) * keep).sum(1) / keep.sum(1).clamp(min=1.0)
