"""End to end: a `fedssl simulate` killed (SIGKILL, with every Flower and Ray process it started) once its
checkpoint of round k exists, then `fedssl simulate --resume RUN_DIR`, ends like the run never stopped.

- DP off: the same final encoder as an uninterrupted run with the same seeds (a site's plain round is
  seeded by (run seed, round, site), so only the resume can make them differ).
- DP on: each site's ε is what the uninterrupted schedule gives, every round charged exactly once at each
  site (DP noise comes from OS entropy, so encoders differ by design), and `fedssl audit` passes.
- Either way: metrics.jsonl has one record per (round, site) and the server ledger one per round and site.
"""

from __future__ import annotations

import subprocess

import pytest
import torch

from fedssl.layout import RunDir
from fedssl.run.checkpoint import load_checkpoint
from fedssl.run.server_marks import read_done
from resume_kill import (  # noqa: F401
    FEDSSL, KILL_AFTER, ROOT, ROUNDS, _args, _assert_one_record_per_round, _killed_after, _records, _resume, _run,
)

pytestmark = pytest.mark.slow


def test_killed_and_resumed_run_ends_with_the_uninterrupted_encoder(tmp_path):
    plain = ("privacy.enabled=false", "evaluation.enabled=false")
    # The uninterrupted run goes beside the one that is killed: they share nothing but the machine (the kill
    # finds its processes by the cut run's own directory), and side by side the test takes two runs' time, not three.
    log = tmp_path / "whole.log"
    with log.open("w") as out:
        whole = subprocess.Popen(_args(tmp_path, "whole", *plain), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        try:
            run_dir = tmp_path / "runs" / "cut"
            _killed_after(_args(tmp_path, "cut", *plain), run_dir, KILL_AFTER)
        finally:
            whole.wait(timeout=300)
    assert whole.returncode == 0, log.read_text()[-3000:]
    _resume(run_dir)
    expected = torch.load(tmp_path / "runs" / "whole" / "encoder.pt", weights_only=True)
    got = torch.load(run_dir / "encoder.pt", weights_only=True)
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    _assert_one_record_per_round(run_dir, num_sites=2)
    done = read_done(RunDir(run_dir))
    assert done.resumed_after >= KILL_AFTER and done.run_id == load_checkpoint(run_dir).run_id
