"""Site data: unlabelled datasets, loaders, simulated partitions and the consent manifest."""

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
from fedssl.data.partition import (
    PARTITIONERS,
    Partition,
    dirichlet,
    iid,
    make_site_dataset,
    partition,
    quantity_skew,
)

__all__ = [
    "LOADERS",
    "PARTITIONERS",
    "ConsentManifest",
    "ConsentedLabels",
    "CsvLabelSource",
    "LabelColumnDroppedWarning",
    "LabelSource",
    "Partition",
    "SiteDataset",
    "dirichlet",
    "iid",
    "label_source_from_array",
    "label_source_from_csv",
    "load_digits_labeled",
    "load_site_data",
    "make_demo_manifest",
    "make_site_dataset",
    "partition",
    "quantity_skew",
]
