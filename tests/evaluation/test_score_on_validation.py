"""evaluation.score_on: validation — choosing settings without reading one test label.

The evaluation scores on a stratified share of the consented training records and draws its label subsets from
the rest; the test set's labels are never requested, and the report says the numbers are for choosing settings.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import fedssl.experiment as experiment
from fedssl.config import save_config
from fedssl.errors import ConfigError
from fedssl.evaluation.central import evaluate_run
from fedssl.evaluation.results import SCORED_ON_VALIDATION
from fedssl.experiment import central_data_for, load_experiment
from fedssl.layout import RunDir
from fedssl.models import build_encoder
from fedssl.preflight import preflight
from fedssl.reporting.report import _evaluation_section, _headline_lines, _terminal_evaluation
from fedssl.reporting.run_files import load_run

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "experiments" / "digits-tiny.yaml"


@pytest.fixture(autouse=True)
def _fresh_central_data():
    experiment.central_data.cache_clear()
    yield
    experiment.central_data.cache_clear()


def _evaluated_run(tmp_path: Path, monkeypatch, overrides: list[str]) -> tuple[RunDir, list[str]]:
    """A run dir holding a fixed encoder, evaluated; every sample id whose label the evaluation requested."""
    config = load_experiment(TINY, [f"run.output_dir={tmp_path}", "evaluation.label_seeds=[0,1]", *overrides])
    config.model.input_shape = [1, 8, 8]
    layout = RunDir(tmp_path / "run")
    layout.path.mkdir()
    save_config(config, layout.config)
    m = config.model
    torch.save(build_encoder(m.encoder, m.input_shape, width=m.width, depth=m.depth, seed=7).state_dict(), layout.final_encoder)
    labels = central_data_for(config).labels  # the instance evaluate_run gets too (the central split is cached)
    requested: list[str] = []
    read = labels.labels_for

    def recording(ids):
        ids = list(ids)
        requested.extend(ids)
        return read(ids)

    monkeypatch.setattr(labels, "labels_for", recording)
    evaluate_run(layout.path)
    layout.metrics.write_text("")  # no rounds recorded: the report reads the evaluation alone
    return layout, requested


def test_validation_scores_consented_training_records_and_reads_no_test_label(tmp_path, monkeypatch):
    layout, requested = _evaluated_run(tmp_path, monkeypatch, ["evaluation.score_on=validation"])
    config = load_experiment(TINY, [f"run.output_dir={tmp_path}"])
    data = central_data_for(config)
    test_ids, train_ids = set(data.test.sample_ids), set(data.train.sample_ids)
    consented_train = [i for i in data.train.sample_ids if i in data.labels.manifest]
    assert requested and not test_ids & set(requested)  # the attack on the rule: not one test label was read
    assert set(requested) <= set(consented_train)
    results = load_run(layout.path).evaluation
    assert results.scored_set == "validation"
    assert results.num_test == round(0.3 * len(consented_train))  # the default evaluation.validation_fraction
    assert results.num_train == len(train_ids) - results.num_test  # the label pool is the training pool less validation
    assert results.num_consented_train == len(consented_train) - results.num_test
    # the report and the terminal say what the numbers are for
    section = "\n".join(_evaluation_section(load_run(layout.path)))
    assert section.startswith("Validation accuracy") and f"{results.num_test} validation examples" in section
    terminal = _terminal_evaluation(results)
    assert terminal[0].startswith("validation accuracy")
    assert SCORED_ON_VALIDATION in terminal and SCORED_ON_VALIDATION in _headline_lines(load_run(layout.path))


def test_the_validation_set_is_stratified_disjoint_from_the_label_pool_and_seeded():
    config = load_experiment(TINY, [])
    data = central_data_for(config)
    view = data.validation_view(0.3, seed=0)
    scored, pool = set(view.test.sample_ids), set(view.train.sample_ids)
    assert not scored & pool and scored | pool == set(data.train.sample_ids)
    labels = data.labels.labels_for(view.test.sample_ids)
    consented = data.labels.labels_for(data.labels.consented_ids(data.train.sample_ids))
    # every class in its share of the consented records, within one record
    for cls in np.unique(consented):
        assert abs((labels == cls).sum() - 0.3 * (consented == cls).sum()) <= 1
    assert data.validation_view(0.3, seed=0).test.sample_ids == view.test.sample_ids
    assert data.validation_view(0.3, seed=1).test.sample_ids != view.test.sample_ids


def test_scored_on_test_by_default_and_the_report_says_test(tmp_path, monkeypatch):
    layout, requested = _evaluated_run(tmp_path, monkeypatch, [])
    results = load_run(layout.path).evaluation
    assert results.scored_set == "test" and set(central_data_for(load_experiment(TINY, [])).test.sample_ids) <= set(requested)
    assert _terminal_evaluation(results)[0].startswith("test accuracy")
    assert SCORED_ON_VALIDATION not in _terminal_evaluation(results)


@pytest.mark.parametrize("override, message", [
    ("evaluation.score_on=valid", "evaluation.score_on: valid choices: test, validation, got 'valid'"),
    ("evaluation.validation_fraction=1", "evaluation.validation_fraction: must be in (0, 1)"),
])
def test_a_bad_setting_is_one_line_naming_it(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_experiment(TINY, [override])


def test_preflight_refuses_a_validation_set_too_small_to_score_on():
    config = load_experiment(TINY, ["evaluation.score_on=validation", "evaluation.validation_fraction=0.01"])
    problems = [p for p in preflight(config, simulated_sites=True, evaluate=True).problems if p.key == "evaluation.validation_fraction"]
    assert len(problems) == 1 and "must be at least evaluation.min_labels (10)" in problems[0].message
    config = load_experiment(TINY, ["evaluation.score_on=validation"])
    assert not [p for p in preflight(config, simulated_sites=True, evaluate=True).problems if p.key == "evaluation.validation_fraction"]
