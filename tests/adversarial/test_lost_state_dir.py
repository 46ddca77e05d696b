"""Attacks on the monotonicity of a site's spend: delete its state dir, or put an older copy back.

Before the signed high-water mark, a site whose state dir was lost started again at ε = 0 under the
same ledger key, and a state dir restored from an older copy read as a smaller, self-consistent
spend — both re-spend budget already used. Each test trains a real DP site (real rows, Opacus,
the signed ledger), does the damage, and asks it to train again: the site must refuse loudly with
one line (never train), in the deployment layout (mark beside the ledger key, outside the state
dir) and in the simulation layout (mark beside the site's state dir in the run dir).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import fedssl.training.local as local_module
from fedssl.errors import PrivacyError
from fedssl.fl.keys import STATUS_TRAINED
from fedssl.training.local import train_round
from site_layout import write_site_yaml


@pytest.fixture(autouse=True)
def no_training_after_damage(monkeypatch):
    """``arm()``: from then on any DP-SGD step fails the test."""
    armed = []
    real = local_module._run_steps

    def guarded(*args, **kwargs):
        assert not armed, "the site trained on a lost or rolled-back state dir"
        return real(*args, **kwargs)

    monkeypatch.setattr(local_module, "_run_steps", guarded)
    return lambda: armed.append(True)


@pytest.fixture
def deployed(tmp_path):
    """A deployed site's config: ledger key (and so the mark) in keys/, state in state/."""
    from fedssl.deploy.site.config import load_site_config

    return load_site_config(write_site_yaml(tmp_path, target_epsilon=2.0))


@pytest.fixture
def simulated(tmp_path):
    """Site 0 of a simulated run of digits-tiny: (dataset, settings, plan, run dir)."""
    from fedssl.config import load_config
    from fedssl.experiment import simulated_site_from_config
    from fedssl.fl.plan import plan_from_config

    root = Path(__file__).resolve().parents[2]
    config = load_config(root / "configs" / "experiments" / "digits-tiny.yaml", [f"run.output_dir={tmp_path}", "federation.rounds=3"])
    run_dir = config.run_dir()
    dataset, settings = simulated_site_from_config(config, 0, run_dir)
    return dataset, settings, plan_from_config(config, run_id="sim-run"), run_dir


def train_two_rounds(dataset, encoder, plan, settings, keep: Path) -> dict:
    """Round 1, a copy of the state dir as an attacker keeps it, round 2."""
    first = train_round(dataset, encoder, plan.with_round(1), settings)
    shutil.copytree(settings.state_dir, keep)
    second = train_round(dataset, first.encoder_state, plan.with_round(2), settings)
    assert first.status == second.status == STATUS_TRAINED
    return second.encoder_state


def refused(dataset, encoder, plan, settings, match: str) -> str:
    with pytest.raises(PrivacyError, match=match) as err:
        train_round(dataset, encoder, plan, settings)
    message = str(err.value)
    assert "\n" not in message and "refusing to train" in message
    return message


# ---------------------------------------------------------------- deployment layout


def test_deleted_state_dir_is_refused_in_a_deployment(deployed, digits_site, global_encoder, make_plan, tmp_path, no_training_after_damage):
    settings = deployed.settings()
    state = train_two_rounds(digits_site, global_encoder, make_plan(planned_rounds=3), settings, tmp_path / "old")
    shutil.rmtree(settings.state_dir)
    no_training_after_damage()
    message = refused(digits_site, state, make_plan(planned_rounds=3, server_round=3), settings, "ledger is gone")
    assert "Restore the site's latest state dir" in message
    assert settings.state_dir not in settings.highwater_path.parents  # the mark is beside the ledger key, not in the state dir
    assert not (settings.state_dir / "ledger.jsonl").exists()  # no fresh ledger started at epsilon 0

    from fedssl.deploy.site.preflight import preflight

    check = {c.name: c for c in preflight(deployed, check_coordinator=False)}["high-water mark"]
    assert not check.ok and "ledger is gone" in check.detail


def test_state_dir_restored_from_an_older_copy_is_refused(deployed, digits_site, global_encoder, make_plan, tmp_path, no_training_after_damage):
    settings = deployed.settings()
    state = train_two_rounds(digits_site, global_encoder, make_plan(planned_rounds=3), settings, tmp_path / "old")
    shutil.rmtree(settings.state_dir)
    shutil.copytree(tmp_path / "old", settings.state_dir)
    no_training_after_damage()
    refused(digits_site, state, make_plan(run_id="another-run", planned_rounds=3), settings, "the ledger ends at seq")

    from fedssl.deploy.site.preflight import preflight

    assert not {c.name: c for c in preflight(deployed, check_coordinator=False)}["high-water mark"].ok


def mark_file(settings) -> Path:
    return settings.highwater_path


def test_rollback_with_a_lowered_mark_is_refused(deployed, digits_site, global_encoder, make_plan, tmp_path, no_training_after_damage):
    """The attacker also lowers the mark to the old copy's seq and epsilon, keeping its signature."""
    settings = deployed.settings()
    first = train_round(digits_site, global_encoder, make_plan(planned_rounds=3), settings)
    old_mark = json.loads(mark_file(settings).read_text())
    shutil.copytree(settings.state_dir, tmp_path / "old")
    train_round(digits_site, first.encoder_state, make_plan(planned_rounds=3, server_round=2), settings)
    mark = json.loads(mark_file(settings).read_text())
    mark.update(seq=old_mark["seq"], epsilon=old_mark["epsilon"], hash=old_mark["hash"])  # the signature stays the new one
    mark_file(settings).write_text(json.dumps(mark))
    shutil.rmtree(settings.state_dir)
    shutil.copytree(tmp_path / "old", settings.state_dir)
    no_training_after_damage()
    refused(digits_site, first.encoder_state, make_plan(planned_rounds=3, server_round=2), settings, "fails its signature")


def test_rollback_with_a_mark_signed_by_another_key_is_refused(deployed, digits_site, global_encoder, make_plan, tmp_path, no_training_after_damage):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedssl.privacy.highwater import HighWaterMark, write_mark

    settings = deployed.settings()
    train_two_rounds(digits_site, global_encoder, make_plan(planned_rounds=3), settings, tmp_path / "old")
    shutil.rmtree(settings.state_dir)
    shutil.copytree(tmp_path / "old", settings.state_dir)
    records = [json.loads(line) for line in (settings.state_dir / "ledger.jsonl").read_text().splitlines()]
    write_mark(mark_file(settings), Ed25519PrivateKey.generate(), HighWaterMark(records[-1]["seq"], 0.0, records[-1]["hash"]))
    no_training_after_damage()
    refused(digits_site, global_encoder, make_plan(planned_rounds=3, server_round=3), settings, "fails its signature")


def test_rollback_with_the_mark_deleted_is_refused(deployed, digits_site, global_encoder, make_plan, tmp_path, no_training_after_damage):
    settings = deployed.settings()
    train_two_rounds(digits_site, global_encoder, make_plan(planned_rounds=3), settings, tmp_path / "old")
    shutil.rmtree(settings.state_dir)
    shutil.copytree(tmp_path / "old", settings.state_dir)
    mark_file(settings).unlink()
    no_training_after_damage()
    refused(digits_site, global_encoder, make_plan(planned_rounds=3, server_round=3), settings, "high-water mark .* is missing")


# ---------------------------------------------------------------- simulation layout


def test_deleted_state_dir_is_refused_in_a_simulation(simulated, tmp_path, no_training_after_damage):
    from fedssl.layout import RunDir
    from fedssl.models import build_encoder

    dataset, settings, plan, run_dir = simulated
    encoder = build_encoder(plan.encoder, dataset.input_shape, width=plan.width, depth=plan.depth, seed=0).state_dict()
    state = train_two_rounds(dataset, encoder, plan, settings, tmp_path / "old")
    shutil.rmtree(RunDir(run_dir).site_state(0))
    no_training_after_damage()
    refused(dataset, state, plan.with_round(3), settings, "ledger is gone")
    assert settings.highwater_path == RunDir(run_dir).site_highwater(0)


def test_older_state_dir_is_refused_in_a_simulation(simulated, tmp_path, no_training_after_damage):
    from fedssl.layout import RunDir
    from fedssl.models import build_encoder

    dataset, settings, plan, run_dir = simulated
    encoder = build_encoder(plan.encoder, dataset.input_shape, width=plan.width, depth=plan.depth, seed=0).state_dict()
    state = train_two_rounds(dataset, encoder, plan, settings, tmp_path / "old")
    shutil.rmtree(RunDir(run_dir).site_state(0))
    shutil.copytree(tmp_path / "old", RunDir(run_dir).site_state(0))
    no_training_after_damage()
    refused(dataset, state, plan.with_round(2), settings, "the ledger ends at seq")
