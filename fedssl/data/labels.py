"""``data.labels`` opened against ``data.source``: which sample ids carry a label, and one label read per consented id.

Three forms, told apart by the value (:func:`label_format`):

- an ``id,label`` CSV (any data kind): ids are the source's own sample ids (``row-i`` for the lines of a
  .txt file, arrays and CSVs without an id column; an image folder's relative paths; a CSV's id column);
  labels are integers or class names;
- ``folders`` (image folders): an image's label is its first folder, ``cat/001.png`` -> ``cat``;
- an IDX label file (IDX images): row i labels image i.

Class names become integers in sorted-name order. The names are taken from the consented ids' labels
only, so a class that only unconsented samples hold shapes nothing, not even the numbering. Every
label still reaches the evaluation only through ``ConsentedLabels``. Torch-free: the preflight probe
(fedssl.data.probe) opens the same tables to check them.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedssl.config import LABEL_FOLDERS as FOLDERS
from fedssl.config import label_format
from fedssl.data.consent import CsvLabelSource, LabelSource
from fedssl.errors import DataError

KEY = "data.labels"


@dataclass(frozen=True)
class LabelTable:
    """The labelled ids of a source (ids only: nothing about a label) and a reader of one id's label."""

    ids: frozenset[str]
    read: Callable[[str], int | str]


def open_labels(labels: str, sample_ids: Sequence[str], source: str) -> LabelTable:
    """``data.labels`` against the source's ids; a DataError naming ``data.labels`` and the fix when they do not fit."""
    fmt = label_format(labels)
    try:
        if fmt == FOLDERS:
            return _folder_table(sample_ids, source)
        if fmt == "csv":
            return _csv_table(Path(labels), sample_ids, source)
        from fedssl.data.idx import IdxLabelSource

        return LabelTable(frozenset(sample_ids), IdxLabelSource(labels, tuple(sample_ids), source))
    except DataError as err:
        message = str(err)
        raise DataError(message if message.startswith(KEY) else f"{KEY}: {message}") from None


def folder_label(sample_id: str) -> str | None:
    """An image folder id's class: its first path component (None for an image at the top level)."""
    head, sep, _ = sample_id.partition("/")
    return head if sep else None


def _folder_table(sample_ids: Sequence[str], source: str) -> LabelTable:
    ids = frozenset(i for i in sample_ids if folder_label(i) is not None)
    if not ids:
        raise DataError(f"{KEY}: folders, but no sample of {source} is inside a class folder; put the images in "
                        "<class>/ subfolders of data.source, or give an id,label CSV")
    return LabelTable(ids, lambda sample_id: folder_label(sample_id) or "")


def _csv_table(path: Path, sample_ids: Sequence[str], source: str) -> LabelTable:
    table = CsvLabelSource(path, "id", "label")
    check_label_ids(table.ids, sample_ids, path, source)
    return LabelTable(table.ids, table.cell)


def check_label_ids(label_ids: Collection[str], sample_ids: Sequence[str], path: Path, source: str) -> int:
    """How many of the source's ids have a label; a DataError for an empty table or an id the source lacks."""
    if not label_ids:
        raise DataError(f"{KEY}: {path} has a header but no rows; add one 'id,label' row per labelled sample")
    known = set(sample_ids)
    unknown = sorted(i for i in label_ids if i not in known)
    if unknown:
        example = sample_ids[0] if sample_ids else "?"
        raise DataError(f"{KEY}: {len(unknown)} of {len(label_ids)} ids in {path} are not sample ids of {source} "
                        f"(e.g. {unknown[0]!r}; its ids look like {example!r}); use the source's own ids")
    return len(label_ids)


def class_indexed(table: LabelTable, consented_ids: Sequence[str]) -> tuple[LabelSource, tuple[str, ...] | None]:
    """A label source of integers over the consented ids, and the class names (None: the labels were integers).

    Reads each consented id's label once, here; no other id's. Integer labels stay as written; if any
    label is a name, the consented labels' sorted distinct values become classes 0, 1, ...
    """
    missing = next((i for i in consented_ids if i not in table.ids), None)
    if missing is not None:
        raise DataError(f"{KEY}: consented sample {missing!r} has no label; add its row or withdraw its consent")
    values = {sample_id: table.read(sample_id) for sample_id in consented_ids}
    as_ints = {sample_id: _as_int(value) for sample_id, value in values.items()}
    if all(v is not None for v in as_ints.values()):
        return _reader(as_ints), None
    names = tuple(sorted({str(v) for v in values.values()}))
    index = {name: i for i, name in enumerate(names)}
    return _reader({sample_id: index[str(v)] for sample_id, v in values.items()}), names


def _as_int(value: int | str) -> int | None:
    if isinstance(value, int):
        return value
    try:
        return int(value)
    except ValueError:
        return None


def _reader(labels: dict[str, int | None]) -> LabelSource:
    def read(sample_id: str) -> int:
        if sample_id not in labels:  # ConsentedLabels asks for consented ids only: these
            raise DataError(f"{KEY}: no label for sample {sample_id!r}; add its row or withdraw its consent")
        return int(labels[sample_id])  # type: ignore[arg-type]

    return read
