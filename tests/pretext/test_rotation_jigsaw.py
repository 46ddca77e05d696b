"""rotation_jigsaw: the two tasks' losses on one encoder, against a direct computation of each."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from fedssl.errors import ConfigError
from fedssl.models import build_encoder
from fedssl.pretext import get_pretext
from fedssl.pretext.jigsaw import permutation_set, shuffle_tiles
from fedssl.pretext.rotation_jigsaw import RotationJigsawModel


def build(**params):
    encoder = build_encoder("cnn", (1, 8, 8), width=8, depth=2, seed=0)
    torch.manual_seed(1)
    return get_pretext("rotation_jigsaw", params).build_model(encoder)


def test_each_samples_loss_is_the_mean_of_its_rotation_and_jigsaw_cross_entropies():
    model = build()
    assert isinstance(model, RotationJigsawModel)
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(3)
    got = model(x)
    # The same draws, in the model's order: the quarter turns first, then the permutations.
    torch.manual_seed(3)
    turns, choice = torch.randint(0, 4, (5,)), torch.randint(0, 24, (5,))
    for i in range(5):
        rotated = torch.rot90(x[i], int(turns[i]), dims=(1, 2))[None]
        rotation = F.cross_entropy(model.rotation_head(model.encoder(rotated)), turns[i:i + 1])
        shuffled = shuffle_tiles(x[i:i + 1], 2, permutation_set(4, 24)[choice[i:i + 1]])
        jigsaw = F.cross_entropy(model.jigsaw_head(model.encoder(shuffled)), choice[i:i + 1])
        assert torch.allclose(got[i], (rotation + jigsaw) / 2, atol=1e-6)


def test_one_encoder_two_heads_and_the_site_keeps_only_the_heads():
    """A second copy of the encoder among the site-only parts would be restored over the aggregated encoder."""
    model = build(grid=4, num_permutations=30, all_rotations=True)
    assert {k for k in model.state_dict() if not k.startswith("encoder.")} == {
        "rotation_head.weight", "rotation_head.bias", "jigsaw_head.weight", "jigsaw_head.bias"}
    assert model.jigsaw_head.out_features == 30 and model.grid == 4 and model.all_rotations
    x = torch.rand(3, 1, 8, 8)
    assert model(x).shape == (3,) and model(x[:0]).shape == (0,)  # Poisson sampling's empty batch


def test_each_tasks_rule_is_one_line_naming_its_key():
    with pytest.raises(ConfigError, match=r"pretext\.name: 'rotation' needs square images, got 8x12"):
        get_pretext("rotation_jigsaw").build_model(build_encoder("cnn", (1, 8, 12), width=8, depth=1))
    with pytest.raises(ConfigError, match=r"pretext\.params\.grid: must divide the image size 8x8, got 3"):
        get_pretext("rotation_jigsaw", {"grid": 3}).build_model(build_encoder("cnn", (1, 8, 8), width=8, depth=1))
    with pytest.raises(ConfigError, match=r"pretext\.params\.num_permutations: a 2x2 grid has only 24"):
        get_pretext("rotation_jigsaw", {"num_permutations": 30}).build_model(build_encoder("cnn", (1, 8, 8), width=8, depth=1))
    with pytest.raises(ConfigError, match=r"pretext\.params\.patch_size: not a parameter of pretext 'rotation_jigsaw'; "
                                          r"valid parameters: all_rotations, grid, num_permutations"):
        get_pretext("rotation_jigsaw", {"patch_size": 2})
