"""Rotation prediction (RotNet).

Each image is rotated by a random multiple of 90 degrees and a linear head on the encoder's
features classifies which one. Recognising "upright" requires knowing what the object is, so
the encoder learns shape. Each sample's loss involves that sample only: DP-compatible.

- [0] Gidaris, Singh, Komodakis, "Unsupervised Representation Learning by Predicting Image
  Rotations", ICLR 2018, https://arxiv.org/abs/1803.07728
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.nn import functional as F

from fedssl.errors import ConfigError
from fedssl.inputs import PRETEXT_MODALITIES, rotation_problem
from fedssl.models.encoders import Encoder
from fedssl.pretext.base import PretextModel, PretextParams, PretextTask, param
from fedssl.pretext.registry import register_pretext

NUM_ROTATIONS = 4


def rotation_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy of rotation logits ``(B, 4)`` against rotation indices ``(B,)``."""
    return F.cross_entropy(logits, targets, reduction="none")


def rotate(x: torch.Tensor, quarter_turns: torch.Tensor) -> torch.Tensor:
    """Rotate image ``i`` of ``x`` (B, C, H, W) by ``quarter_turns[i]`` x 90 degrees counter-clockwise."""
    every_turn = torch.stack([torch.rot90(x, k, dims=(2, 3)) for k in range(NUM_ROTATIONS)])
    return every_turn[quarter_turns, torch.arange(x.shape[0], device=x.device)]


@dataclasses.dataclass(frozen=True)
class RotationParams(PretextParams):
    # True: show every image at all four rotations and average, removing the sampling noise of
    # the rotation draw at 4x the compute (the RotNet paper's own recipe).
    all_rotations: bool = param(False)


def rotation_losses(encoder: nn.Module, head: nn.Module, x: torch.Tensor, all_rotations: bool) -> torch.Tensor:
    """Per-sample rotation loss of ``head`` on ``encoder``: one random quarter turn per image, or all four averaged.

    A function of the modules, so a task that shares the encoder with another (rotation_jigsaw) computes the
    same loss without holding a second model, whose state would repeat the encoder's."""
    batch = x.shape[0]

    def loss_at(quarter_turns: torch.Tensor) -> torch.Tensor:
        return rotation_loss(head(encoder(rotate(x, quarter_turns))), quarter_turns)

    if all_rotations:
        # Four forward passes of B samples, not one of 4B: Opacus needs the batch axis to be the sample axis.
        turns = [torch.full((batch,), k, dtype=torch.long, device=x.device) for k in range(NUM_ROTATIONS)]
        return torch.stack([loss_at(k) for k in turns]).mean(dim=0)
    return loss_at(torch.randint(0, NUM_ROTATIONS, (batch,), device=x.device))


class RotationModel(PretextModel):
    def __init__(self, encoder: Encoder, all_rotations: bool) -> None:
        super().__init__(encoder)
        self.head = nn.Linear(encoder.out_dim, NUM_ROTATIONS)
        self.all_rotations = all_rotations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rotation_losses(self.encoder, self.head, x, self.all_rotations)


@register_pretext
class Rotation(PretextTask):
    name = "rotation"
    paper = "Gidaris et al., ICLR 2018, Unsupervised Representation Learning by Predicting Image Rotations"
    dp_compatible = True
    modalities = PRETEXT_MODALITIES["rotation"]  # fedssl.inputs: the rules preflight checks without torch
    Params = RotationParams
    params: RotationParams

    def _build(self, encoder: Encoder, modality: str) -> PretextModel:
        if (problem := rotation_problem(encoder.input_shape)) is not None:
            raise ConfigError(f"pretext.name: {problem}")
        return RotationModel(encoder, self.params.all_rotations)
