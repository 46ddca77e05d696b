"""Synthetic handwritten-style digits rendered from fonts: public data for a warm start.

No private data and no download: digits 0-9 are drawn with the TrueType fonts that ship
inside matplotlib (DejaVu, STIX, Computer Modern), distorted at random (rotation, shear,
aspect, stroke width, position) and reduced exactly the way scikit-learn's embedded digits
were made (UCI optdigits): a 32x32 binary bitmap whose 4x4 blocks are counted, giving an
8x8 image of values 0..16, here divided by 16 to match ``fedssl.data.loaders``' [0, 1]
scale. ``side=16`` or ``side=32`` reduces the same bitmaps by 2x2 blocks or not at all, for
site data kept at a finer resolution.

The images are public by construction, so pretraining on them costs no privacy budget; they
are what ``fedssl.warmstart`` uses for ``warm_start.source: synthetic``.

    images, labels = synthetic_digits(10_000, seed=0)   # (N, 1, 8, 8) float32, (N,) int64
    images, labels = synthetic_digits(10_000, seed=0, side=16)   # (N, 1, 16, 16)
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BITMAP = 32  # optdigits' normalised bitmap side
SIDES = (8, 16, 32)  # output sides that tile the bitmap: 4x4, 2x2 or 1x1 blocks
RENDER = 64  # glyphs are rasterised on a canvas of this size, then reduced to the bitmap
GLYPH_PT = 48

# Font files shipped in matplotlib's mpl-data/fonts/ttf (always present with matplotlib).
# Sans, serif, monospace, bold, oblique and a Computer Modern family give varied shapes.
FONT_FILES: tuple[str, ...] = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
    "cmr10.ttf",
    "cmss10.ttf",
    "cmtt10.ttf",
    "cmb10.ttf",
)


@dataclass(frozen=True)
class Distortion:
    """Ranges of the random distortions (uniform draws); defaults were chosen so the pixel
    statistics roughly match the real digits (mean ~0.3, all 8 rows used, ~6 columns)."""

    max_rotation_deg: float = 12.0
    max_shear: float = 0.3
    aspect_low: float = 0.7  # width multiplier of the glyph's own aspect ratio
    aspect_high: float = 1.2
    max_width: int = 26  # widest glyph in the 32-pixel bitmap (real digits use ~6 of 8 columns)
    max_dilation: int = 1  # extra stroke width in bitmap pixels: 0..max_dilation
    max_shift: int = 2  # horizontal jitter in bitmap pixels
    height_low: int = 28  # glyph height in the 32-pixel bitmap
    height_high: int = 32


def _font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def available_fonts() -> list[Path]:
    """The font files used, in a fixed order (missing ones skipped)."""
    base = _font_dir()
    return [base / name for name in FONT_FILES if (base / name).is_file()]


@functools.lru_cache(maxsize=1)
def _glyphs() -> tuple[tuple[np.ndarray, ...], tuple[str, ...]]:
    """Every (font, digit) glyph, cropped to its ink: a tuple of uint8 arrays per font x digit."""
    from PIL import Image, ImageDraw, ImageFont

    glyphs: list[np.ndarray] = []
    names: list[str] = []
    for path in available_fonts():
        font = ImageFont.truetype(str(path), GLYPH_PT)
        rendered = []
        for digit in range(10):
            canvas = Image.new("L", (RENDER * 2, RENDER * 2), 0)
            ImageDraw.Draw(canvas).text((RENDER // 2, RENDER // 4), str(digit), fill=255, font=font)
            array = np.asarray(canvas)
            if array.max() < 128:
                break  # this font has no usable glyph for the digit: skip the whole font
            rendered.append(_crop(array))
        if len(rendered) == 10:
            glyphs.extend(rendered)
            names.append(path.name)
    if not glyphs:
        raise RuntimeError("no usable font found in matplotlib's mpl-data/fonts/ttf; reinstall matplotlib")
    return tuple(glyphs), tuple(names)


def font_names() -> tuple[str, ...]:
    """The fonts the generator actually draws with."""
    return _glyphs()[1]


def _crop(array: np.ndarray, threshold: int = 1) -> np.ndarray:
    rows = np.flatnonzero((array >= threshold).any(axis=1))
    cols = np.flatnonzero((array >= threshold).any(axis=0))
    if rows.size == 0:
        return array[:1, :1]
    return array[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _render_one(glyph: np.ndarray, rng: np.random.Generator, d: Distortion) -> np.ndarray:
    """One distorted 32x32 binary bitmap of ``glyph``."""
    from PIL import Image, ImageFilter

    image = Image.fromarray(glyph)
    # Shear then rotate about the centre, in one affine map (PIL maps output -> input).
    angle = math.radians(rng.uniform(-d.max_rotation_deg, d.max_rotation_deg))
    shear = rng.uniform(-d.max_shear, d.max_shear)
    pad = max(image.size) // 3  # room for a 12-degree turn and a 0.3 shear
    image = Image.fromarray(np.pad(np.asarray(image), pad))
    cx, cy = image.size[0] / 2, image.size[1] / 2
    cos, sin = math.cos(angle), math.sin(angle)
    # forward = R @ S with S = [[1, shear], [0, 1]]; PIL needs the inverse map.
    a, b, c, e = cos, cos * shear - sin, sin, sin * shear + cos
    det = a * e - b * c
    ia, ib, ic, ie = e / det, -b / det, -c / det, a / det
    coeffs = (ia, ib, cx - ia * cx - ib * cy, ic, ie, cy - ic * cx - ie * cy)
    image = image.transform(image.size, Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)
    ink = _crop(np.asarray(image), threshold=96)
    height = int(rng.integers(d.height_low, d.height_high + 1))
    aspect = ink.shape[1] / max(1, ink.shape[0]) * rng.uniform(d.aspect_low, d.aspect_high)
    width = int(np.clip(round(height * aspect), 6, d.max_width))
    small = Image.fromarray(ink).resize((width, height), Image.Resampling.BOX)
    dilation = int(rng.integers(0, d.max_dilation + 1))
    if dilation:
        small = small.filter(ImageFilter.MaxFilter(2 * dilation + 1))
    bitmap = np.zeros((BITMAP, BITMAP), dtype=np.uint8)
    top = (BITMAP - height) // 2 + int(rng.integers(0, BITMAP - height + 1)) // 2 - (BITMAP - height) // 4
    top = int(np.clip(top, 0, BITMAP - height))
    left = (BITMAP - width) // 2 + int(rng.integers(-d.max_shift, d.max_shift + 1))
    left = int(np.clip(left, 0, BITMAP - width))
    bitmap[top : top + height, left : left + width] = np.asarray(small) >= 128
    return bitmap


def reduce_bitmaps(bitmaps: np.ndarray, side: int = 8) -> np.ndarray:
    """(N, 32, 32) binary bitmaps -> (N, 1, side, side) float32 in [0, 1]: the fraction of set pixels
    per block (``side`` 8 is optdigits' reduction divided by 16)."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {', '.join(map(str, SIDES))} (the 32-pixel bitmap in whole blocks), got {side}")
    block = BITMAP // side
    n = bitmaps.shape[0]
    counts = bitmaps.reshape(n, side, block, side, block).sum(axis=(2, 4))
    return (counts.astype(np.float32) / float(block * block))[:, None]


def synthetic_digits(
    num_samples: int, seed: int = 0, distortion: Distortion | None = None, side: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """``num_samples`` synthetic digits: (N, 1, side, side) float32 in [0, 1] and balanced int64 labels.

    The same seed draws the same glyphs and distortions at every ``side``."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if side not in SIDES:
        raise ValueError(f"side must be one of {', '.join(map(str, SIDES))}, got {side}")
    d = distortion or Distortion()
    glyphs, fonts = _glyphs()
    rng = np.random.default_rng(seed)
    labels = np.arange(num_samples) % 10
    rng.shuffle(labels)
    font_of = rng.integers(0, len(fonts), size=num_samples)
    bitmaps = np.stack([_render_one(glyphs[f * 10 + y], rng, d) for f, y in zip(font_of, labels)])
    return reduce_bitmaps(bitmaps, side), labels.astype(np.int64)


def describe(num_samples: int, seed: int, side: int = 8) -> str:
    """One line for the privacy statement and the warm-start provenance record."""
    return (
        f"{num_samples} synthetic digits rendered by fedssl.data.synthetic (seed {seed}) from "
        f"{len(font_names())} fonts bundled with matplotlib, randomly rotated, sheared, stretched and "
        f"thickened, reduced like UCI optdigits to {side}x{side}; no private or downloaded data"
    )


def fingerprint(images: np.ndarray) -> str:
    """sha256 of the generated images: the provenance record pins exactly what was used."""
    return hashlib.sha256(np.ascontiguousarray(images, dtype=np.float32).tobytes()).hexdigest()
