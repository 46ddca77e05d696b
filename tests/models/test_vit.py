"""ViT: patch rule, attention (with and without a key-padding mask) and the whole forward against a direct
computation, Opacus accepts it, one factory for server and sites."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F
from opacus.validators import ModuleValidator

from fedssl.models import IMAGE_ENCODERS, build_encoder, encoder_state_keys
from fedssl.models.vit import SelfAttention, patch_size_for
from tests.readout import pooled_by_hand


@pytest.mark.parametrize(("side", "patch", "tokens"), [(8, 1, 64), (28, 4, 49), (32, 4, 64), (64, 8, 64), (9, 3, 9)])
def test_patch_is_the_smallest_divisor_with_at_most_64_tokens(side, patch, tokens):
    assert patch_size_for(side, side) == patch and (side // patch) ** 2 == tokens


@pytest.mark.parametrize("shape, readout, grid", [((1, 8, 8), 0, 2), ((1, 28, 28), 0, 4), ((3, 32, 32), 0, 4),
                                                  ((3, 12, 16), 0, 2), ((1, 28, 28), 2, 2), ((1, 28, 28), 1, 1)])
def test_features_are_the_token_grid_averaged_per_readout_cell(shape, readout, grid):
    encoder = build_encoder("vit", shape, width=16, depth=1, seed=0, readout=readout)
    x = torch.randn(3, *shape)
    out = encoder(x)
    assert encoder.readout == grid and out.shape == (3, grid * grid * 16) == (3, encoder.out_dim)
    # by hand: the blocks' tokens laid out on the patch grid, each readout cell's mean, the final LayerNorm per cell
    tokens = encoder.patch_embedding(x).flatten(2).transpose(1, 2) + encoder.position_embedding.weight
    tokens = encoder.blocks(tokens).transpose(1, 2).reshape(3, 16, *encoder.grid)
    cells = pooled_by_hand(tokens, grid).reshape(3, 16, grid * grid).transpose(1, 2)
    torch.testing.assert_close(out, encoder.norm(cells).flatten(1))


def attention_by_hand(attention: SelfAttention, x: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
    """proj(concat_h softmax(Q_h K_h^T / sqrt(d) with PAD keys at -inf) V_h) from the module's own weights."""
    dim = x.shape[-1]
    size = dim // attention.heads
    q, k, v = attention.qkv(x).split(dim, dim=-1)
    heads = []
    for h in range(attention.heads):
        cols = slice(size * h, size * (h + 1))
        scores = q[..., cols] @ k[..., cols].transpose(1, 2) / math.sqrt(size)
        if pad is not None:
            scores = scores.masked_fill(pad[:, None, :], float("-inf"))
        heads.append(torch.softmax(scores, dim=-1) @ v[..., cols])
    return attention.proj(torch.cat(heads, dim=-1))


def test_attention_matches_softmax_of_scaled_dot_products_by_hand():
    torch.manual_seed(0)
    attention = SelfAttention(dim=8, heads=2)
    x = torch.randn(2, 5, 8)
    assert torch.allclose(attention(x), attention_by_hand(attention, x), atol=1e-6)


def test_masked_attention_ignores_pad_keys_and_a_row_of_pads_stays_finite():
    torch.manual_seed(0)
    attention = SelfAttention(dim=8, heads=2)
    x = torch.randn(3, 5, 8)
    pad = torch.tensor([[0, 0, 0, 1, 1], [0, 1, 0, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.allclose(attention(x, pad), attention_by_hand(attention, x, pad), atol=1e-6)
    assert torch.allclose(attention(x, torch.zeros(3, 5, dtype=torch.bool)), attention(x), atol=1e-6)
    moved = x.clone()
    moved[pad] += 10.0  # what sits at a pad position does not reach any other position
    assert torch.allclose(attention(moved, pad)[~pad], attention(x, pad)[~pad], atol=1e-5)
    everything = torch.ones(3, 5, dtype=torch.bool)  # cannot happen with CLS present; no NaN if it does
    assert torch.isfinite(attention(x, everything)).all()


def test_vit_forward_matches_a_direct_computation_from_its_weights():
    """The ViT passes no mask: patches, positions, blocks with plain attention, quadrant means, LayerNorm."""
    encoder = build_encoder("vit", (3, 12, 16), width=32, depth=2, seed=0)
    assert encoder.patch == 2 and encoder.grid == (6, 8)
    x = torch.randn(2, 3, 12, 16, generator=torch.Generator().manual_seed(1))
    conv = encoder.patch_embedding
    h = F.conv2d(x, conv.weight, conv.bias, stride=2).flatten(2).transpose(1, 2) + encoder.position_embedding.weight
    for block in encoder.blocks:
        h = h + attention_by_hand(block.attention, block.norm1(h))
        h = h + block.mlp(block.norm2(h))
    grid = h.transpose(1, 2).reshape(2, 32, 6, 8)
    quadrants = [grid[:, :, rows, cols].mean((2, 3)) for rows in (slice(0, 3), slice(3, 6)) for cols in (slice(0, 4), slice(4, 8))]
    expected = encoder.norm(torch.stack(quadrants, dim=1)).flatten(1)
    assert torch.allclose(encoder(x), expected, atol=1e-5)


def test_positions_matter_and_each_sample_is_encoded_alone():
    encoder = build_encoder("vit", (1, 8, 8), width=16, depth=1, seed=0)
    x = torch.randn(4, 1, 8, 8)
    together = encoder(x)
    assert torch.allclose(together[2], encoder(x[2:3])[0], atol=1e-5)  # no mixing across the batch (DP needs it)
    shifted = torch.roll(x, shifts=4, dims=3)
    assert not torch.allclose(encoder(shifted), together, atol=1e-3)


def test_opacus_accepts_it_and_server_and_site_build_the_same_keys():
    encoder = build_encoder("vit", (3, 28, 28), width=16, depth=2, seed=1)
    assert ModuleValidator.validate(encoder, strict=False) == []
    again = build_encoder("vit", (3, 28, 28), width=16, depth=2, seed=1)
    assert encoder_state_keys(encoder) == encoder_state_keys(again)
    assert all(torch.equal(a, b) for a, b in zip(encoder.state_dict().values(), again.state_dict().values()))
    assert "positions" not in encoder.state_dict()  # a fixed index buffer is not sent
    assert "vit" in IMAGE_ENCODERS


def test_vector_inputs_are_refused_in_one_line():
    with pytest.raises(ValueError, match="model.encoder=vit needs image inputs.*use model.encoder=mlp"):
        build_encoder("vit", (64,), width=16, depth=1)
