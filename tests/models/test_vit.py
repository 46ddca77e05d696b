"""ViT: patch rule, attention against a direct computation, Opacus accepts it, one factory for server and sites."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.validators import ModuleValidator

from fedssl.models import IMAGE_ENCODERS, build_encoder, encoder_state_keys
from fedssl.models.vit import SelfAttention, patch_size_for


@pytest.mark.parametrize(("side", "patch", "tokens"), [(8, 1, 64), (28, 4, 49), (32, 4, 64), (64, 8, 64), (9, 3, 9)])
def test_patch_is_the_smallest_divisor_with_at_most_64_tokens(side, patch, tokens):
    assert patch_size_for(side, side) == patch and (side // patch) ** 2 == tokens


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 12, 16)])
def test_features_are_four_quadrants_of_width(shape):
    encoder = build_encoder("vit", shape, width=16, depth=1, seed=0)
    assert encoder(torch.randn(3, *shape)).shape == (3, 4 * 16) == (3, encoder.out_dim)


def test_attention_matches_softmax_of_scaled_dot_products_by_hand():
    torch.manual_seed(0)
    attention = SelfAttention(dim=8, heads=2)
    x = torch.randn(2, 5, 8)
    q, k, v = attention.qkv(x).split(8, dim=-1)
    heads = []
    for h in range(2):
        cols = slice(4 * h, 4 * (h + 1))
        weights = torch.softmax(q[..., cols] @ k[..., cols].transpose(1, 2) / math.sqrt(4), dim=-1)
        heads.append(weights @ v[..., cols])
    expected = attention.proj(torch.cat(heads, dim=-1))
    assert torch.allclose(attention(x), expected, atol=1e-6)


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
