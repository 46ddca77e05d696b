"""The signed high-water mark (fedssl.privacy.highwater) and the site policy's pure checks (fedssl.privacy.policy)."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from conftest import DELTA, SAMPLE_RATE
from fedssl.config import PrivacyConfig
from fedssl.errors import PrivacyError
from fedssl.privacy.highwater import HighWaterMark, highwater_path, read_mark, rollback_problem, state_dir_problem, write_mark
from fedssl.privacy.policy import ROUND_ORDER, RoundRequest, check_noise, check_request, check_run_epsilon

MARK = HighWaterMark(seq=4, epsilon=0.75, hash="ab" * 32)
RECORDS = [{"seq": i, "hash": ("ab" * 32 if i == 4 else f"{i:064x}")} for i in range(6)]


@pytest.fixture
def key():
    return Ed25519PrivateKey.generate()


def test_mark_round_trips_and_sits_beside_the_key(tmp_path, key):
    assert highwater_path(tmp_path / "keys" / "site-a.ed25519") == tmp_path / "keys" / "site-a.ed25519.highwater"
    path = tmp_path / "m.highwater"
    assert read_mark(path, key.public_key()) is None
    write_mark(path, key, MARK)
    assert read_mark(path, key.public_key()) == MARK
    assert not list(tmp_path.glob(".*tmp"))  # written atomically


@pytest.mark.parametrize("field, value", [("seq", 3), ("epsilon", 0.1), ("hash", "cd" * 32)])
def test_an_edited_mark_fails_its_signature(tmp_path, key, field, value):
    path = tmp_path / "m.highwater"
    write_mark(path, key, MARK)
    data = json.loads(path.read_text())
    data[field] = value
    path.write_text(json.dumps(data))
    with pytest.raises(PrivacyError, match="fails its signature"):
        read_mark(path, key.public_key())


def test_a_mark_by_another_key_or_unreadable_is_refused(tmp_path, key):
    path = tmp_path / "m.highwater"
    write_mark(path, Ed25519PrivateKey.generate(), MARK)
    with pytest.raises(PrivacyError, match="fails its signature"):
        read_mark(path, key.public_key())
    path.write_text("{not json")
    with pytest.raises(PrivacyError, match="unreadable"):
        read_mark(path, key.public_key())


def test_rollback_problem():
    assert rollback_problem(MARK, RECORDS, 0.75, 1e-9) is None
    assert rollback_problem(MARK, RECORDS[:5], 0.80, 1e-9) is None  # exactly at the mark
    assert "ledger is gone" in rollback_problem(MARK, [], None, 1e-9)
    assert "ends at seq 3" in rollback_problem(MARK, RECORDS[:4], None, 1e-9)
    other = [dict(r, hash="ee" * 32) for r in RECORDS]
    assert "another ledger" in rollback_problem(MARK, other, None, 1e-9)
    assert "below" in rollback_problem(MARK, RECORDS, 0.5, 1e-9)
    assert rollback_problem(MARK, RECORDS, 0.5, 1e-9) is not None and rollback_problem(MARK, RECORDS, None, 1e-9) is None


def test_budget_raises_the_mark_with_every_record(trained_site, state_copy):
    """The mark follows the ledger's last record and the accountant's epsilon, and is read-only checked."""
    from fedssl.privacy.budget import SiteBudget

    state_dir = state_copy(trained_site.after_round2)
    budget = SiteBudget.open(state_dir, PrivacyConfig(target_epsilon=10.0, delta=DELTA))
    records = budget.ledger.records()
    mark = read_mark(budget.mark_path, budget.ledger.signing_key.public_key())
    assert (mark.seq, mark.hash) == (records[-1]["seq"], records[-1]["hash"])
    assert mark.epsilon == pytest.approx(budget.epsilon_spent, rel=1e-12)
    charge = budget.admit(RoundRequest("another-run", 1, 2, SAMPLE_RATE, 2))
    after = read_mark(budget.mark_path, budget.ledger.signing_key.public_key())
    assert after.seq == charge.ledger_seq > mark.seq and after.epsilon == pytest.approx(charge.epsilon_after, rel=1e-12)
    before = sorted(p.name for p in state_dir.iterdir())
    assert state_dir_problem(state_dir, None, None, 1e-9) is None
    assert sorted(p.name for p in state_dir.iterdir()) == before  # the preflight check writes nothing


# ---------------------------------------------------------------- policy (pure)

POLICY = PrivacyConfig(min_noise_multiplier=0.8, max_sample_rate=0.5, max_local_steps=10, max_rounds_per_run=3, max_epsilon_per_run=2.0)


def request(**changes) -> RoundRequest:
    values = dict(run_id="r", server_round=1, planned_rounds=3, sample_rate=0.1, steps=5) | changes
    return RoundRequest(**values)


@pytest.mark.parametrize(
    "changes, charged, rule",
    [
        ({}, [], None),
        ({"sample_rate": 0.5}, [], None),
        ({"sample_rate": 0.51}, [], "privacy.max_sample_rate"),
        ({"steps": 11}, [], "privacy.max_local_steps"),
        ({"planned_rounds": 4}, [], "privacy.max_rounds_per_run"),
        ({"server_round": 4}, [1, 2, 3], "privacy.max_rounds_per_run"),
        ({"server_round": 2}, [1, 2], ROUND_ORDER),
        ({"server_round": 1}, [2], ROUND_ORDER),
        ({"server_round": 3}, [1], None),
    ],
)
def test_check_request(changes, charged, rule):
    refusal = check_request(POLICY, request(**changes), charged)
    assert (refusal.rule if refusal else None) == rule
    if refusal:
        assert "\n" not in str(refusal) and str(refusal).startswith(rule)


def test_noise_floor_and_per_run_cap():
    assert check_noise(POLICY, 0.8) is None and check_noise(POLICY, 0.79).rule == "privacy.min_noise_multiplier"
    assert check_run_epsilon(POLICY, "r", 2.0, 1e-9) is None
    assert check_run_epsilon(POLICY, "r", 2.01, 1e-9).rule == "privacy.max_epsilon_per_run"
    assert check_run_epsilon(PrivacyConfig(), "r", 1e6, 1e-9) is None  # no cap by default


def test_policy_defaults():
    spec = PrivacyConfig()
    assert (spec.min_noise_multiplier, spec.max_sample_rate, spec.max_local_steps, spec.max_rounds_per_run, spec.max_epsilon_per_run) == (
        0.8, 0.5, 1000, 100, None)


def test_a_state_dir_from_before_marks_is_refused_until_sealed_once(trained_site, state_copy, tmp_path, capsys):
    import yaml

    from fedssl.cli import main as cli_main
    from fedssl.privacy.budget import SiteBudget

    state_dir = state_copy(trained_site.after_round2)
    (state_dir / "site.ed25519.highwater").unlink()  # as a site upgraded from before high-water marks has it
    spec = PrivacyConfig(target_epsilon=10.0, delta=DELTA)
    with pytest.raises(PrivacyError, match="fedssl site seal"):
        SiteBudget.open(state_dir, spec)
    site_yaml = tmp_path / "site.yaml"
    site_yaml.write_text(yaml.safe_dump({
        "site": {"name": "site-a", "id": 0}, "data": {"path": "d.npy"}, "state_dir": str(state_dir),
        "coordinator": {"address": "127.0.0.1:1", "root_certificates": "ca.crt"}, "keys": {"node_key": "n"},
    }))
    assert cli_main(["site", "seal", "--config", str(site_yaml)]) == 0
    assert "sealed" in capsys.readouterr().out
    budget = SiteBudget.open(state_dir, spec)
    assert read_mark(budget.mark_path, budget.ledger.signing_key.public_key()).epsilon == pytest.approx(budget.epsilon_spent, rel=1e-12)
    assert cli_main(["site", "seal", "--config", str(site_yaml)]) == 2  # never re-sealed by hand
    assert "never re-sealed" in capsys.readouterr().err
