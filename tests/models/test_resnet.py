"""ResNet-GN: its shape is ResNet-18's and Opacus accepts it. A 2-site DP Flower simulation trains it end to end
in tests/run/test_simulation_idx.py."""

from __future__ import annotations

import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from fedssl.models import IMAGE_ENCODERS, build_encoder, encoder_state_keys
from fedssl.models.resnet import ResNetGNEncoder
from tests.readout import pooled_by_hand


# readout 0 picks the grid from the image: 2x2 up to 16 px on the smaller side, 4x4 above
@pytest.mark.parametrize("shape, readout, grid", [((1, 28, 28), 0, 4), ((3, 64, 64), 0, 4), ((1, 8, 8), 0, 2),
                                                  ((3, 16, 16), 0, 2), ((3, 17, 24), 0, 4), ((1, 28, 28), 2, 2),
                                                  ((3, 32, 32), 1, 1), ((1, 28, 28), 3, 3)])
def test_features_are_the_last_stage_pooled_to_the_readout_grid(shape, readout, grid):
    encoder = build_encoder("resnet", shape, width=4, depth=1, seed=0, readout=readout)
    x = torch.randn(2, *shape)
    feature_map = encoder.features(x)
    # three stride-2 stages: the map before pooling is ceil(H / 8) on a side
    assert feature_map.shape[-2:] == tuple(-(-s // 8) for s in shape[1:])
    out = encoder(x)
    assert encoder.readout == grid and out.shape == (2, 4 * 8 * grid * grid) == (2, encoder.out_dim)
    torch.testing.assert_close(out, pooled_by_hand(feature_map, grid))


def test_depth_2_is_resnet_18_shaped():
    encoder = ResNetGNEncoder((3, 32, 32), width=64, depth=2)
    convs = [m for m in encoder.modules() if isinstance(m, nn.Conv2d)]
    # ResNet-18: the stem, 8 blocks x 2 convs, 3 downsampling shortcuts (its fc is the probe's job here)
    assert len(convs) == 1 + 8 * 2 + 3
    assert sorted({c.out_channels for c in convs}) == [64, 128, 256, 512]
    assert [c.stride for c in convs if c.stride != (1, 1)] == [(2, 2)] * 6  # 3 stages x (first conv, shortcut)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in encoder.modules())
    # ResNet-18's conv weights, counted directly: per stage one 3x3 conv from the previous width and three
    # at its own width, the 3x3 stem from the 3 input channels, and the 1x1 shortcuts
    stage_in_out = [(64, 64), (64, 128), (128, 256), (256, 512)]
    blocks = sum(9 * c_in * c + 3 * 9 * c * c for c_in, c in stage_in_out)
    stem, shortcuts = 9 * 3 * 64, 64 * 128 + 128 * 256 + 256 * 512
    assert sum(c.weight.numel() for c in convs) == stem + blocks + shortcuts


def test_opacus_accepts_it_and_server_and_site_build_the_same_keys():
    encoder = build_encoder("resnet", (3, 28, 28), width=8, depth=2, seed=1)
    assert ModuleValidator.validate(encoder, strict=False) == []
    again = build_encoder("resnet", (3, 28, 28), width=8, depth=2, seed=1)
    assert encoder_state_keys(encoder) == encoder_state_keys(again)
    assert all(torch.equal(a, b) for a, b in zip(encoder.state_dict().values(), again.state_dict().values()))
    assert "resnet" in IMAGE_ENCODERS


def test_vector_inputs_are_refused_in_one_line():
    with pytest.raises(ValueError, match="model.encoder=resnet needs image inputs.*use model.encoder=mlp"):
        build_encoder("resnet", (64,), width=4, depth=1)
