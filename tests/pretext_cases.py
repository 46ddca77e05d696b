"""The pretext methods' test cases and small helpers, shared by tests/pretext/test_pretext.py (registry, the
model contract, augmentations) and test_pretext_losses.py (each loss against a plain re-implementation)."""

from __future__ import annotations

import torch
from torch import nn

from fedssl.models import build_encoder
from fedssl.pretext import PretextModel, get_pretext

IMAGE_SHAPE = (1, 8, 8)
VECTOR_SHAPE = (12,)
SERIES_SHAPE = (2, 16)  # (channels, length)
SHAPES = {"cnn": IMAGE_SHAPE, "mlp": VECTOR_SHAPE, "conv1d": SERIES_SHAPE}
ALL = ["byol", "jigsaw", "masked_reconstruction", "masked_segment", "masked_tokens", "moco", "moco_noise", "rotation",
       "rotation_jigsaw", "scarf", "simclr", "simsiam", "ts_views", "vime"]
PER_SAMPLE = ["byol", "jigsaw", "masked_reconstruction", "masked_segment", "masked_tokens", "moco_noise", "rotation",
              "rotation_jigsaw", "simsiam", "ts_views", "vime"]
# Per sample within one step; moco couples samples across steps instead (tests/pretext/test_moco.py).
PER_SAMPLE_WITHIN_A_STEP = [*PER_SAMPLE, "moco"]
IMAGE_ONLY = {"jigsaw", "rotation", "rotation_jigsaw"}
TEXT_ONLY = {"masked_tokens"}  # on token ids with the transformer: tests/text/test_text.py
VECTOR_ONLY = {"scarf", "vime"}  # tables
SERIES_ONLY = {"masked_segment", "ts_views"}  # time series (C, L) with conv1d; more in tests/timeseries
IMAGE_OR_VECTOR = [name for name in ALL if name not in TEXT_ONLY | SERIES_ONLY]
# Every (method, modality) pair a method claims to support.
CASES = ([(name, "cnn") for name in IMAGE_OR_VECTOR if name not in VECTOR_ONLY]
         + [(name, "mlp") for name in IMAGE_OR_VECTOR if name not in IMAGE_ONLY]
         + [(name, "conv1d") for name in sorted(SERIES_ONLY)])
NO_AUGMENT = {
    "crop_scale": 1.0,
    "max_rotation": 0.0,
    "max_shift": 0.0,
    "noise_std": 0.0,
    "erase_prob": 0.0,
    "feature_mask_prob": 0.0,
}


def make_model(name: str, kind: str = "cnn", **params: object) -> PretextModel:
    encoder = build_encoder(kind, SHAPES[kind], width=8, depth=2, seed=0)
    # Non-trivial site-only parts too: heads are seeded so failures reproduce.
    torch.manual_seed(1)
    return get_pretext(name, dict(params)).build_model(encoder)


def batch_for(kind: str, size: int, seed: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(size, *SHAPES[kind], generator=generator)


def seeded(model: nn.Module, x: torch.Tensor, seed: int = 3) -> torch.Tensor:
    torch.manual_seed(seed)
    return model(x)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
