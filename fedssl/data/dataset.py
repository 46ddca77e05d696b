"""The one in-memory form of a site's training data: inputs and sample ids, never labels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedssl.errors import DataError

# Dimensions of one sample (without the leading N) each modality expects.
SAMPLE_NDIM: dict[str, int] = {"image": 3, "vector": 1, "text": 1, "timeseries": 2}  # text: token ids as float32 (exact below 2**24)
FINITE_CHECK_ROWS = 4096


@dataclass(frozen=True, eq=False)
class SiteDataset:
    """Unlabelled samples held by one site.

    There is deliberately no label field: self-supervised site training must not be able
    to reach labels, so the type cannot carry them. Labels live behind the consent
    manifest (``fedssl.data.consent``) and are only read for evaluation.

    ``eq=False`` keeps identity equality; field-wise ``==`` on tensors is not a bool.
    """

    # float32; images N x C x H x W, vectors N x D. Images may instead be uint8 pixels (0..255), possibly
    # memory-mapped, which training and evaluation turn into [0, 1] floats per batch (fedssl.data.pixels).
    inputs: torch.Tensor
    sample_ids: tuple[str, ...]
    modality: str  # "image" | "vector" | "text" | "timeseries" (N x C x L)
    # Tables: the sizes of the categorical one-hot blocks that end each row (fedssl.tables); VIME treats each
    # block as one feature. Derived from the public schema, not from the rows.
    feature_blocks: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _check_modality(self.modality)
        _check_inputs(self.inputs, self.modality)
        _check_ids(self.sample_ids, len(self.inputs))
        _check_finite(self.inputs, self.sample_ids)

    def __len__(self) -> int:
        return len(self.sample_ids)

    @property
    def is_pixels(self) -> bool:
        """True when the inputs are uint8 pixels, converted to floats per batch."""
        return self.inputs.dtype == torch.uint8

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, e.g. ``(1, 8, 8)``; what encoders are built for."""
        return tuple(self.inputs.shape[1:])

    def subset(self, indices: Sequence[int] | np.ndarray) -> SiteDataset:
        """A new dataset holding only the rows at ``indices`` (copies those rows only)."""
        index = np.asarray(indices)
        if index.ndim != 1 or index.size == 0:
            raise DataError(f"subset needs a non-empty 1-D list of row indices, got shape {index.shape}")
        if not np.issubdtype(index.dtype, np.integer):
            raise DataError(f"subset indices must be integers, got dtype {index.dtype}")
        if index.min() < -len(self) or index.max() >= len(self):
            raise DataError(f"subset index out of range for a dataset of {len(self)} samples")
        rows = torch.from_numpy(index.astype(np.int64))
        return SiteDataset(
            inputs=self.inputs[rows],
            sample_ids=tuple(self.sample_ids[i] for i in index.tolist()),
            modality=self.modality,
            feature_blocks=self.feature_blocks,
        )


def _check_modality(modality: str) -> None:
    if modality not in SAMPLE_NDIM:
        raise DataError(f"modality {modality!r} is unknown; valid choices: {', '.join(sorted(SAMPLE_NDIM))}")


def _check_inputs(inputs: torch.Tensor, modality: str) -> None:
    if not isinstance(inputs, torch.Tensor):
        raise DataError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
    if inputs.dtype != torch.float32 and not (inputs.dtype == torch.uint8 and modality == "image"):
        raise DataError(f"inputs must be float32 (or uint8 pixels for images), got {inputs.dtype}; convert with .float()")
    expected = SAMPLE_NDIM[modality] + 1
    if inputs.ndim != expected:
        layout = {"image": "N x C x H x W", "timeseries": "N x C x L"}.get(modality, "N x D")
        raise DataError(f"{modality} inputs must be shaped {layout}, got shape {tuple(inputs.shape)}")
    if len(inputs) == 0:
        raise DataError("dataset is empty; a site needs at least one sample")


def _check_ids(sample_ids: tuple[str, ...], num_rows: int) -> None:
    if not isinstance(sample_ids, tuple) or not all(isinstance(i, str) and i for i in sample_ids):
        raise DataError("sample_ids must be a tuple of non-empty strings")
    if len(sample_ids) != num_rows:
        raise DataError(f"{len(sample_ids)} sample ids for {num_rows} input rows; give exactly one id per row")
    if len(set(sample_ids)) != len(sample_ids):
        raise DataError(f"sample id {_first_duplicate(sample_ids)!r} appears more than once; sample ids must be unique")


def _first_duplicate(items: Sequence[str]) -> str:
    seen: set[str] = set()
    for item in items:
        if item in seen:
            return item
        seen.add(item)
    raise AssertionError("no duplicate")  # only called after a length mismatch proved one exists


def _check_finite(inputs: torch.Tensor, sample_ids: tuple[str, ...]) -> None:
    if not inputs.is_floating_point():
        return  # integer pixels are always finite; scanning a memory-mapped file would read all of it
    # In chunks of rows: torch.isfinite on the whole tensor allocates |x| and two masks beside it, which for a
    # 4.9 GB float32 site (100k 3x64x64 images) took the load's peak from ~6.5 to 14 GB (benchmarks/data_scale.py).
    for start in range(0, len(inputs), FINITE_CHECK_ROWS):
        finite_rows = torch.isfinite(inputs[start : start + FINITE_CHECK_ROWS]).flatten(1).all(dim=1)
        if not bool(finite_rows.all()):
            bad = start + int(torch.nonzero(~finite_rows)[0, 0])
            raise DataError(f"sample {sample_ids[bad]!r} contains NaN or infinite values; clean or drop it")
