"""Labels behind consent: a manifest of consented sample ids and the only door to labels.

Evaluation reads labels through ``ConsentedLabels``, which checks every requested id
against the manifest before it calls the label source at all. The label source is called
once per consented id and never for any other, so an unconsented label is never read.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import yaml

from fedssl.errors import ConfigError, ConsentError, DataError

LabelSource = Callable[[str], int]  # reads ONE label by sample id
MANIFEST_KEY = "consented_ids"
_STRUCTURED_SUFFIXES = {".json": "json", ".yaml": "yaml", ".yml": "yaml"}


@dataclass(frozen=True)
class ConsentManifest:
    """The sample ids whose owners consented to their labels being used for evaluation."""

    ids: frozenset[str]

    def __contains__(self, sample_id: object) -> bool:
        return sample_id in self.ids

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def load(cls, path: str | Path) -> ConsentManifest:
        """Read a text file (one id a line, ``#`` comments) or JSON/YAML with key ``consented_ids``."""
        path = Path(path)
        if not path.is_file():
            raise DataError(
                f"consent manifest {path} does not exist; set evaluation.consent_manifest to an existing file"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise DataError(f"cannot read consent manifest {path} ({error}); save it as UTF-8 text") from error
        fmt = _STRUCTURED_SUFFIXES.get(path.suffix.lower())
        ids = _parse_structured(text, fmt, path) if fmt else _parse_lines(text)
        return cls(frozenset(ids))

    def save(self, path: str | Path) -> None:
        """Write in the format the suffix names (.json, .yaml/.yml, anything else: text), sorted."""
        path = Path(path)
        ids = sorted(self.ids)
        fmt = _STRUCTURED_SUFFIXES.get(path.suffix.lower())
        if fmt == "json":
            text = json.dumps({MANIFEST_KEY: ids}, indent=2) + "\n"
        elif fmt == "yaml":
            text = yaml.safe_dump({MANIFEST_KEY: ids}, sort_keys=False)
        else:
            text = "# sample ids consented for label use, one per line\n" + "".join(f"{i}\n" for i in ids)
        _write_atomically(path, text)


class ConsentedLabels:
    """Reads labels only for sample ids in the consent manifest."""

    def __init__(self, manifest: ConsentManifest, label_source: LabelSource,
                 class_names: tuple[str, ...] | None = None) -> None:
        self._manifest = manifest
        self._read_label = label_source
        # Class i's name where the labels were names (fedssl.data.labels); None for integer labels.
        self.class_names = class_names

    @property
    def manifest(self) -> ConsentManifest:
        return self._manifest

    def consented_ids(self, candidate_ids: Iterable[str]) -> list[str]:
        """The candidates that are consented, in their original order."""
        return [sample_id for sample_id in candidate_ids if sample_id in self._manifest]

    def labels_for(self, ids: Iterable[str]) -> np.ndarray:
        """Integer labels for ``ids``; raises ``ConsentError`` before reading anything if any is unconsented."""
        requested = list(ids)
        unconsented = next((i for i in requested if i not in self._manifest), None)
        if unconsented is not None:
            raise ConsentError(
                f"sample {unconsented!r} has no label consent; drop it from the labelled subset "
                "or add it to the consent manifest"
            )
        return np.array([self._read_label(i) for i in requested], dtype=np.int64)


def label_source_from_array(ids: Sequence[str], labels: Sequence[int] | np.ndarray) -> LabelSource:
    """A label source over in-memory labels, e.g. a simulation's held-back digits labels."""
    if len(ids) != len(labels):
        raise DataError(f"{len(ids)} sample ids for {len(labels)} labels; give exactly one label per id")
    by_id = dict(zip(ids, np.asarray(labels).astype(np.int64).tolist()))
    if len(by_id) != len(ids):
        raise DataError("label source ids must be unique; found a repeated sample id")

    def read(sample_id: str) -> int:
        if sample_id not in by_id:
            raise DataError(f"no label for sample {sample_id!r} in the label source; add it or drop the sample")
        return by_id[sample_id]

    return read


def label_source_from_csv(path: str | Path, id_column: str = "id", label_column: str = "label") -> LabelSource:
    """A label source over a CSV of (id, label, ...) rows that parses a label only when asked."""
    return CsvLabelSource(Path(path), id_column, label_column)


class CsvLabelSource:
    """Indexes the byte offset of each id's row up front; the label cell is parsed per call.

    Unconsented labels therefore never become Python values, let alone reach the caller.
    Rows must be single-line CSV records (no quoted line breaks).
    """

    def __init__(self, path: Path, id_column: str, label_column: str) -> None:
        if not path.is_file():
            raise DataError(f"label file {path} does not exist; point the label source at an existing CSV")
        self._path = path
        with path.open("rb") as handle:
            header = _csv_cells(handle.readline(), path, line=1)
            if not header:
                raise DataError(f"label file {path} is empty; it needs a header row with id and label columns")
            self._id_index = _column_index(header, id_column, path)
            self._label_index = _column_index(header, label_column, path)
            self._width = len(header)
            self._offsets = self._index_rows(handle)

    def _index_rows(self, handle: BinaryIO) -> dict[str, int]:
        offsets: dict[str, int] = {}
        line = 1
        while True:
            offset = handle.tell()
            raw = handle.readline()
            line += 1
            if not raw:
                return offsets
            if not raw.strip():
                continue
            sample_id = self._cells(raw, line)[self._id_index].strip()
            if sample_id in offsets:
                raise DataError(f"{self._path} line {line}: sample id {sample_id!r} repeats; ids must be unique")
            offsets[sample_id] = offset

    @property
    def ids(self) -> frozenset[str]:
        """The ids that have a row (read from the id column only; no label is parsed)."""
        return frozenset(self._offsets)

    def cell(self, sample_id: str) -> str:
        """The label cell of one id, as written (a class name or an integer)."""
        if sample_id not in self._offsets:
            raise DataError(f"no label for sample {sample_id!r} in {self._path}; add it or drop the sample")
        with self._path.open("rb") as handle:
            handle.seek(self._offsets[sample_id])
            cell = self._cells(handle.readline(), line=None)[self._label_index].strip()
        if not cell:
            raise DataError(f"{self._path}: sample {sample_id!r} has an empty label; fill it in or drop the row")
        return cell

    def __call__(self, sample_id: str) -> int:
        cell = self.cell(sample_id)
        try:
            return int(cell)
        except ValueError:
            raise DataError(f"{self._path}: label of sample {sample_id!r} is {cell!r}, not an integer class") from None

    def _cells(self, raw: bytes, line: int | None) -> list[str]:
        cells = _csv_cells(raw, self._path, line)
        if len(cells) != self._width:
            where = f"line {line}" if line else "a row"
            raise DataError(f"{self._path} {where}: {len(cells)} cells but the header has {self._width}; fix the row")
        return cells


def make_demo_manifest(sample_ids: Sequence[str], test_fraction: float, consented_fraction: float, seed: int,
                       num_test: int | None = None) -> ConsentManifest:
    """A demo's consent, fixed from the ids alone before any label is read: a seeded choice of
    enough ids for the test set (``test_fraction`` of all, drawn later from the consented) plus
    ``consented_fraction`` of the rest, the training pool. ``sample_ids`` are the ids that have a
    label; when that is fewer than the source holds, ``num_test`` is the test set's size over all."""
    if not 0 <= consented_fraction <= 1:
        raise ConfigError(f"evaluation.consented_fraction must be in [0, 1], got {consented_fraction}")
    num_test = min(len(sample_ids), round(test_fraction * len(sample_ids)) if num_test is None else num_test)
    count = num_test + round(consented_fraction * (len(sample_ids) - num_test))
    chosen = np.random.default_rng(seed).choice(len(sample_ids), size=count, replace=False)
    return ConsentManifest(frozenset(sample_ids[i] for i in chosen.tolist()))


def _parse_lines(text: str) -> list[str]:
    stripped = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in stripped if line]


def _parse_structured(text: str, fmt: str, path: Path) -> list[str]:
    try:
        document = json.loads(text) if fmt == "json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        first_line = str(error).splitlines()[0]
        raise DataError(f"consent manifest {path} is not valid {fmt.upper()} ({first_line}); fix the syntax") from error
    ids = document.get(MANIFEST_KEY) if isinstance(document, dict) else None
    if not isinstance(ids, list) or not all(isinstance(i, str) and i.strip() for i in ids):
        raise DataError(f"consent manifest {path} needs key {MANIFEST_KEY!r} holding a list of sample id strings")
    return [i.strip() for i in ids]


def _csv_cells(raw: bytes, path: Path, line: int | None) -> list[str]:
    try:
        text = raw.decode("utf-8-sig" if line == 1 else "utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 ({error}); re-export it as UTF-8 CSV") from error
    return next(csv.reader([text]), [])


def _column_index(header: list[str], column: str, path: Path) -> int:
    names = [name.strip() for name in header]
    if column not in names:
        raise DataError(f"{path} has no column {column!r} (columns: {', '.join(names)}); rename it or pass its name")
    return names.index(column)


def _write_atomically(path: Path, text: str) -> None:
    # A crash mid-write must not leave a truncated manifest that silently consents fewer ids.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
