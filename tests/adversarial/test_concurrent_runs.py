"""Attack: two trainings at once on one site's state dir spend more than its budget.

Issue 12, point 5: ``charge()`` checked against the history read at ``open()``, so two runs that
both opened the budget before either charged each saw room for the last round and both released
(reproduced on 740c140: released ε 10.9 against a target of 8). The charge now holds an exclusive
lock and re-reads the ledger under it (fedssl.privacy.budget): exactly one of the two is charged,
the other is refused, and the ledger never goes over the target.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import DELTA, LOCAL_STEPS, SAMPLE_RATE
from fedssl.config import PrivacyConfig
from fedssl.errors import BudgetExhaustedError
from fedssl.privacy.budget import SiteBudget
from ledger_files import accountant_history, dp_events, opacus_epsilon


def _tight_spec(trained_site) -> PrivacyConfig:
    """A target with room for exactly one more round like round 2 (not two)."""
    one_more = trained_site.round2.epsilon
    history = accountant_history(trained_site.after_round1)
    two_more = opacus_epsilon([*history, history[0], history[0]], DELTA)
    return PrivacyConfig(target_epsilon=(one_more + two_more) / 2, delta=DELTA, max_grad_norm=1.0)


def test_two_runs_opened_together_cannot_both_spend_the_last_round(trained_site, state_copy):
    """The attack: two trainings on one state dir open the budget before either charges. Each saw
    room for one more round; charged against what it read at open, both would release, overspending."""
    state_dir = state_copy(trained_site.after_round1)
    spec = _tight_spec(trained_site)
    first, second = SiteBudget.open(state_dir, spec), SiteBudget.open(state_dir, spec)
    first.charge(run_id="run-a", server_round=2, sample_rate=SAMPLE_RATE, steps=LOCAL_STEPS)
    with pytest.raises(BudgetExhaustedError):
        second.charge(run_id="run-b", server_round=2, sample_rate=SAMPLE_RATE, steps=LOCAL_STEPS)
    assert [e["run_id"] for e in dp_events(state_dir)][-1] == "run-a" and len(dp_events(state_dir)) == 2
    assert SiteBudget.open(state_dir, spec).epsilon_spent <= spec.target_epsilon


def test_two_processes_charging_at_once_never_overspend(trained_site, state_copy):
    """The same race with real processes: both open, wait at a barrier, then charge at once."""
    state_dir = state_copy(trained_site.after_round1)
    spec = _tight_spec(trained_site)
    barrier = state_dir.parent / "go"
    code = (
        "import sys, time\nfrom pathlib import Path\n"
        "from fedssl.config import PrivacyConfig\nfrom fedssl.errors import BudgetExhaustedError\n"
        "from fedssl.privacy.budget import SiteBudget\n"
        f"b = SiteBudget.open(Path(sys.argv[1]), PrivacyConfig(target_epsilon={spec.target_epsilon!r}, delta={DELTA!r}, max_grad_norm=1.0))\n"
        "print('open', flush=True)\n"
        "while not Path(sys.argv[2]).exists(): time.sleep(0.01)\n"
        f"try:\n    b.charge(run_id=sys.argv[3], server_round=2, sample_rate={SAMPLE_RATE!r}, steps={LOCAL_STEPS})\n    print('charged')\n"
        "except BudgetExhaustedError:\n    print('refused')\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(state_dir), str(barrier), f"run-{i}"], stdout=subprocess.PIPE, text=True)
             for i in range(2)]
    for proc in procs:
        assert proc.stdout.readline().strip() == "open"
    barrier.touch()
    outcomes = sorted(proc.communicate(timeout=120)[0].strip() for proc in procs)
    assert outcomes == ["charged", "refused"]
    assert len(dp_events(state_dir)) == 2 and SiteBudget.open(state_dir, spec).epsilon_spent <= spec.target_epsilon
