"""Images kept as uint8 pixels (N x C x H x W) and turned into floats in [0, 1] one batch at a time.

A float32 copy of a site's images costs 4x the bytes of its pixels (100k 3x64x64 images:
4.9 GB against 1.2 GB), so pixel sources keep uint8 rows, and the training step and the
evaluation convert only what they use. Resizing and cropping happen once, at load.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fedssl.errors import DataError

PIXEL_MAX = 255.0
PIXEL_DTYPES = (torch.uint8,)
CHANNELS = (1, 3)  # greyscale, RGB
RESIZE_CHUNK = 2048  # images resized per step: bounds the float working copy to a few MB


def unit_float(inputs: torch.Tensor) -> torch.Tensor:
    """uint8 pixels as float32 in [0, 1]; any other tensor is returned as it is (the same object).

    Division by 255 in float32 gives the same bits as numpy's ``pixels.astype(float32) / 255``
    used by the image-folder loader.
    """
    if inputs.dtype in PIXEL_DTYPES:
        return inputs.to(torch.float32).div_(PIXEL_MAX)
    return inputs


def to_nchw(array: np.ndarray, path: Path) -> np.ndarray:
    """N x H x W (greyscale) or N x H x W x C / N x C x H x W with C in {1, 3} as N x C x H x W.

    Channels-last is read first: it is how IDX and most image dumps store colour. The result is a
    view where possible, so a memory map stays a memory map.
    """
    if array.ndim == 3:
        return array[:, None]
    if array.ndim == 4 and array.shape[3] in CHANNELS:
        return array.transpose(0, 3, 1, 2)
    if array.ndim == 4 and array.shape[1] in CHANNELS:
        return array
    raise DataError(
        f"{path}: images shaped {array.shape} are not N x H x W (greyscale) or N x H x W x C / N x C x H x W "
        f"with C = 1 or 3; convert the file"
    )


def fit_images(images: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """Resize (bilinear, antialiased) so the image covers ``size`` = (height, width), then crop the centre.

    The aspect ratio is kept: a 28x28 image fitted to 32x24 is scaled to 32x32 and cropped to
    32x24. Returns ``images`` itself when it already has that size (a memory map stays one).
    uint8 stays uint8 (rounded); float stays float.
    """
    if size is None or tuple(images.shape[2:]) == tuple(size):
        return images
    height, width = size
    source_h, source_w = images.shape[2:]
    scale = max(height / source_h, width / source_w)
    scaled = (max(height, round(source_h * scale)), max(width, round(source_w * scale)))
    top, left = (scaled[0] - height) // 2, (scaled[1] - width) // 2
    out = np.empty((len(images), images.shape[1], height, width), dtype=images.dtype)
    for start in range(0, len(images), RESIZE_CHUNK):
        chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + RESIZE_CHUNK])).to(torch.float32)
        resized = torch.nn.functional.interpolate(chunk, size=scaled, mode="bilinear", antialias=True, align_corners=False)
        resized = resized[:, :, top : top + height, left : left + width]
        if images.dtype == np.uint8:
            resized = resized.round_().clamp_(0, PIXEL_MAX).to(torch.uint8)
        out[start : start + len(chunk)] = resized.numpy()
    return out
