"""Jigsaw puzzles: the tile shuffle, the permutation set and the loss against direct computations."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.nn import functional as F

from fedssl.errors import ConfigError
from fedssl.models import build_encoder
from fedssl.pretext import get_pretext
from fedssl.pretext.jigsaw import JigsawModel, permutation_set, shuffle_tiles


def tiles_by_loops(image: torch.Tensor, grid: int) -> list[torch.Tensor]:
    """Image (C, H, W) cut into grid x grid tiles, row-major, by plain slicing."""
    _, height, width = image.shape
    th, tw = height // grid, width // grid
    return [image[:, r * th:(r + 1) * th, c * tw:(c + 1) * tw] for r in range(grid) for c in range(grid)]


def assemble_by_loops(tiles: list[torch.Tensor], grid: int) -> torch.Tensor:
    rows = [torch.cat(tiles[r * grid:(r + 1) * grid], dim=2) for r in range(grid)]
    return torch.cat(rows, dim=1)


@pytest.mark.parametrize(("grid", "shape"), [(2, (1, 8, 8)), (3, (3, 9, 12)), (4, (2, 16, 8))])
def test_shuffle_tiles_matches_cutting_and_reassembling_by_hand(grid, shape):
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(5, *shape, generator=generator)
    perms = torch.stack([torch.randperm(grid * grid, generator=generator) for _ in range(5)])
    out = shuffle_tiles(x, grid, perms)
    for i in range(5):
        tiles = tiles_by_loops(x[i], grid)
        expected = assemble_by_loops([tiles[int(j)] for j in perms[i]], grid)
        assert torch.equal(out[i], expected)


def test_the_identity_permutation_leaves_the_image_and_every_shuffle_keeps_the_pixels():
    x = torch.rand(3, 1, 8, 8)
    identity = torch.arange(4).repeat(3, 1)
    assert torch.equal(shuffle_tiles(x, 2, identity), x)
    shuffled = shuffle_tiles(x, 2, torch.tensor([[3, 2, 1, 0]] * 3))
    assert not torch.equal(shuffled, x)
    assert torch.equal(shuffled.flatten(1).sort(dim=1).values, x.flatten(1).sort(dim=1).values)


def test_permutation_set_is_fixed_distinct_and_spread():
    first, again = permutation_set(9, 30), permutation_set(9, 30)
    assert torch.equal(first, again)  # every site and the server build the same set
    assert len({tuple(p.tolist()) for p in first}) == 30
    assert all(sorted(p.tolist()) == list(range(9)) for p in first)
    min_distance = min(int((a != b).sum()) for a, b in itertools.combinations(first, 2))
    assert min_distance >= 6  # greedy max-min Hamming over 4096 candidates; random picks give ~3-4
    assert len({tuple(p.tolist()) for p in permutation_set(4, 24)}) == 24  # 2 x 2: every permutation


def test_loss_is_the_cross_entropy_of_the_head_on_the_shuffled_image():
    encoder = build_encoder("cnn", (1, 8, 8), width=8, depth=2, seed=0)
    torch.manual_seed(1)
    model = get_pretext("jigsaw").build_model(encoder)
    assert isinstance(model, JigsawModel)
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    choice = torch.tensor([0, 5, 23, 7, 7, 1])
    got = model.loss_at(x, choice)
    for i in range(6):
        tiles = tiles_by_loops(x[i], 2)
        shuffled = assemble_by_loops([tiles[int(j)] for j in model.permutations[choice[i]]], 2)
        logits = model.head(model.encoder(shuffled[None]))
        expected = F.cross_entropy(logits, choice[i:i + 1])
        assert torch.allclose(got[i], expected, atol=1e-6)


def test_a_grid_that_does_not_divide_the_image_or_too_many_permutations_is_one_line():
    encoder = build_encoder("cnn", (1, 8, 8), width=8, depth=1)
    with pytest.raises(ConfigError, match=r"pretext\.params\.grid: must divide the image size 8x8, got 3"):
        get_pretext("jigsaw", {"grid": 3}).build_model(encoder)
    with pytest.raises(ConfigError, match=r"pretext\.params\.num_permutations: a 2x2 grid has only 24"):
        get_pretext("jigsaw", {"num_permutations": 30}).build_model(encoder)
    with pytest.raises(ValueError, match=r"vector"):
        get_pretext("jigsaw").build_model(build_encoder("mlp", (12,), width=8, depth=1))
