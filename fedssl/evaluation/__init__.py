"""Label-efficiency evaluation of a pretrained encoder on consented labels only."""

from fedssl.evaluation.label_efficiency import EncoderFactory, evaluate_label_efficiency
from fedssl.evaluation.results import (
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
