"""The DP half of tests/run/test_resume_kill.py (its docstring says what both check): a killed and resumed DP
run charges each round once at each site, with the uninterrupted schedule's ε, and audits."""

from __future__ import annotations


import pytest

from fedssl.run.checkpoint import load_checkpoint
from resume_kill import (  # noqa: F401
    FEDSSL, KILL_AFTER, ROUNDS, _args, _assert_one_record_per_round, _killed_after, _records, _resume, _run,
)

pytestmark = pytest.mark.slow


def test_killed_and_resumed_dp_run_charges_each_round_once_and_audits(tmp_path):
    from fedssl.privacy.analysis import epsilon_of
    from fedssl.privacy.ledger import Ledger
    from fedssl.privacy.records import DP_EVENT, DPEvent, bodies

    run_dir = tmp_path / "runs" / "dp"
    _killed_after(_args(tmp_path, "dp"), run_dir, KILL_AFTER)
    run_id = load_checkpoint(run_dir).run_id
    done = _resume(run_dir)
    assert "report written" in done.stdout and (run_dir / "evaluation.json").is_file()
    _assert_one_record_per_round(run_dir, num_sites=2)
    last = {r["site_id"]: r for r in _records(run_dir, "site_round") if r["round"] == ROUNDS}
    for site in (0, 1):
        events = [DPEvent(**b) for b in bodies(Ledger(run_dir / "sites" / f"site-{site:03d}").records(), DP_EVENT)]
        assert [(e.run_id, e.round) for e in events] == [(run_id, r) for r in range(1, ROUNDS + 1)]  # one run, each round once
        # The uninterrupted schedule's ε: ROUNDS equal charges at the site's one σ and sample rate.
        e = events[0]
        uninterrupted = epsilon_of([(e.noise_multiplier, e.sample_rate, e.steps)] * ROUNDS, e.delta, e.accountant)
        assert events[-1].epsilon_after == pytest.approx(uninterrupted, rel=1e-9)
        assert last[site]["epsilon"] == pytest.approx(uninterrupted, rel=1e-9)
    audit = _run([FEDSSL, "audit", str(run_dir)])
    assert audit.returncode == 0, audit.stdout[-3000:] + audit.stderr[-3000:]
