"""What a data source holds, read cheaply and without torch: kind, modality, sample shape, count, labels.

The preflight check (fedssl.preflight) asks this before anything is loaded: an image folder's file
list and its first image's header, a .npy/.npz array header, a CSV's header and first rows. It
reads the source exactly as fedssl.data.loaders will (the kind resolution, the file formats and the
column rules are shared from here), so the shape it reports is the shape the sites will train on.
Values are not checked (a NaN in row 10 000 is the loader's to find).

Labels: the embedded digits carry theirs; any other source has labels only through ``data.labels``
(fedssl.data.labels: an id,label CSV, ``folders``, or an IDX label file of IDX images), and only through
the consent manifest (a CSV source's own label column is dropped at the door). :func:`probe_labels`
opens ``data.labels`` as the evaluation will and counts the source's ids it labels.
"""

from __future__ import annotations

import csv
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedssl.data.idx import looks_like_idx, read_idx_header
from fedssl.data.series import SERIES_SUFFIXES, series_sample_shape
from fedssl.data.text import is_text_source, read_texts
from fedssl.errors import DataError
from fedssl.sample_format import SampleFormat
from fedssl.tables import CategoricalSpec, not_numeric_error, table_layout

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
ID_COLUMN = "id"
LABEL_COLUMNS = frozenset({"label", "target"})
NPZ_INPUT_KEYS = ("x", "inputs")
KINDS_BY_SUFFIX = {".npy": "npy", ".npz": "npz", ".csv": "csv"}
KINDS = ("csv", "digits", "idx", "image_folder", "npy", "npz", "text", "timeseries")  # fedssl.data.loaders.LOADERS (a test holds them equal)
DIGITS = "digits"
DIGITS_SHAPE = (1, 8, 8)  # scikit-learn's digits, as fedssl.data.loaders shapes them
DIGITS_COUNT = 1797
IMAGE_CHANNELS = (1, 3)  # fedssl.data.pixels.CHANNELS: greyscale, RGB
CSV_ROWS_READ = 5  # rows whose cells are checked to be numbers; the rest are only counted


@dataclass(frozen=True)
class DataProbe:
    source: str
    kind: str  # one of KINDS
    modality: str  # "image" | "vector" | "text" | "timeseries"
    sample_shape: tuple[int, ...]  # one sample, as the encoders see it: (C, H, W), (D,) or a series' (C, L)
    count: int  # samples in the whole source (before the test split)
    labelled: bool  # labels exist behind the consent manifest (digits, or data.labels given)
    labelled_count: int | None = None  # how many samples data.labels labels (None: all, or not probed yet)
    labels: str | None = None  # data.labels as given

    def describe_labels(self) -> str:
        """Where the evaluation's labels come from, for ``fedssl check``."""
        if self.kind == DIGITS:
            return "labels built in"
        if not self.labelled or self.labels is None:
            return "no labels"
        count = self.count if self.labelled_count is None else self.labelled_count
        return f"data.labels {self.labels} labels {count} of them"

    def sample_id(self, index: int) -> str:
        """The id fedssl.data.loaders gives row ``index`` of a source without ids of its own (digits, IDX, arrays)."""
        return digits_id(index) if self.kind == DIGITS else row_id(index)

    def sample_ids(self) -> list[str]:
        """Every sample's id, as fedssl.data.loaders names them: what a consent manifest and data.labels list."""
        return source_ids(Path(self.source), self.kind, self.count) if self.kind != DIGITS else [digits_id(i) for i in range(self.count)]

    def describe(self) -> str:
        noun = "time series" if self.modality == "timeseries" else f"{self.modality}s"
        return f"{self.count} {noun} shaped {list(self.sample_shape)}"


def row_id(index: int) -> str:
    """A row's sample id in a source without ids of its own (arrays, IDX, a CSV without an id column)."""
    return f"row-{index}"


def digits_id(index: int) -> str:
    return f"digits-{index}"


def is_digits(source: str | Path | None, kind: str) -> bool:
    """The embedded set: kind digits, or the bare name "digits" when no file or folder of that name exists."""
    return kind == DIGITS or (kind == "auto" and str(source) == DIGITS and not Path(DIGITS).exists())


def existing_path(path: str | Path | None) -> Path:
    if path is None or not Path(path).exists():
        raise DataError(
            f"data dir {path} does not exist; set site.data_dir (or data.source) to an existing image folder, "
            ".npy, .npz, .csv or IDX file"
        )
    return Path(path)


def resolve_kind(path: Path, kind: str) -> str:
    """The loader a path needs: ``kind`` itself, or for "auto" a directory's or the suffix's."""
    if kind != "auto":
        return kind
    if is_text_source(path):  # a .txt file, or a folder of .txt files and no images
        return "text"
    if path.is_dir():
        return "image_folder"
    if looks_like_idx(path):
        return "idx"
    if path.suffix.lower() not in KINDS_BY_SUFFIX:
        raise DataError(
            f"cannot tell the data kind of {path} from its suffix; use a directory of images, .npy, .npz, .csv "
            f"or IDX (*-idx3-ubyte[.gz], *.idx[.gz]), or set the kind explicitly ({', '.join(KINDS)})"
        )
    return KINDS_BY_SUFFIX[path.suffix.lower()]


def image_files(root: Path) -> list[Path]:
    """An image folder's images, sorted (their relative paths are the sample ids)."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def probe_data(source: str, kind: str = "auto", options: SampleFormat | None = None, *,
               labels: str | None = None) -> DataProbe:
    """What ``source`` holds, from headers only; a DataError (one line) when it cannot be read as data.

    ``options`` are the config's reading keys (fedssl.sample_format), read as the loaders read them:
    image folders and IDX images are resized to ``image_size`` at load, so that is the shape the sites
    train on; ``series_length`` fits time series (0: the source's own length); ``max_length`` is a text
    sample's length; a CSV's categorical columns each add their one-hot block to the width. ``labels`` is
    ``data.labels`` (:func:`probe_labels` checks it)."""
    if kind != "auto" and kind not in KINDS:
        raise DataError(f"unknown data kind {kind!r}; valid choices: auto, {', '.join(KINDS)}")
    options = SampleFormat() if options is None else options
    if is_digits(source, kind):
        return DataProbe(DIGITS, DIGITS, "image", DIGITS_SHAPE, DIGITS_COUNT, labelled=True)
    path = existing_path(source)
    resolved = resolve_kind(path, kind)
    check_format_fits(path, resolved, options)
    if resolved == "text":
        modality, shape, count = "text", (options.max_length,), _count_texts(path)
    elif resolved == "timeseries":
        modality, (shape, count) = "timeseries", _probe_series(path, options.series_length)
    else:
        shape, count = _probe_csv(path, options.categorical_spec) if resolved == "csv" else _PROBES[resolved](path)
        if options.image_hw is not None and len(shape) == 3 and resolved in ("image_folder", "idx"):
            shape = (shape[0], *options.image_hw)
        modality = "image" if len(shape) == 3 else "vector"
    return DataProbe(str(source), resolved, modality, shape, count, labelled=labels is not None, labels=labels)


def check_format_fits(path: Path, kind: str, options: SampleFormat) -> None:
    """A DataError unless ``options`` suit a source of (resolved) ``kind``: categorical columns need a CSV."""
    if kind != "csv" and options.categorical_spec.columns:
        raise DataError(f"{path} is {kind} data, not a CSV; data.categorical / data.categories apply to CSV sources only")


def _count_texts(path: Path) -> int:
    try:
        return len(read_texts(path))
    except ValueError as err:
        raise DataError(str(err)) from None


def _probe_image_folder(root: Path) -> tuple[tuple[int, ...], int]:
    from PIL import Image, UnidentifiedImageError  # reads the header only; the pixels stay on disk

    if not root.is_dir():
        raise DataError(f"{root} is not a directory; kind image_folder needs a folder of PNG/JPEG files")
    files = image_files(root)
    if not files:
        raise DataError(f"{root} holds no .png/.jpg/.jpeg files (searched recursively); add images or fix the path")
    try:
        with Image.open(files[0]) as first:
            width, height = first.size
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"cannot read image {files[0]} ({error}); remove or replace the file") from error
    # The loaders read image folders in grayscale at the first image's size (fedssl.experiment.central_data).
    return (1, height, width), len(files)


def _probe_series(path: Path, series_length: int) -> tuple[tuple[int, ...], int]:
    """fedssl.data.series' rule: (channels, series_length or the source's own length), from headers only."""
    suffix = path.suffix.lower()
    if suffix not in SERIES_SUFFIXES:
        raise DataError(f"{path}: a time-series source is a .npy, .npz or .csv file (fedssl.data.series); convert it")
    if suffix == ".csv":
        (steps,), count = _probe_csv(path, CategoricalSpec())
        return (1, series_length or steps), count
    shape, dtype = _npy_file_header(path) if suffix == ".npy" else _npz_header(path)
    if dtype.kind not in "biuf":
        raise DataError(f"{path}: array dtype {dtype} is not numeric; store numbers only")
    return series_sample_shape(shape, path, series_length), shape[0]


def _probe_npy(path: Path) -> tuple[tuple[int, ...], int]:
    return _sample_shape(*_npy_file_header(path), path)


def _npy_file_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    try:
        with path.open("rb") as handle:
            return _npy_header(handle, path)
    except OSError as error:
        raise DataError(f"cannot read {path} as numpy data ({error}); re-save it with numpy.save/savez") from error


def _probe_npz(path: Path) -> tuple[tuple[int, ...], int]:
    return _sample_shape(*_npz_header(path), path)


def _npz_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    try:
        with zipfile.ZipFile(path) as archive:
            names = [name.removesuffix(".npy") for name in archive.namelist()]
            key = next((k for k in NPZ_INPUT_KEYS if k in names), None)
            if key is None:
                raise DataError(f"{path} has keys {names}; store the inputs under 'x' or 'inputs'")
            with archive.open(f"{key}.npy") as handle:
                return _npy_header(handle, path)
    except (OSError, zipfile.BadZipFile) as error:
        raise DataError(f"cannot read {path} as an .npz archive ({error}); re-save it with numpy.savez") from error


def _npy_header(handle, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    try:
        version = np.lib.format.read_magic(handle)
        shape, _, dtype = (np.lib.format.read_array_header_1_0(handle) if version == (1, 0)
                           else np.lib.format.read_array_header_2_0(handle))
    except ValueError as error:
        raise DataError(f"cannot read {path} as numpy data ({error}); re-save it with numpy.save/savez") from error
    return tuple(shape), dtype


def _sample_shape(shape: tuple[int, ...], dtype: np.dtype, path: Path) -> tuple[tuple[int, ...], int]:
    """The loaders' rule: N x D vectors, N x H x W (one channel) or N x C x H x W images."""
    if dtype.kind not in "biuf":
        raise DataError(f"{path}: array dtype {dtype} is not numeric; store numbers only")
    if len(shape) == 2:
        return (shape[1],), shape[0]
    if len(shape) == 3:
        return (1, shape[1], shape[2]), shape[0]
    if len(shape) == 4:
        return tuple(shape[1:]), shape[0]
    raise DataError(f"{path}: array shape {shape} is not N x D (vectors), N x H x W or N x C x H x W (images); reshape it")


def csv_feature_columns(header: list[str]) -> list[int]:
    """Indices of a CSV's feature columns: every column but the id and any label column."""
    lowered = [name.strip().lower() for name in header]
    return [i for i, name in enumerate(lowered) if name != ID_COLUMN and name not in LABEL_COLUMNS]


def _probe_csv(path: Path, spec: CategoricalSpec) -> tuple[tuple[int, ...], int]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = (row for row in csv.reader(handle) if any(cell.strip() for cell in row))
            header = next(rows, None)
            if header is None:
                raise DataError(f"{path} is empty; it needs a header row and at least one data row")
            features = csv_feature_columns(header)
            if not features:
                raise DataError(f"{path}: no feature columns besides id/label; add numeric feature columns")
            layout = table_layout(header, features, spec, path)
            count = 0
            for count, row in enumerate(rows, start=1):
                if count <= CSV_ROWS_READ:
                    _check_csv_row(row, header, layout.numeric, path)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"cannot read {path} as UTF-8 CSV ({error}); re-export it as plain CSV") from error
    if count == 0:
        raise DataError(f"{path} has a header but no data rows; add samples")
    return (layout.width,), count


def _check_csv_row(row: list[str], header: list[str], numeric: tuple[int, ...], path: Path) -> None:
    if len(row) != len(header):
        raise DataError(f"{path}: a row has {len(row)} cells but the header has {len(header)}; fix the row")
    for i in numeric:  # categorical cells are anything: their slots are fixed by the spec, not by the cell
        if not row[i].strip():
            continue  # an empty cell: the loader imputes 0 and counts it
        try:
            float(row[i])
        except ValueError:
            raise not_numeric_error(path, header[i], "", row[i]) from None


def _probe_idx(path: Path) -> tuple[tuple[int, ...], int]:
    """fedssl.data.loaders' IDX rule: N x D vectors, N x H x W greyscale, N x H x W x C or N x C x H x W images."""
    shape = read_idx_header(path).shape
    if len(shape) == 1:
        raise DataError(f"{path} is 1-D ({shape[0]} values), a label file; set data.source to the images file and data.labels to this one")
    if len(shape) == 2:
        return (shape[1],), shape[0]
    if len(shape) == 3:
        return (1, shape[1], shape[2]), shape[0]
    if len(shape) == 4 and shape[3] in IMAGE_CHANNELS:
        return (shape[3], shape[1], shape[2]), shape[0]
    if len(shape) == 4 and shape[1] in IMAGE_CHANNELS:
        return tuple(shape[1:]), shape[0]
    raise DataError(f"{path}: images shaped {shape} are not N x H x W (greyscale) or N x H x W x C / N x C x H x W "
                    "with C = 1 or 3; convert the file")


def source_ids(path: Path, kind: str, count: int) -> list[str]:
    """The loaders' sample ids (fedssl.data.loaders): an image folder's relative paths, a text folder's
    file names, a CSV's id column, an .npz's ``ids``; ``row-i`` otherwise."""
    if kind == "image_folder":
        return [p.relative_to(path).as_posix() for p in image_files(path)]
    if kind == "text" and path.is_dir():
        names = [p.name for p in sorted(path.glob("*.txt"))]
        return names if len(names) == count else [row_id(i) for i in range(count)]  # blank documents skipped
    suffix = path.suffix.lower()
    if kind == "csv" or (kind == "timeseries" and suffix == ".csv"):
        return _csv_ids(path) or [row_id(i) for i in range(count)]
    if kind == "npz" or (kind == "timeseries" and suffix == ".npz"):
        with np.load(path, allow_pickle=False) as archive:
            if "ids" in archive.files:
                return [str(i) for i in archive["ids"].tolist()]
    return [row_id(i) for i in range(count)]


def _csv_ids(path: Path) -> list[str] | None:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        rows = (row for row in csv.reader(handle) if any(cell.strip() for cell in row))
        lowered = [name.strip().lower() for name in next(rows, [])]
        if ID_COLUMN not in lowered:
            return None
        index = lowered.index(ID_COLUMN)
        return [row[index].strip() for row in rows]


def probe_labels(labels: str, probe: DataProbe) -> int:
    """How many of the source's samples ``data.labels`` labels; a DataError (one line, naming data.labels) when
    it cannot be opened against the source as the evaluation will (fedssl.data.labels.open_labels). Reads ids only."""
    from fedssl.data.labels import label_format, open_labels

    if label_format(labels) == "idx":
        if probe.kind != "idx":
            raise DataError(f"data.labels: {labels} is read as an IDX label file, which pairs with IDX images, but "
                            f"data.source is {probe.kind}; give an id,label CSV (ids: the source's sample ids)")
        probe_idx_labels(labels, probe.count)
        return probe.count
    if label_format(labels) == "folders" and probe.kind != "image_folder":
        raise DataError(f"data.labels: folders labels an image folder's images, but data.source is {probe.kind}; "
                        "give an id,label CSV (ids: the source's sample ids)")
    return len(open_labels(labels, probe.sample_ids(), probe.source).ids)


def probe_idx_labels(labels: str, count: int) -> None:
    """A DataError (one line) unless ``labels`` is an IDX file of one label per image (``count``)."""
    path = Path(labels)
    if not path.is_file():
        raise DataError(f"{path} does not exist; set it to the IDX label file of data.source, or null")
    shape = read_idx_header(path).shape
    if len(shape) != 1 or shape[0] != count:
        raise DataError(f"{path} is shaped {list(shape)}, not one label per image ({count}); pair data.source with its own label file")


_PROBES = {"idx": _probe_idx, "image_folder": _probe_image_folder, "npy": _probe_npy, "npz": _probe_npz}  # csv: _probe_csv
