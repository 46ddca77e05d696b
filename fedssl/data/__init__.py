"""Site data: unlabelled datasets, loaders, simulated partitions and the consent manifest.

The names below load on first use (PEP 562): ``fedssl.data.probe``, which the preflight check
imports before torch, must not pull in the torch-backed loaders through this package. The
partition function is ``fedssl.data.partition.partition``: loaded lazily, ``fedssl.data.partition``
names the submodule, whatever was imported first.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ConsentManifest": "consent",
    "ConsentedLabels": "consent",
    "CsvLabelSource": "consent",
    "LabelSource": "consent",
    "label_source_from_array": "consent",
    "label_source_from_csv": "consent",
    "make_demo_manifest": "consent",
    "SiteDataset": "dataset",
    "LOADERS": "loaders",
    "LabelColumnDroppedWarning": "loaders",
    "load_digits_labeled": "loaders",
    "load_site_data": "loaders",
    "PARTITIONERS": "partition",
    "Partition": "partition",
    "dirichlet": "partition",
    "iid": "partition",
    "make_site_dataset": "partition",
    "quantity_skew": "partition",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from fedssl.data.consent import (
        ConsentedLabels,
        ConsentManifest,
        CsvLabelSource,
        LabelSource,
        label_source_from_array,
        label_source_from_csv,
        make_demo_manifest,
    )
    from fedssl.data.dataset import SiteDataset
    from fedssl.data.loaders import LOADERS, LabelColumnDroppedWarning, load_digits_labeled, load_site_data
    from fedssl.data.partition import PARTITIONERS, Partition, dirichlet, iid, make_site_dataset, quantity_skew


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fedssl.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"fedssl.data.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
