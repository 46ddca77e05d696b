"""Attack: labels whose owners did not consent still steer what the evaluation sees.

The records' owners who refused consent change nothing by refusing: if their labels decide which
records are held out for testing, which site gets which record (label skew) or what the probes are
scored on, those labels are used without consent. The attacker's experiment: permute ONLY the
unconsented labels of the data set (same inputs, same ids, same consent) and look for any difference
in the train/test split, in every partitioner's sites, and in the evaluation's inputs and results.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import fedssl.experiment as experiment
from fedssl.config import SCORE_ON, SCORE_ON_TEST, save_config
from fedssl.data.consent import ConsentManifest
from fedssl.data.loaders import load_digits_labeled
from fedssl.data.partition import PARTITIONERS
from fedssl.evaluation.central import evaluate_run
from fedssl.experiment import central_data_for, load_experiment, site_partitions
from fedssl.layout import RunDir
from fedssl.models import build_encoder

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "experiments" / "digits-tiny.yaml"
CONSENTED_SHARE = 0.6


def _consent_manifest(path: Path) -> ConsentManifest:
    """The data owners' decision, made before anyone looked at a label: a seeded 60% of the records."""
    ids = load_digits_labeled()[0].sample_ids
    chosen = np.random.default_rng(12).choice(len(ids), size=round(CONSENTED_SHARE * len(ids)), replace=False)
    manifest = ConsentManifest(frozenset(ids[i] for i in chosen.tolist()))
    manifest.save(path)
    return manifest


def _relabelled_digits(manifest: ConsentManifest):
    """The digits with every unconsented label permuted among the unconsented records (inputs, ids untouched)."""
    data, labels = load_digits_labeled()
    unconsented = np.array([i for i, sample_id in enumerate(data.sample_ids) if sample_id not in manifest])
    permuted = labels.copy()
    permuted[unconsented] = np.random.default_rng(3).permutation(labels[unconsented])
    assert (permuted != labels).sum() > 0.5 * len(unconsented)  # the attack really changes labels
    return lambda: (data, permuted)


def _config(out: Path, manifest_path: Path, partition: str, score_on: str = SCORE_ON_TEST):
    config = load_experiment(TINY, [f"run.output_dir={out}", f"evaluation.consent_manifest={manifest_path}",
                                    f"data.partition={partition}", "federation.num_sites=5", f"evaluation.score_on={score_on}"])
    config.model.input_shape = [1, 8, 8]
    return config


def _split_and_partitions(manifest_path: Path) -> dict:
    """The train/test split and every partitioner's sites, as sample ids."""
    experiment.central_data.cache_clear()
    seen: dict = {}
    for name in sorted(PARTITIONERS):
        config = _config(manifest_path.parent, manifest_path, name)
        data = central_data_for(config)
        seen["split"] = (data.train.sample_ids, data.test.sample_ids)
        seen[f"partition {name}"] = [[data.train.sample_ids[i] for i in part] for part in site_partitions(config)]
    return seen


def _evaluation(run_path: Path, manifest_path: Path, score_on: str) -> dict:
    """What `fedssl evaluate` makes of a fixed encoder: its results and the consent it records."""
    experiment.central_data.cache_clear()
    config = _config(run_path.parent, manifest_path, "dirichlet", score_on)
    run_dir = RunDir(run_path)
    run_dir.path.mkdir(parents=True)
    save_config(config, run_dir.config)
    m = config.model
    torch.save(build_encoder(m.encoder, m.input_shape, width=m.width, depth=m.depth, seed=7).state_dict(), run_dir.final_encoder)
    results = evaluate_run(run_dir.path).to_dict()
    results.pop("seconds", None)
    return {"evaluation": results, "consent file": run_dir.consent.read_text()}


def test_permuting_only_unconsented_labels_changes_no_split_partition_or_evaluation(tmp_path, monkeypatch):
    manifest_path = tmp_path / "consent.txt"
    manifest = _consent_manifest(manifest_path)
    relabelled = _relabelled_digits(manifest)
    try:
        honest = _split_and_partitions(manifest_path)
        with monkeypatch.context() as attack:
            attack.setattr(experiment, "load_digits_labeled", relabelled)
            attacked = _split_and_partitions(manifest_path)
        for key in honest:
            assert attacked[key] == honest[key], f"{key} changed when only unconsented labels changed"
        for score_on in SCORE_ON:  # scored on the test set, or on a validation set carved from the training pool
            honest = _evaluation(tmp_path / f"honest-{score_on}", manifest_path, score_on)
            with monkeypatch.context() as attack:
                attack.setattr(experiment, "load_digits_labeled", relabelled)
                attacked = _evaluation(tmp_path / f"attacked-{score_on}", manifest_path, score_on)
            for key in honest:
                assert attacked[key] == honest[key], f"{key} changed ({score_on}) when only unconsented labels changed"
    finally:
        experiment.central_data.cache_clear()
