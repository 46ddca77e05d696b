"""ViT: a small Vision Transformer for masked-patch pretraining on small images.

Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale"
(ICLR 2021), in the pre-norm form, with the choices DP-SGD and small images need:

- **Patches from a strided convolution** (kernel = stride = patch), as in the paper's hybrid-free
  form. The patch is the smallest divisor of both image sides that gives at most
  :data:`MAX_TOKENS` tokens (8x8 digits: 1 px, 64 tokens; 28x28: 4 px, 49; 32x32: 4 px, 64;
  64x64: 8 px, 64), so attention stays cheap on 2 CPU cores.
- **Learned position embeddings as an ``nn.Embedding`` over the token positions**, not a bare
  ``nn.Parameter``: both clipping engines (book-keeping and Opacus) compute per-sample gradients
  per *layer*, and a parameter that belongs to no supported layer would have none.
- **Attention from plain ``nn.Linear`` layers** (one fused q/k/v projection, one output projection)
  and :func:`torch.nn.functional.scaled_dot_product_attention`, which holds no parameters; every
  weight sits in a Linear or a LayerNorm, which both engines support. Opacus'
  ``DPMultiheadAttention`` exists for ``nn.MultiheadAttention``; it is not needed here. The blocks
  take an optional per-sample key-padding mask (:func:`attention_mask`) for the text encoder
  (fedssl.models.text); the ViT has no padding and passes none.
- **LayerNorm, never BatchNorm**; no class token (it would be another bare parameter).
- **Readout: the tokens averaged over each cell of a ``readout x readout`` grid over the patch grid,
  then the final LayerNorm**, ``readout**2 x width`` features: the same spatial layout the CNN and
  ResNet-GN readouts keep for a linear probe (the same rule picks the grid, fedssl.inputs.readout_grid),
  instead of one global token average.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from fedssl.inputs import AUTO_READOUT, readout_grid
from fedssl.models.encoders import Encoder

MAX_TOKENS = 64
HEAD_DIM = 16  # width / HEAD_DIM heads (at least one)


def patch_size_for(height: int, width: int) -> int:
    """The smallest patch dividing both sides with at most MAX_TOKENS tokens (the whole image at worst)."""
    for patch in range(1, min(height, width) + 1):
        if height % patch == 0 and width % patch == 0 and (height // patch) * (width // patch) <= MAX_TOKENS:
            return patch
    return min(height, width)


def attention_mask(pad: torch.Tensor | None) -> torch.Tensor | None:
    """Boolean ``attn_mask`` (True: may attend) of shape (B, 1, 1, T) from a key-padding mask (B, T),
    True at keys to ignore; ``None`` stays ``None``.

    A row whose every key is padding would give softmax(-inf, ..., -inf) = NaN; such a row attends to
    all its keys instead (the unmasked computation). The text encoder never builds one: CLS is
    always present. The mask is a function of each sample's own ids, broadcast over heads and
    queries only, so it couples no samples and holds no parameters: the per-sample gradient engines
    (book-keeping's rules and Opacus' hooks, both on the Linear / LayerNorm / Embedding layers
    around it) see the same layer inputs and output gradients as before, and stay exact.
    """
    if pad is None:
        return None
    keep = ~pad.bool()
    keep = keep | ~keep.any(dim=-1, keepdim=True)
    return keep[:, None, None, :]


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        """``pad`` (B, T) bool, optional: True at keys no query may attend to (see :func:`attention_mask`)."""
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask(pad))  # (B, heads, T, head_dim)
        return self.proj(attended.transpose(1, 2).reshape(batch, tokens, dim))


class TransformerBlock(nn.Module):
    """Pre-norm: x + attention(LN(x)), then x + MLP(LN(x)), MLP width 2x; ``pad`` goes to the attention."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attention(self.norm1(x), pad)
        return x + self.mlp(self.norm2(x))


class ViTEncoder(Encoder):
    """A small ViT; ``width`` is the token dimension, ``depth`` the number of transformer blocks."""

    def __init__(self, input_shape: Sequence[int], width: int = 64, depth: int = 4, readout: int = AUTO_READOUT) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(
                f"model.encoder=vit needs image inputs shaped (channels, height, width), got {tuple(input_shape)}; "
                "use model.encoder=mlp for vector data"
            )
        self.input_shape = tuple(int(d) for d in input_shape)
        channels, height, width_px = self.input_shape
        self.patch = patch_size_for(height, width_px)
        self.grid = (height // self.patch, width_px // self.patch)
        tokens = self.grid[0] * self.grid[1]
        self.patch_embedding = nn.Conv2d(channels, width, kernel_size=self.patch, stride=self.patch)
        self.position_embedding = nn.Embedding(tokens, width)
        self.register_buffer("positions", torch.arange(tokens), persistent=False)
        heads = max(1, width // HEAD_DIM)
        if width % heads:
            heads = 1
        self.blocks = nn.Sequential(*[TransformerBlock(width, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.readout = readout_grid(readout, self.input_shape)
        self.out_dim = self.readout**2 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        tokens = self.patch_embedding(x).flatten(2).transpose(1, 2)  # (B, T, width)
        tokens = tokens + self.position_embedding(self.positions.expand(batch, -1))
        tokens = self.blocks(tokens)
        grid = tokens.transpose(1, 2).reshape(batch, -1, *self.grid)
        cells = F.adaptive_avg_pool2d(grid, (self.readout, self.readout)).flatten(2).transpose(1, 2)  # (B, cells, width)
        return self.norm(cells).flatten(1)
