"""Attacks by a hostile coordinator through the training plan: each one is refused by the site's own policy.

The coordinator picks batch size, steps and rounds, so without a site-side policy it picks the noise
too: σ is calibrated from the first plan a site receives. Every test sends a real plan to a real DP
site (real data rows, real Opacus calibration, the signed ledger on disk) through the one training
entry (``train_round``) and checks that the site answers "refused", names the rule in its ledger,
fixes no σ from the hostile plan and never runs a DP-SGD step.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fedssl.training.local as local_module
from conftest import DELTA, NUM_SAMPLES, SAMPLE_RATE
from fedssl.config import PrivacyConfig
from fedssl.fl.keys import STATUS_REFUSED, STATUS_TRAINED
from fedssl.privacy.analysis import noise_for_budget
from fedssl.training.local import SiteSettings, train_round


def ledger(state_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (state_dir / "ledger.jsonl").read_text().splitlines() if line.strip()]


def kinds(state_dir: Path) -> list[str]:
    return [r["kind"] for r in ledger(state_dir)]


def site(state_dir: Path, **policy) -> SiteSettings:
    privacy = PrivacyConfig(target_epsilon=policy.pop("target_epsilon", 1.0), delta=DELTA, **policy)
    privacy.validate()
    return SiteSettings(site_id=0, state_dir=state_dir, privacy=privacy, device="cpu")


@pytest.fixture
def tripwire(monkeypatch):
    """Counts DP-SGD loops; a refused round must not start one."""
    calls = []
    real = local_module._run_steps

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(local_module, "_run_steps", counting)
    return calls


def assert_refused(result, state_dir: Path, rule: str, tripwire: list) -> dict:
    assert result.status == STATUS_REFUSED, f"the site trained on a hostile plan (epsilon {result.epsilon})"
    assert result.encoder_state is None and not tripwire
    assert rule in result.reason
    refusal = ledger(state_dir)[-1]
    assert refusal["kind"] == "refusal" and refusal["body"]["rule"] == rule
    return refusal


def test_one_step_full_batch_plan_is_refused_by_the_sample_rate_cap(tmp_path, digits_site, global_encoder, make_plan, tripwire):
    """One round of one step over every row: calibrated to the whole lifetime budget, it would spend
    all of it in a single release with the smallest noise the budget allows."""
    state = tmp_path / "state"
    hostile = make_plan(planned_rounds=1, local_steps=1, batch_size=NUM_SAMPLES)
    result = train_round(digits_site, global_encoder, hostile, site(state))
    assert_refused(result, state, "privacy.max_sample_rate", tripwire)
    assert "budget" not in kinds(state) and "dp_event" not in kinds(state)  # no σ was fixed from the hostile plan
    assert result.epsilon == 0.0

    # The site still trains an honest plan afterwards, with the σ that plan calibrates to.
    honest = train_round(digits_site, global_encoder, make_plan(run_id="honest"), site(state))
    assert honest.status == STATUS_TRAINED
    budget = next(r["body"] for r in ledger(state) if r["kind"] == "budget")
    assert budget["sample_rate"] == SAMPLE_RATE and budget["noise_multiplier"] >= 0.8


def test_plan_calibrating_below_the_noise_floor_is_refused(tmp_path, digits_site, global_encoder, make_plan, tripwire):
    """A short plan at a large budget: σ would fall below the site's floor of 0.8."""
    state = tmp_path / "state"
    hostile = make_plan(planned_rounds=1, local_steps=1)
    assert noise_for_budget(8.0, DELTA, SAMPLE_RATE, 1) < 0.8  # the attack's premise
    result = train_round(digits_site, global_encoder, hostile, site(state, target_epsilon=8.0))
    assert_refused(result, state, "privacy.min_noise_multiplier", tripwire)
    assert "budget" not in kinds(state)


def test_plan_with_more_rounds_than_the_site_allows_is_refused(tmp_path, digits_site, global_encoder, make_plan, tripwire):
    state = tmp_path / "state"
    result = train_round(digits_site, global_encoder, make_plan(planned_rounds=101), site(state))
    assert_refused(result, state, "privacy.max_rounds_per_run", tripwire)


def test_rounds_beyond_the_per_run_cap_are_refused(tmp_path, digits_site, global_encoder, make_plan, tripwire):
    """The plan says 2 rounds; the site allows 1 per run. Round 1 trains, round 2 is refused."""
    state = tmp_path / "state"
    settings = site(state, max_rounds_per_run=2)
    first = train_round(digits_site, global_encoder, make_plan(planned_rounds=2, server_round=1), settings)
    assert first.status == STATUS_TRAINED
    tighter = site(state, max_rounds_per_run=1)
    tripwire.clear()
    result = train_round(digits_site, first.encoder_state, make_plan(planned_rounds=1, server_round=2), tighter)
    assert_refused(result, state, "privacy.max_rounds_per_run", tripwire)


def test_too_many_local_steps_are_refused(tmp_path, digits_site, global_encoder, make_plan, tripwire):
    state = tmp_path / "state"
    result = train_round(digits_site, global_encoder, make_plan(local_steps=1001), site(state))
    assert_refused(result, state, "privacy.max_local_steps", tripwire)


@pytest.mark.parametrize("replayed_round", [1, 2])
def test_replayed_or_reordered_round_is_refused(tmp_path, digits_site, global_encoder, make_plan, tripwire, replayed_round):
    """The coordinator asks for a round of this run again (to average away the noise of two releases)."""
    state = tmp_path / "state"
    settings = site(state, target_epsilon=2.0)
    one = train_round(digits_site, global_encoder, make_plan(server_round=1, planned_rounds=3), settings)
    two = train_round(digits_site, one.encoder_state, make_plan(server_round=2, planned_rounds=3), settings)
    assert one.status == two.status == STATUS_TRAINED
    tripwire.clear()
    result = train_round(digits_site, global_encoder, make_plan(server_round=replayed_round, planned_rounds=3), settings)
    assert_refused(result, state, "round order", tripwire)
    assert result.epsilon == pytest.approx(two.epsilon, rel=1e-12)  # nothing more was charged


def test_per_run_epsilon_cap_stops_a_run_but_not_the_next(tmp_path, digits_site, global_encoder, make_plan, tripwire):
    """A run may spend only part of the lifetime budget here; the next run gets its own share."""
    state = tmp_path / "state"
    probe = train_round(digits_site, global_encoder, make_plan(), site(tmp_path / "probe"))
    cap = probe.epsilon * 1.01  # room for one round per run
    settings = site(state, max_epsilon_per_run=cap)
    assert train_round(digits_site, global_encoder, make_plan(server_round=1), settings).status == STATUS_TRAINED
    tripwire.clear()
    result = train_round(digits_site, global_encoder, make_plan(server_round=2), settings)
    refusal = assert_refused(result, state, "privacy.max_epsilon_per_run", tripwire)
    assert refusal["body"]["run_id"] == "test-run"
    other_run = train_round(digits_site, global_encoder, make_plan(run_id="next-run", server_round=1), settings)
    assert other_run.status == STATUS_TRAINED


@pytest.mark.parametrize(
    "key, value",
    [("min_noise_multiplier", 0), ("max_sample_rate", 1.5), ("max_local_steps", 0), ("max_rounds_per_run", 0), ("max_epsilon_per_run", -1)],
)
def test_site_policy_settings_are_validated_at_the_edge(key, value):
    from fedssl.config import config_from_dict
    from fedssl.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"^privacy\.{key}: .*got"):
        config_from_dict({"privacy": {key: value}})

