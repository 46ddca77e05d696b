"""Central evaluation of a finished run: the coordinator's consented labels only.

Loads the run's resolved config and final encoder (and, when the run used one, the warm
start the federation began from), the central data with its consent manifest, and writes
``evaluation.json`` beside the run's other outputs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from fedssl.config import load_config
from fedssl.errors import ConfigError
from fedssl.evaluation.label_efficiency import evaluate_label_efficiency
from fedssl.evaluation.results import EvalResults
from fedssl.experiment import central_data_for
from fedssl.layout import RunDir
from fedssl.models import encoder_for
from fedssl.training.device import resolve_device
from fedssl.warmstart.checkpoint import run_warm_start


def evaluate_run(run_dir: Path, progress: Callable[[str], None] | None = None) -> EvalResults:
    layout = RunDir(run_dir)
    config = load_config(layout.config)
    encoder_path = layout.final_encoder
    if not encoder_path.exists():
        raise ConfigError(f"{encoder_path} missing: the federated run did not finish; rerun `fedssl simulate`")
    data = central_data_for(config)  # the consent manifest is fixed there, before any label is read
    if data.labels is None:
        raise ConfigError("evaluation.enabled: this data source has no labels; set evaluation.enabled=false")
    data.labels.manifest.save(layout.consent)
    if config.evaluation.scores_validation:  # choosing settings: the test set's labels are never read
        data = data.validation_view(config.evaluation.validation_fraction, config.run.seed)
    m = config.model

    def encoder_factory(seed: int | None):
        return encoder_for(m, seed=seed)

    # Same file, same checks as the ServerApp's load: the rows score exactly what the sites started from.
    warm_start_state = run_warm_start(config, layout.path, encoder_factory(None))
    results = evaluate_label_efficiency(
        encoder_factory=encoder_factory,
        pretrained_state=torch.load(encoder_path, weights_only=True),
        warm_start_state=warm_start_state,
        train=data.train,
        test=data.test,
        labels=data.labels,
        plan=config.evaluation,
        progress=progress,
        device=resolve_device(config.run.device),
    )
    layout.evaluation.write_text(json.dumps(results.to_dict(), indent=1))
    return results
