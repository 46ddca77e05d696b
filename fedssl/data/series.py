"""Time-series sources (``data.kind: timeseries``): arrays and CSV into (N, channels, length) floats (torch-free).

Layouts:

* ``.npy`` / ``.npz`` (inputs under ``x`` or ``inputs``, optional ``ids``): ``N x L`` (univariate,
  one channel) or ``N x C x L`` (multivariate). A 2-D array is a table unless the kind says
  ``timeseries``: the kind is never guessed from the array, so a table is never read as a series.
* ``.csv``: a header row, then one univariate series per row: an optional ``id`` column, label
  columns (``label``/``target``) dropped at the door as for tables, every other column a time
  step in header order. Multivariate series come as arrays.

Variable length, one rule for every layout: a series ends at its last time step holding a value
in any channel; trailing NaNs (arrays, the convention of the UCR/UEA archive for unequal lengths)
or trailing empty cells (CSV) mark a shorter series. Every series is then fitted to
``data.series_length`` time steps (0, the default: the source's own length, the array's last
axis or the CSV's value columns): a longer series loses its tail (crop at the end), a shorter one
is zero-padded at the end. The pad is not masked: the encoder sees the zeros as values (no mask
channel, so the input shape, and the encoder every site shares, does not depend on a site's data).
A NaN inside a series (before its last value) is refused in one line: imputing it would be a
guess about the site's signal that no one reviewed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedssl.errors import DataError

SERIES_SUFFIXES = (".npy", ".npz", ".csv")


def as_series_array(array: np.ndarray, path: Path) -> np.ndarray:
    """``N x L`` or ``N x C x L`` numbers as ``N x C x L`` (a view; nothing copied)."""
    if array.dtype.kind not in "biuf":
        raise DataError(f"{path}: array dtype {array.dtype} is not numeric; store numbers only")
    if array.ndim == 2:
        return array[:, None, :]
    if array.ndim == 3:
        return array
    raise DataError(f"{path}: array shape {array.shape} is not N x L (univariate) or N x C x L (multivariate) "
                    "series; reshape it")


def series_sample_shape(shape: tuple[int, ...], path: Path, series_length: int) -> tuple[int, int]:
    """(channels, length) of one sample of an array shaped ``shape``, after the length rule (for the probe)."""
    if len(shape) not in (2, 3):
        raise DataError(f"{path}: array shape {shape} is not N x L (univariate) or N x C x L (multivariate) "
                        "series; reshape it")
    channels = 1 if len(shape) == 2 else shape[1]
    return channels, series_length or shape[-1]


def fit_length(series: np.ndarray, series_length: int, path: Path, ids: tuple[str, ...]) -> np.ndarray:
    """``N x C x L`` (NaN tails allowed) -> float32 ``N x C x series_length`` by the module's rule."""
    values = np.asarray(series, dtype=np.float32)
    target = series_length or values.shape[-1]
    finite = np.isfinite(values)
    if np.isinf(values).any():
        raise DataError(f"{path}: sample {ids[int(np.argwhere(np.isinf(values))[0, 0])]!r} holds an infinite value; "
                        "clean or drop it")
    # A series' length: one past its last time step with a value in any channel.
    any_channel = finite.any(axis=1)  # (N, L)
    lengths = np.where(any_channel.any(axis=1), values.shape[-1] - np.argmax(any_channel[:, ::-1], axis=1), 0)
    inside = np.arange(values.shape[-1])[None, None, :] < lengths[:, None, None]
    holes = inside & ~finite
    if holes.any():
        row, channel, step = (int(i) for i in np.argwhere(holes)[0])
        raise DataError(f"{path}: sample {ids[row]!r} has a missing value (NaN) at channel {channel}, step {step}, "
                        "inside the series; only trailing NaNs (a shorter series) are allowed: fill or drop it")
    if (lengths == 0).any():
        raise DataError(f"{path}: sample {ids[int(np.argmax(lengths == 0))]!r} has no values; drop it")
    out = np.zeros((*values.shape[:2], target), dtype=np.float32)  # zero pad at the end
    kept = min(target, values.shape[-1])
    out[..., :kept] = np.where(finite[..., :kept], values[..., :kept], 0.0)  # crops the tail beyond target
    return out


def csv_series(header: list[str], rows: list[tuple[int, list[str]]], path: Path,
               value_columns: list[int]) -> np.ndarray:
    """The value cells of a CSV's rows as ``N x 1 x L`` floats, empty cells NaN (a trailing run: a shorter series)."""
    values = np.full((len(rows), 1, len(value_columns)), np.nan, dtype=np.float64)
    for r, (line, row) in enumerate(rows):
        for t, column in enumerate(value_columns):
            cell = row[column].strip()
            if not cell:
                continue
            try:
                values[r, 0, t] = float(cell)
            except ValueError:
                raise DataError(f"{path}: column {header[column]!r} is not numeric (line {line}: {cell!r}); "
                                "a time-series CSV holds one series per row, numbers only") from None
    return values
