"""What each encoder and pretext task takes as input: the rules, without torch.

One home for them so that the models (fedssl.models), the pretext tasks (fedssl.pretext) and the
preflight check (fedssl.preflight) cannot disagree: preflight runs before torch is imported, so
these rules may import nothing heavier than the standard library. Each ``*_problem`` function
returns None when the input fits, else one line saying what does not fit and the fix.

A sample's shape is ``(channels, height, width)`` for an image and anything else (flattened) for a
vector, the same rule the data loaders and :func:`modality_of_shape` apply.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

IMAGE = "image"
VECTOR = "vector"
TEXT = "text"  # token ids shaped (max_length,): fedssl.data.text's byte tokenizer
TIMESERIES = "timeseries"  # series shaped (channels, length): fedssl.data.series (data.kind timeseries, never guessed)
BOTH = frozenset({IMAGE, VECTOR})

ENCODER_NAMES = ("cnn", "conv1d", "mlp", "resnet", "transformer", "vit")  # fedssl.models.registry builds each (a test holds the two equal)
IMAGE_ENCODERS = frozenset({"cnn", "resnet", "vit"})  # these take (channels, height, width); mlp flattens any shape
TEXT_ENCODERS = frozenset({"transformer"})  # these take token ids (max_length,) and only them
SERIES_ENCODERS = frozenset({"conv1d"})  # these take series (channels, length) and only them
# The image encoders end in an average over a readout x readout grid of their last feature map (model.readout).
# 0 picks it from the image: 2x2 up to AUTO_READOUT_COARSE_MAX px on the smaller side, 4x4 above. Measured
# with the random-init CNN's linear probe (benchmarks/README.md §10, readout_screen.py): on 8x8 digits 2x2
# and 4x4 tie (92.6 vs 92.8 %, global 87.5), so the grid with a quarter of the features; on 28x28
# Fashion-MNIST a 2x2 grid averages 14x14-pixel regions and 4x4 gains 3.1 points. 1 is the paper's global average.
READOUT_ENCODERS = IMAGE_ENCODERS
AUTO_READOUT = 0
AUTO_READOUT_COARSE_MAX = 16
MAX_READOUT = 8
CUSTOM_SPEC = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")  # dotted.module.path:factory_name

# The inputs each registered pretext task works on (fedssl.pretext reads its tasks' modalities from here).
PRETEXT_MODALITIES: dict[str, frozenset[str]] = {
    "rotation": frozenset({IMAGE}),
    "masked_reconstruction": BOTH,
    "byol": BOTH,
    "simsiam": BOTH,
    "simclr": BOTH,
    "jigsaw": frozenset({IMAGE}),
    "rotation_jigsaw": frozenset({IMAGE}),  # both on one encoder: both tasks' rules below
    "moco": BOTH,
    "moco_noise": BOTH,
    "masked_tokens": frozenset({TEXT}),
    "vime": frozenset({VECTOR}),  # tables: corrupts and reconstructs single features
    "scarf": frozenset({VECTOR}),
    "masked_segment": frozenset({TIMESERIES}),  # contiguous time segments, reconstructed per time step
    "ts_views": frozenset({TIMESERIES}),  # jitter / scaling / cropping / segment permutation
}
DEFAULT_PATCH_SIZE = 2  # masked_reconstruction's pretext.params.patch_size
# Tasks whose loss couples the samples of a batch, and how: refused under DP (fedssl.pretext.registry), since
# per-sample clipping no longer bounds one sample's influence. Here so the preflight can say so without torch.
COUPLED_PRETEXTS: dict[str, str] = {
    "simclr": "uses in-batch negatives (NT-Xent)",
    "moco": ("keeps a queue of earlier batches' keys as negatives (a sample seen in one step shapes the other "
             "samples' losses in later steps, through a queue that is never noised)"),
    "scarf": "uses in-batch negatives (InfoNCE between two corrupted views)",
}
DEFAULT_JIGSAW_GRID = 2  # jigsaw's pretext.params.grid
# Byte-level token ids (fedssl.data.text says why bytes): PAD, MASK, CLS, then byte b is b + SPECIALS.
PAD, MASK, CLS = 0, 1, 2
SPECIALS = 3
VOCAB_SIZE = 256 + SPECIALS


def is_custom_spec(kind: str) -> bool:
    """True for a brought-your-own encoder, ``package.module:factory``."""
    return bool(CUSTOM_SPEC.match(kind))


def readout_grid(readout: int, shape: Sequence[int]) -> int:
    """The side of the grid an image encoder averages its features over: ``readout``, or for
    :data:`AUTO_READOUT` the grid this image size calls for."""
    if readout != AUTO_READOUT:
        return int(readout)
    return 2 if min(int(d) for d in shape[1:]) <= AUTO_READOUT_COARSE_MAX else 4


def readout_problem(encoder: str, readout: Any) -> str | None:
    """Whether ``readout`` is a grid ``encoder`` can pool to: None, else the rule it breaks (the config, the
    site's check of a plan and the encoder factory all apply this one rule)."""
    if isinstance(readout, bool) or not isinstance(readout, int) or not 0 <= readout <= MAX_READOUT:
        return f"must be a grid side in [1, {MAX_READOUT}], or 0 to pick it from the image size"
    if readout != AUTO_READOUT and encoder not in READOUT_ENCODERS:
        return f"only the {', '.join(sorted(READOUT_ENCODERS))} encoders pool to a grid; leave it 0 for {encoder}"
    return None


def modality_of_shape(shape: Sequence[int]) -> str:
    """``"image"`` for (channels, height, width), ``"vector"`` for anything else."""
    return IMAGE if len(shape) == 3 else VECTOR


def describe_shape(shape: Sequence[int]) -> str:
    return "x".join(str(int(d)) for d in shape)


def encoder_input_problem(encoder: str, shape: Sequence[int], modality: str | None = None) -> str | None:
    """Whether ``encoder`` can take samples of ``shape`` (a custom encoder says so itself when built).

    ``modality`` is the source's when known (text cannot be told from a vector by its shape)."""
    if modality == TEXT and encoder not in TEXT_ENCODERS:
        return (f"the {encoder} encoder cannot read text (token ids shaped {list(shape)}); "
                "use model.encoder=transformer for text")
    if encoder in TEXT_ENCODERS and modality != TEXT:
        return (f"the {encoder} encoder reads text (token ids), but the samples are "
                f"{modality or modality_of_shape(shape)}s shaped {list(shape)}; use a .txt source or another encoder")
    if modality == TIMESERIES and encoder not in SERIES_ENCODERS and not is_custom_spec(encoder):
        return (f"the {encoder} encoder cannot read time series (shaped [channels, length] {list(shape)}); "
                "use model.encoder=conv1d for time series")
    if encoder in SERIES_ENCODERS and modality != TIMESERIES:
        return (f"the {encoder} encoder reads time series, but the samples are "
                f"{modality or modality_of_shape(shape)}s shaped {list(shape)}; set data.kind=timeseries for series "
                "data (.npy/.npz/.csv) or choose another encoder")
    if encoder in IMAGE_ENCODERS and len(shape) != 3:
        return (f"the {encoder} encoder needs images shaped [channels, height, width], but the samples are "
                f"{modality_of_shape(shape)}s shaped {list(shape)}; use model.encoder=mlp for vectors")
    return None


def modality_problem(pretext: str, shape: Sequence[int], modality: str | None = None) -> str | None:
    """Whether ``pretext`` works on ``modality`` (default: that of ``shape``); the message lists the tasks that do."""
    modalities = PRETEXT_MODALITIES.get(pretext)
    modality = modality or modality_of_shape(shape)
    if modalities is None or modality in modalities:
        return None
    fitting = sorted(name for name, kinds in PRETEXT_MODALITIES.items() if modality in kinds)
    return (f"{pretext!r} works on {' and '.join(sorted(modalities))} inputs, but the encoder takes {modality} inputs "
            f"shaped {tuple(int(d) for d in shape)}; valid choices for {modality} data: {', '.join(fitting)}")


def rotation_problem(shape: Sequence[int]) -> str | None:
    """Rotation turns images by quarter turns: a non-square image would change shape."""
    _, height, width = shape
    if height != width:
        return (f"'rotation' needs square images, got {height}x{width}; "
                "resize the data or choose masked_reconstruction, byol or simsiam")
    return None


def patch_problem(shape: Sequence[int], patch_size: int) -> str | None:
    """Masked reconstruction hides whole patches of an image (single features of a vector): at least 2 units."""
    if len(shape) == 3:
        _, height, width = shape
        if height % patch_size or width % patch_size:
            return f"must divide the image size {height}x{width}, got {patch_size}"
        units = (height // patch_size) * (width // patch_size)
    else:
        units = 1
        for d in shape:
            units *= int(d)
    if units < 2:
        return (f"the input splits into {units} unit; masking needs at least 2, "
                f"got patch_size {patch_size} for input shape {tuple(int(d) for d in shape)}")
    return None


def jigsaw_grid_problem(shape: Sequence[int], grid: int) -> str | None:
    """Jigsaw cuts the image into grid x grid equal tiles."""
    _, height, width = shape
    if height % grid or width % grid:
        return f"must divide the image size {height}x{width}, got {grid}; choose a grid that divides both sides or resize the data"
    return None


def dp_problem(pretext: str) -> str | None:
    """Whether ``pretext`` may train under DP-SGD: not when its loss couples samples."""
    if pretext not in COUPLED_PRETEXTS:
        return None
    per_sample = ", ".join(sorted(name for name in PRETEXT_MODALITIES if name not in COUPLED_PRETEXTS))
    return (f"{pretext!r} {COUPLED_PRETEXTS[pretext]}: one sample's presence changes every other sample's loss, so "
            f"DP-SGD's guarantee is void; choose a per-sample pretext ({per_sample}) or set privacy.enabled=false")


def pretext_input_problem(
    pretext: str, params: Mapping[str, Any], shape: Sequence[int], modality: str | None = None
) -> tuple[str, str] | None:
    """(config key, problem) when ``pretext`` with ``params`` cannot train on samples of ``shape``.

    Only the input rules: the task's name and parameter types are the registry's to check.
    """
    if (problem := modality_problem(pretext, shape, modality)) is not None:
        return "pretext.name", problem
    if modality in (TEXT, TIMESERIES):
        return None
    if pretext in ("rotation", "rotation_jigsaw") and (problem := rotation_problem(shape)) is not None:
        return "pretext.name", problem
    if pretext in ("jigsaw", "rotation_jigsaw") and len(shape) == 3:
        grid = params.get("grid", DEFAULT_JIGSAW_GRID)
        if isinstance(grid, int) and not isinstance(grid, bool) and grid >= 1:
            if (problem := jigsaw_grid_problem(shape, grid)) is not None:
                return "pretext.params.grid", problem
    if pretext == "masked_reconstruction":
        patch_size = params.get("patch_size", DEFAULT_PATCH_SIZE)
        if isinstance(patch_size, int) and not isinstance(patch_size, bool) and patch_size >= 1:
            if (problem := patch_problem(shape, patch_size)) is not None:
                return "pretext.params.patch_size", problem
    return None
