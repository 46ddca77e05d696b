"""Label-efficiency evaluation of a pretrained encoder on consented labels only.

The results (fedssl.evaluation.results) are imported here directly; the evaluation itself, which
needs torch, only when first asked for, so readers of evaluation.json (the dashboard) stay torch-free.
"""

from typing import Any

from fedssl.evaluation.results import (
    HANDCRAFTED_PROBE,
    PRETRAINED_FINETUNE,
    PRETRAINED_PROBE,
    RANDOM_INIT_PROBE,
    RAW_INPUT,
    ROW_ORDER,
    SCRATCH_FINETUNE,
    WARM_START_FINETUNE,
    WARM_START_PROBE,
    WARM_START_ROWS,
    Cell,
    EvalResults,
    FractionInfo,
    Gain,
    SeedRun,
    format_fraction,
)

__all__ = [
    "HANDCRAFTED_PROBE",
    "PRETRAINED_FINETUNE",
    "PRETRAINED_PROBE",
    "RANDOM_INIT_PROBE",
    "RAW_INPUT",
    "ROW_ORDER",
    "SCRATCH_FINETUNE",
    "WARM_START_FINETUNE",
    "WARM_START_PROBE",
    "WARM_START_ROWS",
    "Cell",
    "EncoderFactory",
    "EvalResults",
    "FractionInfo",
    "Gain",
    "SeedRun",
    "evaluate_label_efficiency",
    "format_fraction",
]

_TRAINING = ("EncoderFactory", "evaluate_label_efficiency")


def __getattr__(name: str) -> Any:
    if name in _TRAINING:
        from fedssl.evaluation import label_efficiency

        return getattr(label_efficiency, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
