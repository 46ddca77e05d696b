"""IDX files (the MNIST / Fashion-MNIST format): header checks, memory-mapped reads, labels behind consent.

An IDX file is a 4-byte magic (two zero bytes, a type code, the number of dimensions), one
big-endian uint32 per dimension, then the values in C order, big-endian. Uncompressed files are
memory-mapped (a 100k-image site costs page cache, not a copy); gzipped ones are decompressed once,
straight into the array. Every problem is one line naming the file and the fix.
"""

from __future__ import annotations

import gzip
import re
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedssl.errors import DataError

TYPE_CODES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
GZIP_MAGIC = b"\x1f\x8b"
# Recognised by `data.kind: auto`: MNIST's own names (train-images-idx3-ubyte[.gz]) and *.idx[.gz].
IDX_NAME = re.compile(r"(idx\d-ubyte|\.idx\d?)(\.gz)?$", re.IGNORECASE)
MAX_DIMS = 8  # far above any image or label file; a larger count means the header is not IDX


@dataclass(frozen=True)
class IdxHeader:
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def offset(self) -> int:
        """Bytes before the first value."""
        return 4 + 4 * len(self.shape)

    @property
    def data_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def looks_like_idx(path: Path) -> bool:
    return bool(IDX_NAME.search(path.name))


def read_idx(path: str | Path) -> np.ndarray:
    """The file's array: a read-only-on-disk memory map for plain files, in memory for .gz.

    The memory map is copy-on-write, so torch can wrap it without a copy and no write ever
    reaches the file.
    """
    path = Path(path)
    if _is_gzip(path):
        array, header = _read_gzip(path)
    else:
        header = _parse_header(_read_prefix(path), path)
        _check_length(path.stat().st_size - header.offset, header, path)
        if header.data_bytes == 0:
            return np.zeros(header.shape, dtype=header.dtype.newbyteorder("="))
        array = np.memmap(path, dtype=header.dtype, mode="c", offset=header.offset, shape=header.shape)
    # Multi-byte types are big-endian on disk; numpy reads them as they are and converts on use.
    return array if header.dtype.itemsize == 1 else array.astype(header.dtype.newbyteorder("="))


def read_idx_header(path: str | Path) -> IdxHeader:
    path = Path(path)
    if _is_gzip(path):
        with _gzip_errors(path), gzip.open(path, "rb") as handle:
            return _parse_header(_read_header_bytes(handle), path)
    return _parse_header(_read_prefix(path), path)


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write ``array`` as IDX (gzipped when the name ends in .gz); for tests, benchmarks and converters."""
    path = Path(path)
    array = np.asarray(array)
    code = next((c for c, dtype in TYPE_CODES.items() if dtype.kind == array.dtype.kind and dtype.itemsize == array.dtype.itemsize), None)
    if code is None:
        raise DataError(f"cannot write {path}: IDX has no type for {array.dtype}; use uint8, int8, int16, int32, float32 or float64")
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    body = np.ascontiguousarray(array, dtype=TYPE_CODES[code]).tobytes()
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "wb") as handle:
        handle.write(header)
        handle.write(body)
    return path


class IdxLabelSource:
    """A label source (fedssl.data.consent) over an IDX label file, for the ids ``row-<i>`` of its images.

    Labels are read one at a time, only when ``ConsentedLabels`` asks for a consented id; an
    unconsented label never becomes a Python value.
    """

    def __init__(self, path: str | Path, sample_ids: tuple[str, ...], images_path: str | Path) -> None:
        self._path = Path(path)
        if not self._path.is_file():
            raise DataError(f"label file {self._path} does not exist; set data.labels to the IDX labels of {images_path}")
        self._labels = read_idx(self._path)
        if self._labels.ndim != 1 or self._labels.dtype.kind not in "iu":
            raise DataError(
                f"{self._path}: a label file must be 1-D integers, got {self._labels.dtype} shaped {self._labels.shape}; "
                "is it the images file?"
            )
        if len(self._labels) != len(sample_ids):
            raise DataError(
                f"{self._path} has {len(self._labels)} labels but {images_path} has {len(sample_ids)} images; "
                "pair the images with their own label file"
            )
        self._row = {sample_id: i for i, sample_id in enumerate(sample_ids)}

    def __call__(self, sample_id: str) -> int:
        if sample_id not in self._row:
            raise DataError(f"no label for sample {sample_id!r} in {self._path}; add it or drop the sample")
        return int(self._labels[self._row[sample_id]])


def _is_gzip(path: Path) -> bool:
    """By content, not name: a renamed .gz is still read."""
    if not path.is_file():
        raise DataError(f"IDX file {path} does not exist; fix the path")
    with path.open("rb") as handle:
        return handle.read(2) == GZIP_MAGIC


def _read_gzip(path: Path) -> tuple[np.ndarray, IdxHeader]:
    """Decompressed straight into the array (no second copy of the bytes)."""
    with _gzip_errors(path), gzip.open(path, "rb") as handle:
        header = _parse_header(_read_header_bytes(handle), path)
        array = np.empty(header.shape, dtype=header.dtype)
        target = memoryview(array.reshape(-1).view(np.uint8))
        filled = 0
        while filled < header.data_bytes and (count := handle.readinto(target[filled:])):
            filled += count
        _check_length(filled + len(handle.read(1 << 16)), header, path)
    return array, header


def _read_header_bytes(handle: gzip.GzipFile) -> bytes:
    head = handle.read(4)
    if len(head) == 4 and 1 <= head[3] <= MAX_DIMS:
        head += handle.read(4 * head[3])
    return head


@contextmanager
def _gzip_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path}: gzip data is damaged or truncated ({error}); download or copy it again") from None


def _read_prefix(path: Path) -> bytes:
    with path.open("rb") as handle:
        return handle.read(4 + 4 * MAX_DIMS)


def _parse_header(prefix: bytes, path: Path) -> IdxHeader:
    if len(prefix) < 4:
        raise DataError(f"{path}: truncated IDX header ({len(prefix)} bytes, needs at least 4); the file is incomplete")
    zero, code, ndim = prefix[:2], prefix[2], prefix[3]
    if zero != b"\0\0":
        raise DataError(f"{path}: bad IDX magic {prefix[:4].hex()} (must start with 0000); this is not an IDX file")
    if code not in TYPE_CODES:
        known = ", ".join(f"0x{c:02x}" for c in TYPE_CODES)
        raise DataError(f"{path}: unknown IDX type code 0x{code:02x} (valid: {known}); this is not an IDX file")
    if not 1 <= ndim <= MAX_DIMS:
        raise DataError(f"{path}: IDX header declares {ndim} dimensions (valid: 1-{MAX_DIMS}); this is not an IDX file")
    if len(prefix) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX header (needs {4 + 4 * ndim} bytes for {ndim} dimensions); the file is incomplete")
    shape = tuple(int.from_bytes(prefix[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return IdxHeader(TYPE_CODES[code], shape)


def _check_length(available: int, header: IdxHeader, path: Path) -> None:
    shape = " x ".join(map(str, header.shape))
    if available < header.data_bytes:
        raise DataError(
            f"{path}: truncated: the header declares {shape} {header.dtype.name} ({header.data_bytes} bytes) "
            f"but only {available} follow; the file is incomplete"
        )
    if available > header.data_bytes:
        raise DataError(
            f"{path}: {available - header.data_bytes} bytes beyond the {shape} {header.dtype.name} the header declares; "
            "the dimensions in the header are wrong or files were concatenated"
        )
