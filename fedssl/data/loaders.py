"""Read a site's data from disk (or the embedded digits set) into a ``SiteDataset``.

Every loader returns inputs and sample ids only. Label-like CSV columns are dropped here,
at the door, so site training never sees them.
"""

from __future__ import annotations

import csv
import functools
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fedssl.data.dataset import SiteDataset
from fedssl.data.idx import read_idx
from fedssl.data.pixels import fit_images, to_nchw
from fedssl.data.series import SERIES_SUFFIXES, as_series_array, csv_series, fit_length
from fedssl.data.text import encode_all, read_texts
# Formats and kind resolution are shared with the torch-free probe, so preflight reads sources as these loaders do.
from fedssl.data.probe import (
    ID_COLUMN, LABEL_COLUMNS, NPZ_INPUT_KEYS, check_format_fits, csv_feature_columns, digits_id, existing_path,
    image_files, is_digits, resolve_kind, row_id,
)
from fedssl.errors import DataError
from fedssl.sample_format import SampleFormat
from fedssl.tables import MISSING, OTHER, CategoricalSpec, TableLayout, not_numeric_error, table_layout

DIGITS_MAX_VALUE = 16.0  # sklearn's digits pixels are counts 0..16


class LabelColumnDroppedWarning(UserWarning):
    """A CSV carried a label column; it was discarded because site training never sees labels."""


class MissingValuesImputedWarning(UserWarning):
    """A CSV had empty feature cells; they were set to 0 (categorical: to 'missing') and counted."""


class UnknownCategoryWarning(UserWarning):
    """A categorical CSV cell held a value data.categories does not list; it was set to 'other' and counted."""


class _Loaded(NamedTuple):
    inputs: np.ndarray
    sample_ids: tuple[str, ...]
    modality: str
    pixels: bool = False  # uint8 images kept as they are (possibly memory-mapped), scaled per batch
    blocks: tuple[int, ...] = ()  # tables: the one-hot block sizes at the end of each row (fedssl.tables)


_Loader = Callable[[Path, SampleFormat], _Loaded]  # digits ignores the path


def load_site_data(path: str | Path | None, kind: str = "auto", options: SampleFormat | None = None, *,
                   grayscale: bool = True) -> SiteDataset:
    """Load one site's unlabelled data, its samples read as ``options`` says (the config's ``data:`` keys).

    ``kind`` is one of ``LOADERS`` or "auto" (a directory is an image folder, otherwise the
    file suffix decides; the bare name "digits", matching ``data.source: digits``, means the
    embedded set unless a file or folder of that name exists; MNIST-style names such as
    train-images-idx3-ubyte.gz mean IDX). ``options`` (default: every key's default) is checked here
    too; its ``image_size`` affects image folders and IDX images (resized and centre-cropped once, here),
    ``max_length`` text, the categorical keys CSVs (fedssl.tables) and ``series_length`` time series (kind
    "timeseries", never auto-detected: fedssl.data.series has the layouts and the length rule).
    ``grayscale=False`` reads an image folder as RGB; no config sets it (the probe reports greyscale).
    ``path`` is ignored for "digits".
    """
    if kind != "auto" and kind not in LOADERS:
        raise ValueError(f"unknown data kind {kind!r}; valid choices: auto, {_valid_kinds()}")
    options = SampleFormat() if options is None else options
    options.validate()
    if is_digits(path, kind):
        return _to_dataset(_load_digits(None, options), "digits")
    path = existing_path(path)
    resolved = resolve_kind(path, kind)
    check_format_fits(path, resolved, options)
    loader = functools.partial(_load_image_folder, grayscale=grayscale) if resolved == "image_folder" else LOADERS[resolved]
    return _to_dataset(loader(path, options), str(path))


def load_digits_labeled() -> tuple[SiteDataset, np.ndarray]:
    """The embedded digits with integer labels; for simulation and central evaluation only."""
    loaded, labels = _digits()
    return _to_dataset(loaded, "digits"), labels


def _to_dataset(loaded: _Loaded, source: str) -> SiteDataset:
    if loaded.pixels:
        inputs = torch.from_numpy(loaded.inputs)  # no copy: a memory map stays one
    else:
        inputs = torch.from_numpy(np.ascontiguousarray(loaded.inputs, dtype=np.float32))
    try:
        return SiteDataset(
            inputs=inputs,
            sample_ids=loaded.sample_ids,
            modality=loaded.modality,
            feature_blocks=loaded.blocks,
        )
    except DataError as error:
        raise DataError(f"{source}: {error}") from error


def _valid_kinds() -> str:
    return ", ".join(sorted(LOADERS))


# --- image folder -------------------------------------------------------------------------


def _load_image_folder(root: Path, options: SampleFormat, grayscale: bool = True) -> _Loaded:
    if not root.is_dir():
        raise DataError(f"{root} is not a directory; kind image_folder needs a folder of PNG/JPEG files")
    files = image_files(root)
    if not files:
        raise DataError(f"{root} holds no .png/.jpg/.jpeg files (searched recursively); add images or fix the path")
    mode = "L" if grayscale else "RGB"
    first = _open_image(files[0], mode)
    height, width = options.image_hw or (first.height, first.width)
    # Sorted relative paths make the ids, and so the row order, identical on every run.
    arrays = [_image_array(_open_image(f, mode), height, width) for f in files]
    ids = tuple(f.relative_to(root).as_posix() for f in files)
    return _Loaded(np.stack(arrays), ids, "image")


def _open_image(path: Path, mode: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"cannot read image {path} ({error}); remove or replace the file") from error


def _image_array(image: Image.Image, height: int, width: int) -> np.ndarray:
    """C x H x W float array scaled to [0, 1]."""
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


# --- numpy ----------------------------------------------------------------------------------


def _load_text(path: Path, options: SampleFormat) -> _Loaded:
    """A .txt file (a sample per line, ids ``line-i``) or a folder of .txt files (ids: file names), as byte ids."""
    try:
        texts = read_texts(path)
    except ValueError as err:
        raise DataError(str(err)) from None
    ids = tuple(p.name for p in sorted(path.glob("*.txt"))) if path.is_dir() else _row_ids(len(texts))
    if len(ids) != len(texts):  # a blank document was skipped: name the rest by position
        ids = _row_ids(len(texts))
    return _Loaded(np.asarray(encode_all(texts, options.max_length), dtype=np.float32), ids, "text")


def _load_npy(path: Path, _: SampleFormat) -> _Loaded:
    return _from_array(*_npy_array(path), path)


def _load_npz(path: Path, _: SampleFormat) -> _Loaded:
    return _from_array(*_npz_array(path), path)


def _npy_array(path: Path) -> tuple[np.ndarray, tuple[str, ...]]:
    array = _read_numpy(path)
    if not isinstance(array, np.ndarray):
        raise DataError(f"{path} holds an .npz archive, not a single array; use kind npz")
    return array, _row_ids(len(array))


def _npz_array(path: Path) -> tuple[np.ndarray, tuple[str, ...]]:
    archive = _read_numpy(path)
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path} holds a single array, not an .npz archive; use kind npy")
    with archive:
        key = next((k for k in NPZ_INPUT_KEYS if k in archive.files), None)
        if key is None:
            raise DataError(f"{path} has keys {archive.files}; store the inputs under 'x' or 'inputs'")
        array = archive[key]
        ids = _npz_ids(archive, path) if "ids" in archive.files else _row_ids(len(array))
    return array, ids


def _row_ids(count: int) -> tuple[str, ...]:
    return tuple(row_id(i) for i in range(count))


def _read_numpy(path: Path) -> np.ndarray | np.lib.npyio.NpzFile:
    try:
        # allow_pickle=False: a data file must never be able to run code on the site.
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise DataError(f"cannot read {path} as numpy data ({error}); re-save it with numpy.save/savez") from error


def _npz_ids(archive: np.lib.npyio.NpzFile, path: Path) -> tuple[str, ...]:
    ids = archive["ids"]
    if ids.ndim != 1 or ids.dtype.kind not in "USi":
        raise DataError(f"{path}: 'ids' must be a 1-D array of strings or integers, got {ids.dtype} {ids.shape}")
    return tuple(str(i) for i in ids.tolist())


def _from_array(array: np.ndarray, ids: tuple[str, ...], path: Path) -> _Loaded:
    """Decide the modality from the array rank: N x D vectors, N x H x W or N x C x H x W images."""
    if array.dtype.kind not in "biuf":
        raise DataError(f"{path}: array dtype {array.dtype} is not numeric; store numbers only")
    if array.ndim == 2:
        return _Loaded(array, ids, "vector")
    if array.ndim == 3:
        return _Loaded(array[:, None], ids, "image")
    if array.ndim == 4:
        return _Loaded(array, ids, "image")
    raise DataError(
        f"{path}: array shape {array.shape} is not N x D (vectors), N x H x W or N x C x H x W (images); reshape it"
    )


# --- time series ----------------------------------------------------------------------------


def _load_timeseries(path: Path, options: SampleFormat) -> _Loaded:
    """``N x L`` / ``N x C x L`` arrays or a CSV of one series per row, fitted to ``series_length`` steps."""
    suffix = path.suffix.lower()
    if suffix not in SERIES_SUFFIXES:
        raise DataError(f"{path}: a time-series source is a .npy, .npz or .csv file (fedssl.data.series); convert it")
    if suffix == ".csv":
        header, rows = _read_csv(path)
        lowered = [name.strip().lower() for name in header]
        _warn_dropped_labels(header, lowered, path)
        columns = csv_feature_columns(header)
        if not columns:
            raise DataError(f"{path}: no time-step columns besides id/label; add one column per time step")
        series = csv_series(header, rows, path, columns)
        ids = (tuple(row[lowered.index(ID_COLUMN)].strip() for _, row in rows) if ID_COLUMN in lowered
               else _row_ids(len(rows)))
    else:
        array, ids = _npy_array(path) if suffix == ".npy" else _npz_array(path)
        series = as_series_array(array, path)
    return _Loaded(fit_length(series, options.series_length, path, ids), ids, "timeseries")


# --- idx ------------------------------------------------------------------------------------


def _load_idx(path: Path, options: SampleFormat) -> _Loaded:
    """N x H x W (greyscale) or N x H x W x C images, or N x D vectors; uint8 images stay uint8."""
    array = read_idx(path)
    if array.ndim == 1:
        raise DataError(
            f"{path} is 1-D ({len(array)} values), a label file; set data.source to the images file and data.labels to this one"
        )
    if array.ndim == 2:
        return _Loaded(array, _row_ids(len(array)), "vector")
    images = fit_images(to_nchw(array, path), options.image_hw)
    return _Loaded(images, _row_ids(len(images)), "image", pixels=images.dtype == np.uint8)


# --- csv ------------------------------------------------------------------------------------


def _load_csv(path: Path, options: SampleFormat) -> _Loaded:
    header, rows = _read_csv(path)
    lowered = [name.strip().lower() for name in header]
    id_index = lowered.index(ID_COLUMN) if ID_COLUMN in lowered else None
    _warn_dropped_labels(header, lowered, path)
    features = csv_feature_columns(header)
    if not features:
        raise DataError(f"{path}: no feature columns besides id/label; add numeric feature columns")
    spec = options.categorical_spec
    layout = table_layout(header, features, spec, path)
    cells = [[_csv_number(row, i, header, line, path) for i in layout.numeric] for line, row in rows]
    values = _impute_missing(cells, [header[i] for i in layout.numeric], path)
    if layout.categorical:
        values = np.concatenate([values, _one_hot(rows, header, layout, spec, path)], axis=1)
    ids = tuple(row[id_index].strip() for _, row in rows) if id_index is not None else _row_ids(len(rows))
    return _Loaded(values, ids, "vector", blocks=layout.blocks)


def _one_hot(rows: list[tuple[int, list[str]]], header: list[str], layout: TableLayout, spec: CategoricalSpec,
             path: Path) -> np.ndarray:
    """The categorical columns' one-hot blocks (fedssl.tables); 'missing' and 'other' cells counted in warnings."""
    out = np.zeros((len(rows), sum(layout.blocks)))
    counts: dict[str, dict[str, int]] = {MISSING: {}, OTHER: {}}
    start = 0
    for index, size in zip(layout.categorical, layout.blocks):
        name = header[index].strip()
        for r, (_, row) in enumerate(rows):
            slot, note = spec.slot(name, row[index].strip())
            out[r, start + slot] = 1.0
            if note is not None:
                counts[note][name] = counts[note].get(name, 0) + 1
        start += size
    if counts[MISSING]:
        warnings.warn(f"{path}: set empty categorical cells to '{MISSING}' {counts[MISSING]} (column: count)",
                      MissingValuesImputedWarning, stacklevel=4)
    if counts[OTHER]:
        warnings.warn(f"{path}: values not in data.categories set to '{OTHER}' {counts[OTHER]} (column: count)",
                      UnknownCategoryWarning, stacklevel=4)
    return out


def _warn_dropped_labels(header: list[str], lowered: list[str], path: Path) -> None:
    dropped = [header[i] for i, name in enumerate(lowered) if name in LABEL_COLUMNS]
    if dropped:
        warnings.warn(
            f"{path}: dropped label column(s) {dropped}; site training never sees labels "
            "(keep labels in a separate file behind the consent manifest)",
            LabelColumnDroppedWarning,
            stacklevel=4,  # point at the caller of load_site_data
        )


def _read_csv(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (line number, cells) for each non-blank row."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            lines = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"cannot read {path} as UTF-8 CSV ({error}); re-export it as plain CSV") from error
    numbered = [(n, row) for n, row in enumerate(lines, start=1) if any(cell.strip() for cell in row)]
    if not numbered:
        raise DataError(f"{path} is empty; it needs a header row and at least one data row")
    (_, header), rows = numbered[0], numbered[1:]
    if not rows:
        raise DataError(f"{path} has a header but no data rows; add samples")
    for line, row in rows:
        if len(row) != len(header):
            raise DataError(f"{path} line {line}: {len(row)} cells but the header has {len(header)}; fix the row")
    return header, rows


def _impute_missing(cells: list[list[float | None]], names: list[str], path: Path) -> np.ndarray:
    """Empty cells become 0, counted per column in one warning.

    No missing-indicator columns: an indicator only where this site's data has gaps would make the
    encoder's input width depend on the site's data (and differ between sites); the width stays the
    number of feature columns, which the header fixes.
    """
    missing = {name: sum(row[j] is None for row in cells) for j, name in enumerate(names)}
    missing = {name: count for name, count in missing.items() if count}
    if missing:
        warnings.warn(f"{path}: imputed 0 for empty cells {missing} (column: count)", MissingValuesImputedWarning,
                      stacklevel=4)
    return np.array([[0.0 if v is None else v for v in row] for row in cells])


def _csv_number(row: list[str], index: int, header: list[str], line: int, path: Path) -> float | None:
    """The cell as a number; None for an empty cell (imputed by _impute_missing)."""
    cell = row[index].strip()
    if not cell:
        return None
    try:
        return float(cell)
    except ValueError:
        raise not_numeric_error(path, header[index], f"line {line}: ", cell) from None


# --- digits ---------------------------------------------------------------------------------


def _digits() -> tuple[_Loaded, np.ndarray]:
    from sklearn.datasets import load_digits  # imported lazily: sklearn is slow to import

    digits = load_digits()
    images = digits.images[:, None] / DIGITS_MAX_VALUE  # N x 1 x 8 x 8 in [0, 1]
    ids = tuple(digits_id(i) for i in range(len(images)))
    return _Loaded(images, ids, "image"), digits.target.astype(np.int64)


def _load_digits(_: Path | None, __: SampleFormat) -> _Loaded:
    return _digits()[0]


LOADERS: dict[str, _Loader] = {
    "image_folder": _load_image_folder,
    "npy": _load_npy,
    "npz": _load_npz,
    "csv": _load_csv,
    "digits": _load_digits,
    "idx": _load_idx,
    "text": _load_text,
    "timeseries": _load_timeseries,
}
