"""Jigsaw puzzles: predict which permutation shuffled the image's tiles.

The image is cut into a ``grid`` x ``grid`` array of tiles, the tiles are shuffled by one
permutation drawn from a fixed set, and a linear head on the encoder's features classifies which
permutation it was. Solving the puzzle needs the parts of an object and where they belong, so the
encoder learns shape and layout. Each sample's loss involves that sample only: DP-compatible.

fedssl's variant differs from the paper's in one way, on purpose: the shuffled tiles are put back
into one image of the original size and the *shared* encoder sees it whole, instead of a per-tile
siamese network whose tile features a fully connected layer merges. The encoder that leaves the
site must be the one the server aggregates and the probe evaluates, on whole images of the
configured shape; a per-tile network would pretrain a different model. The permutation set is the
paper's: ``num_permutations`` permutations chosen greedily for maximal minimum Hamming distance,
from a fixed seed — data-independent, the same at every site and the server.

- [0] Noroozi, Favaro, "Unsupervised Learning of Visual Representations by Solving Jigsaw
  Puzzles", ECCV 2016, https://arxiv.org/abs/1603.09246
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import torch
from torch import nn
from torch.nn import functional as F

from fedssl.errors import ConfigError
from fedssl.inputs import DEFAULT_JIGSAW_GRID, PRETEXT_MODALITIES, jigsaw_grid_problem
from fedssl.models.encoders import Encoder
from fedssl.pretext.base import PretextModel, PretextParams, PretextTask, param
from fedssl.pretext.registry import register_pretext

# The greedy selection starts from a seeded random permutation and scans this many candidates per
# pick (all of them when the grid has at most 8! permutations): the paper's procedure, bounded.
_CANDIDATES = 4096
_PERMUTATION_SEED = 2016


def permutation_set(tiles: int, count: int) -> torch.Tensor:
    """``count`` permutations of ``range(tiles)`` with maximal minimum Hamming distance, greedily.

    Deterministic (fixed seed): every site and the server get the same set. Shape ``(count, tiles)``.
    """
    generator = torch.Generator().manual_seed(_PERMUTATION_SEED)
    if math.factorial(tiles) <= 40320:
        candidates = torch.tensor(list(itertools.permutations(range(tiles))))
        candidates = candidates[torch.randperm(len(candidates), generator=generator)]
    else:
        candidates = torch.stack([torch.randperm(tiles, generator=generator) for _ in range(_CANDIDATES)])
    chosen = [candidates[0]]
    distance = (candidates != candidates[0]).sum(dim=1)  # each candidate's min distance to the chosen set
    for _ in range(count - 1):
        best = int(torch.argmax(distance))
        chosen.append(candidates[best])
        distance = torch.minimum(distance, (candidates != candidates[best]).sum(dim=1))
    return torch.stack(chosen)


def shuffle_tiles(x: torch.Tensor, grid: int, permutations: torch.Tensor) -> torch.Tensor:
    """Image ``i`` of ``x`` (B, C, H, W) with its tiles reordered: output tile ``j`` is input tile ``permutations[i, j]``."""
    batch, channels, height, width = x.shape
    th, tw = height // grid, width // grid
    tiles = x.reshape(batch, channels, grid, th, grid, tw).permute(0, 2, 4, 1, 3, 5).reshape(batch, grid * grid, channels, th, tw)
    shuffled = tiles[torch.arange(batch, device=x.device)[:, None], permutations]
    return shuffled.reshape(batch, grid, grid, channels, th, tw).permute(0, 3, 1, 4, 2, 5).reshape(batch, channels, height, width)


def jigsaw_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy of permutation logits ``(B, P)`` against permutation indices ``(B,)``."""
    return F.cross_entropy(logits, targets, reduction="none")


@dataclasses.dataclass(frozen=True)
class JigsawParams(PretextParams):
    # 2 x 2 tiles fit the 8x8 digits (4 px tiles); use 3 (the paper's) for 24 px and larger images.
    grid: int = param(DEFAULT_JIGSAW_GRID, ge=2, le=4)
    # The paper found 100 a good trade-off for 3 x 3; a 2 x 2 grid has only 4! = 24.
    num_permutations: int = param(24, ge=2, le=1000)


class JigsawModel(PretextModel):
    def __init__(self, encoder: Encoder, grid: int, permutations: torch.Tensor) -> None:
        super().__init__(encoder)
        self.grid = grid
        self.register_buffer("permutations", permutations, persistent=False)
        self.head = nn.Linear(encoder.out_dim, len(permutations))

    def loss_at(self, x: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        """Per-sample loss when image ``i`` is shuffled by permutation ``choice[i]`` of the set."""
        return jigsaw_losses(self.encoder, self.head, x, self.grid, self.permutations, choice)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return jigsaw_losses(self.encoder, self.head, x, self.grid, self.permutations)


def jigsaw_losses(encoder: nn.Module, head: nn.Module, x: torch.Tensor, grid: int, permutations: torch.Tensor,
                  choice: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample jigsaw loss of ``head`` on ``encoder``, image ``i`` shuffled by permutation ``choice[i]`` of
    ``permutations`` (drawn at random when not given). A function of the modules, as rotation_losses."""
    if choice is None:
        choice = torch.randint(0, len(permutations), (x.shape[0],), device=x.device)
    return jigsaw_loss(head(encoder(shuffle_tiles(x, grid, permutations[choice]))), choice)


@register_pretext
class Jigsaw(PretextTask):
    name = "jigsaw"
    paper = "Noroozi & Favaro, ECCV 2016, Unsupervised Learning of Visual Representations by Solving Jigsaw Puzzles"
    dp_compatible = True
    modalities = PRETEXT_MODALITIES["jigsaw"]  # fedssl.inputs: the rules preflight checks without torch
    Params = JigsawParams
    params: JigsawParams

    def _build(self, encoder: Encoder, modality: str) -> PretextModel:
        return JigsawModel(encoder, self.params.grid, checked_permutations(encoder, self.params))


def checked_permutations(encoder: Encoder, params: JigsawParams) -> torch.Tensor:
    """The permutation set ``params`` asks for, once its grid fits the encoder's images (else one line)."""
    grid, count = params.grid, params.num_permutations
    if (problem := jigsaw_grid_problem(encoder.input_shape, grid)) is not None:
        raise ConfigError(f"pretext.params.grid: {problem}")
    if count > math.factorial(grid * grid):
        raise ConfigError(
            f"pretext.params.num_permutations: a {grid}x{grid} grid has only {math.factorial(grid * grid)} "
            f"permutations, got {count}; lower it or raise pretext.params.grid"
        )
    return permutation_set(grid * grid, count)
