"""How a data source's samples are read: the one settings type behind the reading keys under ``data:``.

``data.image_size``, ``data.max_length``, ``data.categorical`` / ``data.categories`` / ``data.hash_buckets``
and ``data.series_length`` decide the shape of every sample, so a simulation, its preflight probe and a
deployed site must read them alike. An experiment's ``data:`` section (fedssl.config.DataConfig) and a
site's (fedssl.deploy.site.config.SiteData) both inherit them from :class:`SampleFormat`, which keeps the
YAML flat under ``data:`` and validates the keys once, with one-line errors naming them. The loaders
(fedssl.data.loaders) and the probe (fedssl.data.probe) take one ``SampleFormat``.

A root module, not under fedssl.data: the experiment config (which the ServerApp loads) imports it, and
nothing the server reaches may import data loading. Standard library and fedssl.tables only (no torch).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from fedssl.tables import DEFAULT_HASH_BUCKETS, CategoricalSpec, categorical_spec
from fedssl.typed_yaml import check

MAX_IMAGE_SIDE = 4096
DEFAULT_MAX_LENGTH = 128  # text: token ids per sample (fedssl.data.text's byte tokenizer)
MAX_TEXT_LENGTH = 4096
MAX_SERIES_LENGTH = 1_000_000  # data.series_length: a typo guard, not a memory plan
CSV_KINDS = ("auto", "csv")


@dataclass(kw_only=True)
class SampleFormat:
    """The reading options, as the YAML has them. Keyword-only, so a subclass's own fields keep their places.

    Hashable by value (the loaders' callers cache a data set on it); the config sections that inherit these
    fields are not, so cache on :attr:`sample_format`, a copy of these fields alone, and never change it after.
    """

    # [height, width]: image folders and IDX images are resized and centre-cropped to it once, at load;
    # it must give the experiment's model.input_shape. Empty: the data's own size.
    image_size: list[int] = field(default_factory=list)
    # text sources (.txt): token ids per sample, CLS + UTF-8 bytes truncated/padded to it (fedssl.data.text)
    max_length: int = DEFAULT_MAX_LENGTH
    # CSV categorical columns, one-hot encoded by a public rule (fedssl/tables.py says why no learned vocabulary):
    # data.categories names a column's values (others -> "other"); data.categorical columns without such an
    # entry are hashed into data.hash_buckets slots. Empty cells -> "missing". The schema every site shares,
    # so the encoder's input width is the same everywhere.
    categorical: list[str] = field(default_factory=list)
    categories: dict[str, Any] = field(default_factory=dict)
    hash_buckets: int = DEFAULT_HASH_BUCKETS
    # time series (data.kind timeseries): steps per series; longer ones lose their tail, shorter ones are
    # zero-padded at the end (pad not masked); 0 = the source's own length (fedssl.data.series)
    series_length: int = 0

    def validate(self) -> None:
        check_image_size("data.image_size", self.image_size)
        check(isinstance(self.max_length, int) and 2 <= self.max_length <= MAX_TEXT_LENGTH, "data.max_length",
              f"must be in [2, {MAX_TEXT_LENGTH}] (CLS and at least one byte)", self.max_length)
        check(isinstance(self.series_length, int) and 0 <= self.series_length <= MAX_SERIES_LENGTH, "data.series_length",
              f"must be an integer in [0, {MAX_SERIES_LENGTH}] (time steps per series; 0 = the source's own length)",
              self.series_length)
        self.categorical_spec  # noqa: B018 - raises its own one-line errors

    def check_kind(self, kind: str) -> None:
        """A categorical spec only with a CSV source (``kind`` is data.kind)."""
        columns = self.categorical_spec.columns
        check(not columns or kind in CSV_KINDS, "data.categorical", "applies to CSV sources only (data.kind csv or auto)",
              sorted(columns))

    @property
    def categorical_spec(self) -> CategoricalSpec:
        return categorical_spec(self.categorical, self.categories, self.hash_buckets)

    @property
    def image_hw(self) -> tuple[int, int] | None:
        """``image_size`` as (height, width), or None for the data's own size."""
        return (self.image_size[0], self.image_size[1]) if self.image_size else None

    @property
    def sample_format(self) -> SampleFormat:
        """These fields alone (copied), as a plain SampleFormat: what the loaders take and their caches key on."""
        return SampleFormat(**{f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(SampleFormat)})

    def __hash__(self) -> int:
        # Equal formats hash alike: the categories' values (lists) are left to __eq__.
        return hash((tuple(self.image_size), self.max_length, tuple(self.categorical), frozenset(self.categories),
                     self.hash_buckets, self.series_length))


def check_image_size(key: str, size: list[int]) -> None:
    check(not size or (len(size) == 2 and all(isinstance(d, int) and 1 <= d <= MAX_IMAGE_SIDE for d in size)), key,
          f"must be [height, width] in pixels (1-{MAX_IMAGE_SIDE}), e.g. [64, 64], or [] for the data's own size", size)
