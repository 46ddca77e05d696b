"""model.readout: the grid the image encoders average their last feature map over, one rule for all three
(the ResNet-GN and ViT pin their own features against it in test_resnet.py and test_vit.py)."""

from __future__ import annotations

import pytest
import torch

from fedssl.config import ModelConfig
from fedssl.inputs import readout_grid
from fedssl.models import build_encoder, encoder_for
from tests.readout import pooled_by_hand


@pytest.mark.parametrize("shape, grid", [((1, 8, 8), 2), ((3, 16, 16), 2), ((1, 16, 40), 2), ((1, 17, 17), 4),
                                         ((1, 28, 28), 4), ((3, 224, 224), 4)])
def test_auto_picks_2x2_up_to_16_px_on_the_smaller_side_and_4x4_above(shape, grid):
    assert readout_grid(0, shape) == grid
    assert readout_grid(3, shape) == 3  # a set grid is kept whatever the image


@pytest.mark.parametrize("readout, grid", [(0, 4), (1, 1), (2, 2), (5, 5)])
def test_cnn_features_are_its_map_pooled_to_the_grid(readout, grid):
    encoder = build_encoder("cnn", (1, 28, 28), width=4, depth=2, seed=0, readout=readout)
    x = torch.randn(2, 1, 28, 28)
    out = encoder(x)
    assert encoder.readout == grid and out.shape == (2, 4 * grid * grid) == (2, encoder.out_dim)
    torch.testing.assert_close(out, pooled_by_hand(encoder.features(x), grid))


def test_the_grid_changes_the_features_not_the_weights_that_travel():
    coarse, fine = (build_encoder("resnet", (1, 28, 28), width=4, depth=1, seed=0, readout=r) for r in (2, 4))
    assert {k: v.shape for k, v in coarse.state_dict().items()} == {k: v.shape for k, v in fine.state_dict().items()}
    assert (coarse.out_dim, fine.out_dim) == (4 * 8 * 4, 4 * 8 * 16)


def test_a_runs_model_settings_build_its_grid():
    model = ModelConfig(encoder="vit", width=8, depth=1, input_shape=[1, 28, 28], readout=3)
    assert encoder_for(model).out_dim == 9 * 8
    assert encoder_for(model, input_shape=(1, 8, 8)).readout == 3


@pytest.mark.parametrize("kind, shape", [("mlp", (64,)), ("conv1d", (2, 32)), ("transformer", (24,))])
def test_encoders_without_a_grid_refuse_one(kind, shape):
    with pytest.raises(ValueError, match=f"readout only the cnn, resnet, vit encoders pool to a grid; leave it 0 for {kind}, got 2"):
        build_encoder(kind, shape, width=8, depth=1, readout=2)
