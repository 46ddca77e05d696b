"""A site's privacy budget survives restarts, lost files, tampering and crashes — and is never under-counted.

Each test works on a private copy of a real site state dir (accountant.json, the signed
ledger.jsonl and its key) left by a real 2-round DP training run (``trained_site``).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import fedssl.privacy.budget as budget_module
import fedssl.training.local as local_module
from conftest import DELTA, LOCAL_STEPS, SAMPLE_RATE, TARGET_EPSILON
from fedssl.errors import BudgetExhaustedError, PrivacyError
from fedssl.config import PrivacyConfig
from fedssl.privacy.budget import SiteBudget
from fedssl.privacy.ledger import Ledger
from fedssl.training.local import STATUS_REFUSED, train_round
from ledger_files import accountant_history, dp_events, ledger_records, opacus_epsilon

SPEC = PrivacyConfig(target_epsilon=TARGET_EPSILON, delta=DELTA, max_grad_norm=1.0)


class SimulatedCrash(BaseException):
    """The process dies here (BaseException: no `except Exception` on the way may swallow it)."""


@pytest.fixture
def no_training(monkeypatch):
    """A tripwire: the test fails if any DP-SGD step is attempted."""

    def tripwire(*args, **kwargs):
        raise AssertionError("the site trained although it must not")

    monkeypatch.setattr(local_module, "_run_steps", tripwire)


# ------------------------------------------------------------------ restarts


def test_reopened_budget_keeps_epsilon(trained_site, state_copy):
    state_dir = state_copy(trained_site.after_round2)
    budget = SiteBudget.open(state_dir, SPEC)
    assert budget.epsilon_spent == pytest.approx(trained_site.round2.epsilon, rel=1e-12)
    assert budget.steps_taken == 2 * LOCAL_STEPS
    assert budget.noise_multiplier == accountant_history(trained_site.after_round2)[0][0]


def test_restarted_site_continues_where_it_stopped(trained_site, state_copy, digits_site, make_plan, make_site):
    """Round 2 in a fresh call on round 1's state dir spends exactly what an uninterrupted run spends."""
    state_dir = state_copy(trained_site.after_round1)
    result = train_round(digits_site, trained_site.round1.encoder_state, make_plan(server_round=2), make_site(state_dir))
    assert result.epsilon == pytest.approx(trained_site.round2.epsilon, rel=1e-12)
    assert result.epsilon > trained_site.round1.epsilon
    assert accountant_history(state_dir) == accountant_history(trained_site.after_round2)


@pytest.mark.slow
def test_epsilon_survives_a_process_restart(trained_site, state_copy):
    state_dir = state_copy(trained_site.after_round2)
    code = (
        "import sys; from pathlib import Path\n"
        "from fedssl.config import PrivacyConfig\nfrom fedssl.privacy.budget import SiteBudget\n"
        f"b = SiteBudget.open(Path(sys.argv[1]), PrivacyConfig(target_epsilon={TARGET_EPSILON!r}, delta={DELTA!r}, max_grad_norm=1.0))\n"
        "print(repr(b.epsilon_spent), b.steps_taken)\n"
    )
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code, str(state_dir)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    epsilon, steps = done.stdout.split()
    assert float(epsilon) == pytest.approx(trained_site.round2.epsilon, rel=1e-12)
    assert int(steps) == 2 * LOCAL_STEPS


# ------------------------------------------------------------------ refusals


def test_exhausted_budget_refuses_and_never_trains(trained_site, state_copy, digits_site, make_plan, make_site, no_training):
    state_dir = state_copy(trained_site.after_round2)
    result = train_round(digits_site, trained_site.round2.encoder_state, make_plan(server_round=3), make_site(state_dir))
    assert result.status == STATUS_REFUSED
    assert result.encoder_state is None
    assert result.steps == 0
    assert result.epsilon == pytest.approx(trained_site.round2.epsilon, rel=1e-12)
    assert "budget exhausted" in result.reason
    # nothing was charged, the refusal is on the record
    assert accountant_history(state_dir) == accountant_history(trained_site.after_round2)
    assert len(dp_events(state_dir)) == 2
    last = ledger_records(state_dir)[-1]
    assert last["kind"] == "refusal"
    assert last["body"]["round"] == 3
    assert last["body"]["epsilon_spent"] == pytest.approx(trained_site.round2.epsilon, rel=1e-12)


def test_budget_too_small_for_round_two_refuses_it(trained_site, state_copy, digits_site, make_plan, make_site, no_training):
    """The operator lowers the budget below what round 2 needs: round 2 is refused, not trained."""
    state_dir = state_copy(trained_site.after_round1)
    lowered = trained_site.round1.epsilon * 1.01
    assert lowered < trained_site.round2.epsilon
    site = make_site(state_dir, target_epsilon=lowered)
    result = train_round(digits_site, trained_site.round1.encoder_state, make_plan(server_round=2), site)
    assert result.status == STATUS_REFUSED and result.encoder_state is None
    assert result.epsilon == pytest.approx(trained_site.round1.epsilon, rel=1e-12)
    assert result.target_epsilon == lowered
    kinds = [r["kind"] for r in ledger_records(state_dir)]
    assert kinds[-2:] == ["budget", "refusal"]  # the budget change, then the refusal
    assert len(dp_events(state_dir)) == 1


def test_charge_refuses_with_budget_exhausted_error(trained_site, state_copy):
    budget = SiteBudget.open(state_copy(trained_site.after_round2), SPEC)
    with pytest.raises(BudgetExhaustedError, match="budget exhausted"):
        budget.charge(run_id="r", server_round=3, sample_rate=SAMPLE_RATE, steps=1)


# ------------------------------------------------------------------ lost and tampered files


def test_deleted_accountant_is_rebuilt_from_the_ledger(trained_site, state_copy):
    state_dir = state_copy(trained_site.after_round2)
    (state_dir / "accountant.json").unlink()
    budget = SiteBudget.open(state_dir, SPEC)
    assert budget.epsilon_spent > 0
    assert budget.epsilon_spent == pytest.approx(trained_site.round2.epsilon, rel=1e-12)
    assert accountant_history(state_dir) == accountant_history(trained_site.after_round2)
    assert ledger_records(state_dir)[-1]["kind"] == "recovery"


def test_deleted_accountant_then_next_round_is_still_refused(trained_site, state_copy, digits_site, make_plan, make_site, no_training):
    state_dir = state_copy(trained_site.after_round2)
    (state_dir / "accountant.json").unlink()
    result = train_round(digits_site, trained_site.round2.encoder_state, make_plan(server_round=3), make_site(state_dir))
    assert result.status == STATUS_REFUSED


def _fewer_steps(state):
    state["history"][0][2] = 1


def _more_noise(state):
    state["history"][1][0] *= 10


def _smaller_sample_rate(state):
    state["history"][0][1] /= 2


@pytest.mark.parametrize("tamper", [_fewer_steps, _more_noise, _smaller_sample_rate])
def test_tampered_accountant_that_disagrees_with_the_ledger_is_refused(trained_site, state_copy, digits_site, make_plan, make_site, no_training, tamper):
    state_dir = state_copy(trained_site.after_round2)
    state = json.loads((state_dir / "accountant.json").read_text())
    tamper(state)
    (state_dir / "accountant.json").write_text(json.dumps(state))
    with pytest.raises(PrivacyError, match="disagree"):
        SiteBudget.open(state_dir, SPEC)
    with pytest.raises(PrivacyError):
        train_round(digits_site, trained_site.round1.encoder_state, make_plan(server_round=2), make_site(state_dir))


def test_accountant_cut_short_is_replayed_from_the_ledger(trained_site, state_copy):
    """Dropping events from accountant.json cannot lower epsilon: the ledger puts them back."""
    state_dir = state_copy(trained_site.after_round2)
    state = json.loads((state_dir / "accountant.json").read_text())
    state["history"] = state["history"][:1]
    (state_dir / "accountant.json").write_text(json.dumps(state))
    budget = SiteBudget.open(state_dir, SPEC)
    assert budget.epsilon_spent == pytest.approx(trained_site.round2.epsilon, rel=1e-12)
    assert accountant_history(state_dir) == accountant_history(trained_site.after_round2)


def test_accountant_ahead_of_the_ledger_is_refused(trained_site, state_copy):
    """The ledger is written first, so extra accountant events can only be tampering: a
    later rebuild from the ledger would under-count them, so the site refuses now."""
    state_dir = state_copy(trained_site.after_round2)
    state = json.loads((state_dir / "accountant.json").read_text())
    state["history"].append(list(state["history"][-1]))
    (state_dir / "accountant.json").write_text(json.dumps(state))
    with pytest.raises(PrivacyError, match="ledger lacks"):
        SiteBudget.open(state_dir, SPEC)


def test_unreadable_accountant_is_refused(trained_site, state_copy):
    state_dir = state_copy(trained_site.after_round2)
    (state_dir / "accountant.json").write_text('{"version": 1, "mechanism": ')
    with pytest.raises(PrivacyError, match="unreadable") as refused:
        SiteBudget.open(state_dir, SPEC)
    # The fix it names works: moved aside, the file is rebuilt from the signed ledger, not restarted at 0.
    assert "move it aside" in str(refused.value)
    spent = SiteBudget.open(state_copy(trained_site.after_round2), SPEC).epsilon_spent
    (state_dir / "accountant.json").rename(state_dir / "accountant.json.bad")
    assert SiteBudget.open(state_dir, SPEC).epsilon_spent == pytest.approx(spent, rel=1e-12)


# ------------------------------------------------------------------ crashes


def test_crash_after_charge_before_send_over_counts(trained_site, state_copy, digits_site, make_plan, make_site, monkeypatch):
    """Charged, then the process dies before training finished and before anything was sent."""
    state_dir = state_copy(trained_site.after_round1)

    def crash(*args, **kwargs):
        raise SimulatedCrash

    monkeypatch.setattr(local_module, "_run_steps", crash)
    with pytest.raises(SimulatedCrash):
        train_round(digits_site, trained_site.round1.encoder_state, make_plan(server_round=2), make_site(state_dir))
    monkeypatch.undo()
    true_spend = trained_site.round1.epsilon  # nothing of round 2 left the site
    restarted = SiteBudget.open(state_dir, SPEC)
    assert restarted.epsilon_spent >= true_spend
    assert restarted.epsilon_spent == pytest.approx(trained_site.round2.epsilon, rel=1e-12)  # round 2 stays charged
    assert dp_events(state_dir)[-1]["round"] == 2


@pytest.mark.parametrize("crash_after", ["save_accountant", "ledger_append"])
def test_crash_between_the_two_writes_of_a_charge_never_under_counts(trained_site, state_copy, monkeypatch, crash_after):
    """Whichever of accountant.json / ledger.jsonl a charge writes first, a crash after that write,
    a restart, one more round and then the loss of accountant.json must not lose the crashed round."""
    state_dir = state_copy(trained_site.after_round1)
    spec = PrivacyConfig(target_epsilon=10 * TARGET_EPSILON, delta=DELTA, max_grad_norm=1.0)  # room for two more rounds
    real_save, real_append = budget_module.save_accountant, Ledger.append

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise SimulatedCrash

    def append_then_crash(self, kind, body):
        record = real_append(self, kind, body)
        if kind == "dp_event":
            raise SimulatedCrash
        return record

    budget = SiteBudget.open(state_dir, spec)
    if crash_after == "save_accountant":
        monkeypatch.setattr(budget_module, "save_accountant", save_then_crash)
    else:
        monkeypatch.setattr(Ledger, "append", append_then_crash)
    with pytest.raises(SimulatedCrash):
        budget.charge(run_id="r", server_round=2, sample_rate=SAMPLE_RATE, steps=LOCAL_STEPS)
    monkeypatch.undo()

    restarted = SiteBudget.open(state_dir, spec)
    crashed_round = (accountant_history(trained_site.after_round1)[0][0], SAMPLE_RATE, LOCAL_STEPS)
    charged_so_far = [crashed_round, crashed_round]
    assert restarted.epsilon_spent >= opacus_epsilon(charged_so_far, DELTA) * (1 - 1e-12)
    restarted.charge(run_id="r", server_round=3, sample_rate=SAMPLE_RATE / 2, steps=LOCAL_STEPS)
    all_charges = charged_so_far + [(crashed_round[0], SAMPLE_RATE / 2, LOCAL_STEPS)]

    (state_dir / "accountant.json").unlink()
    rebuilt = SiteBudget.open(state_dir, spec)
    assert rebuilt.epsilon_spent >= opacus_epsilon(all_charges, DELTA) * (1 - 1e-12)
    assert len(dp_events(state_dir)) >= 3


# ------------------------------------------------------------------ accounting fast path


@pytest.mark.parametrize("history", [
    [(1.1, 0.25, 20)],
    [(1.1, 0.25, 20)] * 10,
    [(0.8, 0.25, 20), (0.8, 0.2, 20), (2.5, 0.01, 400)],
])
def test_rdp_epsilon_is_bit_identical_to_opacus(history):
    """fedssl's cached per-(σ, q) RDP path (fedssl.privacy.analysis) changes no ε."""
    from fedssl.privacy.analysis import epsilon_of

    assert epsilon_of(history, DELTA) == opacus_epsilon(history, DELTA)
    assert epsilon_of(history, DELTA) == opacus_epsilon(history, DELTA)  # again, from the cache
