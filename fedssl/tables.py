"""Categorical CSV columns: a public, data-independent encoding into the feature vector.

Why no vocabulary learned from the data: a category vocabulary built from a site's private rows is
itself a release. A value seen once (a rare employer, a postcode, a diagnosis code) can identify a
person, and the encoder's first layer has one weight column per vocabulary slot, which is shared
with the coordinator; a vocabulary that differs between sites would also give the sites' encoders
different input widths. So the slots are fixed before any row is read, by one of two public rules:

- **declared** (``data.categories: {col: [v1, v2, ...]}``): the schema names the values; a cell with
  any other value goes to an ``other`` slot. Slots: the values in the given order, ``other``, ``missing``.
- **hashed** (``data.categorical: [col, ...]``, without a ``data.categories`` entry): feature
  hashing of the cell's UTF-8 text (BLAKE2b, not Python's salted ``hash``) into
  ``data.hash_buckets`` slots, then ``missing``. The buckets exist whatever the data; collisions
  are the price of not naming the values.

An empty cell goes to ``missing`` and is counted in the loader's MissingValuesImputedWarning, as
empty numeric cells are. A non-numeric cell in a column not declared categorical is an error,
not a silent auto-detection: which columns are categorical would then depend on the site's rows,
and with it the encoder's input width.

Layout of a row (what the encoders see): the numeric columns in header order, then each
categorical column's one-hot block in header order. ``TableLayout.blocks`` gives the block sizes,
which VIME uses to corrupt and reconstruct a categorical column as one feature (fedssl.pretext.vime).
One-hot into a linear first layer is an embedding of each column (one weight column per slot), so
the MLP encoder and every DP-SGD clipping rule for Linear apply unchanged.

Torch-free and numpy-free: the config, the probe and the loader all read it.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fedssl.errors import ConfigError, DataError

OTHER = "other"
MISSING = "missing"
DEFAULT_HASH_BUCKETS = 16
MAX_HASH_BUCKETS = 4096


class SchemaError(DataError):
    """The table and the categorical schema disagree (a text cell in an undeclared column, a declared column
    the header lacks): the fix is in data.categorical / data.categories, so the preflight names that key."""


@dataclass(frozen=True)
class CategoricalSpec:
    """Which CSV columns are categorical and their slots; hashable (the central split is cached on it)."""

    declared: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (column, values), data.categories
    hashed: tuple[str, ...] = ()  # data.categorical columns without declared values
    buckets: int = DEFAULT_HASH_BUCKETS

    @property
    def columns(self) -> frozenset[str]:
        return frozenset(self.hashed) | {name for name, _ in self.declared}

    @functools.cached_property
    def _slots(self) -> dict[str, dict[str, int]]:
        """Declared column -> value -> slot (looked up once per cell: tables have many cells)."""
        return {name: {value: i for i, value in enumerate(values)} for name, values in self.declared}

    def block_size(self, column: str) -> int:
        values = self._slots.get(column)
        return self.buckets + 1 if values is None else len(values) + 2

    def slot(self, column: str, cell: str) -> tuple[int, str | None]:
        """(slot in the column's block, what to count: MISSING, OTHER or None) for one stripped cell."""
        values = self._slots.get(column)
        if not cell:
            return self.block_size(column) - 1, MISSING
        if values is None:
            digest = hashlib.blake2b(cell.encode("utf-8"), digest_size=8).digest()
            return int.from_bytes(digest, "little") % self.buckets, None
        found = values.get(cell)
        return (len(values), OTHER) if found is None else (found, None)


def categorical_spec(categorical: Sequence[str], categories: Mapping[str, Sequence[str]],
                     buckets: int = DEFAULT_HASH_BUCKETS) -> CategoricalSpec:
    """The spec from ``data.categorical``, ``data.categories`` and ``data.hash_buckets``; a one-line ConfigError if bad."""
    if not isinstance(buckets, int) or isinstance(buckets, bool) or not 2 <= buckets <= MAX_HASH_BUCKETS:
        raise ConfigError(f"data.hash_buckets: must be an integer in [2, {MAX_HASH_BUCKETS}], got {buckets!r}")
    for i, name in enumerate(categorical):
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"data.categorical[{i}]: must be a CSV column name, got {name!r}")
    if len(set(categorical)) != len(categorical):
        raise ConfigError(f"data.categorical: lists a column twice, got {list(categorical)!r}; list each once")
    declared = []
    for name, values in categories.items():
        key = f"data.categories.{name}"
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"data.categories: keys must be CSV column names, got {name!r}")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{key}: must be a non-empty list of the column's values, got {values!r}")
        texts = [str(v).strip() for v in values]  # YAML may read 1 or yes as numbers/bools; cells are text
        if any(not t for t in texts) or len(set(texts)) != len(texts):
            raise ConfigError(f"{key}: values must be non-empty and distinct (an empty cell is 'missing' already), got {values!r}")
        declared.append((name.strip(), tuple(texts)))
    names = {n for n, _ in declared}
    hashed = tuple(n.strip() for n in categorical if n.strip() not in names)
    return CategoricalSpec(tuple(declared), hashed, buckets)


@dataclass(frozen=True)
class TableLayout:
    """Where a CSV's columns land in the feature vector: numeric first, then one-hot blocks."""

    numeric: tuple[int, ...]  # header indices of the numeric columns
    categorical: tuple[int, ...]  # header indices of the categorical columns, in header order
    blocks: tuple[int, ...]  # one-hot block size of each categorical column

    @property
    def width(self) -> int:
        return len(self.numeric) + sum(self.blocks)


def table_layout(header: Sequence[str], features: Sequence[int], spec: CategoricalSpec, path: object) -> TableLayout:
    """The layout of a CSV with ``header`` whose feature columns are ``features`` (id and label columns excluded)."""
    names = {header[i].strip(): i for i in features}
    unknown = sorted(spec.columns - set(names))
    if unknown:
        raise SchemaError(f"{path}: categorical column {unknown[0]!r} (data.categorical / data.categories) is not a feature "
                        f"column of the header ({', '.join(names)}); fix the name or remove it")
    categorical = tuple(i for i in features if header[i].strip() in spec.columns)
    numeric = tuple(i for i in features if i not in categorical)
    return TableLayout(numeric, categorical, tuple(spec.block_size(header[i].strip()) for i in categorical))


def not_numeric_error(path: object, column: str, where: str, cell: str) -> SchemaError:
    """The one line for a text cell in a numeric column: declare the column categorical."""
    return SchemaError(f"{path}: column {column!r} is not numeric ({where}{cell!r}); declare it categorical "
                     f"(data.categorical: [{column}] hashes its values; data.categories: {{{column}: [...]}} names them) or drop it")
