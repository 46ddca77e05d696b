"""What a label-efficiency evaluation runs: fractions, seeds, and the probe/fine-tune recipe."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedssl.errors import ConfigError

LINEAR_PROBE = "linear_probe"
FINETUNE = "finetune"
METHODS = frozenset({LINEAR_PROBE, FINETUNE})


@dataclass(frozen=True)
class EvalPlan:
    """One evaluation recipe; every row of the table shares it so the rows stay comparable."""

    label_fractions: list[float] = field(default_factory=lambda: [0.01, 0.05, 0.10])
    label_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    random_init_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    finetune_epochs: int = 30
    finetune_lr: float = 3e-3
    finetune_batch_size: int = 32
    probe_C: float = 1.0
    methods: list[str] = field(default_factory=lambda: [LINEAR_PROBE, FINETUNE])
    # Below this many labels a stratified sample cannot cover typical class counts, and
    # accuracies from a handful of labels are mostly noise.
    min_labels: int = 10

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not self.label_fractions or any(not 0.0 < f <= 1.0 for f in self.label_fractions):
            problems.append(f"label_fractions must be non-empty values in (0, 1], got {self.label_fractions}")
        if len(set(self.label_fractions)) != len(self.label_fractions):
            problems.append(f"label_fractions must be distinct, got {self.label_fractions}")
        if not self.label_seeds:
            problems.append("label_seeds must not be empty")
        if not self.random_init_seeds:
            problems.append("random_init_seeds must not be empty (the random-init control needs them)")
        unknown = set(self.methods) - METHODS
        if unknown or not self.methods:
            problems.append(f"methods must be a non-empty subset of {sorted(METHODS)}, got {self.methods}")
        if self.finetune_epochs < 1 or self.finetune_batch_size < 1 or self.finetune_lr <= 0:
            problems.append("finetune_epochs, finetune_batch_size and finetune_lr must be positive")
        if self.probe_C <= 0:
            problems.append(f"probe_C must be positive, got {self.probe_C}")
        if self.min_labels < 2:
            problems.append(f"min_labels must be at least 2, got {self.min_labels}")
        if problems:
            raise ConfigError("invalid evaluation plan: " + "; ".join(problems))

    def labels_needed(self, fraction: float, pool_size: int, num_classes: int) -> int:
        """Label count for a fraction of the central pool: never below the floor or one per class."""
        return max(self.min_labels, num_classes, round(fraction * pool_size))
