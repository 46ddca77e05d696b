"""End to end: a `fedssl simulate` killed (SIGKILL, with every Flower and Ray process it started) once its
checkpoint of round k exists, then `fedssl simulate --resume RUN_DIR`, ends like the run never stopped.

- DP off: the same final encoder as an uninterrupted run with the same seeds (a site's plain round is
  seeded by (run seed, round, site), so only the resume can make them differ).
- DP on: each site's ε is what the uninterrupted schedule gives, every round charged exactly once at each
  site (DP noise comes from OS entropy, so encoders differ by design), and `fedssl audit` passes.
- Either way: metrics.jsonl has one record per (round, site) and the server ledger one per round and site.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from fedssl.run.checkpoint import load_checkpoint
from tests.listeners import processes

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
FEDSSL = str(Path(sys.executable).parent / "fedssl")
TINY = ROOT / "configs" / "experiments" / "digits-tiny.yaml"
ROUNDS, KILL_AFTER = 3, 1


def _args(tmp_path: Path, name: str, *extra: str) -> list[str]:
    sets = [f"run.output_dir={tmp_path / 'runs'}", f"run.name={name}", f"federation.rounds={ROUNDS}", *extra]
    return [FEDSSL, "simulate", str(TINY), *[a for s in sets for a in ("--set", s)], "--quiet"]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def _killed_after(cmd: list[str], run_dir: Path, completed: int, timeout: float = 240.0) -> None:
    """Start ``cmd``; once the run's checkpoint holds round ``completed``, SIGKILL it and every process it
    started (the SuperLink runs in its own session; Ray's workers are re-parented: found by FLWR_HOME)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the run ended before it could be killed"
            if (run_dir / "checkpoint.pt").exists() and load_checkpoint(run_dir).round >= completed:
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"no checkpoint of round {completed} within {timeout:.0f} s")
    finally:
        for pid in processes(roots=[proc.pid], environ_contains=str(run_dir / ".flwr")):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        proc.wait(timeout=30)
    assert not (run_dir / "server_done.json").exists()


def _records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, filter(None, lines)) if r["kind"] == kind]


def _assert_one_record_per_round(run_dir: Path, num_sites: int) -> None:
    site_rounds = Counter((r["round"], r["site_id"]) for r in _records(run_dir, "site_round"))
    assert set(site_rounds.values()) == {1}, site_rounds
    assert sorted({r for r, _ in site_rounds}) == list(range(1, ROUNDS + 1))
    assert [r["round"] for r in _records(run_dir, "round")] == list(range(1, ROUNDS + 1))
    ledger = [json.loads(line) for line in (run_dir / "server_ledger.jsonl").read_text().splitlines() if line.strip()]
    resumed = [r["body"] for r in ledger if r["kind"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["round"] >= KILL_AFTER
    reports = Counter((r["body"]["round"], r["body"]["site_id"]) for r in ledger if r["kind"] == "round_report")
    assert len(reports) == ROUNDS * num_sites


def _resume(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    done = _run([FEDSSL, "simulate", "--resume", str(run_dir), "--quiet", *extra])
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    assert "Traceback" not in done.stderr
    return done


def test_killed_and_resumed_run_ends_with_the_uninterrupted_encoder(tmp_path):
    plain = ("privacy.enabled=false", "evaluation.enabled=false")
    whole = _run(_args(tmp_path, "whole", *plain))
    assert whole.returncode == 0, whole.stderr[-3000:]
    run_dir = tmp_path / "runs" / "cut"
    _killed_after(_args(tmp_path, "cut", *plain), run_dir, KILL_AFTER)
    _resume(run_dir)
    expected = torch.load(tmp_path / "runs" / "whole" / "encoder.pt", weights_only=True)
    got = torch.load(run_dir / "encoder.pt", weights_only=True)
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    _assert_one_record_per_round(run_dir, num_sites=2)
    done = json.loads((run_dir / "server_done.json").read_text())
    assert done["resumed_after"] >= KILL_AFTER and done["run_id"] == load_checkpoint(run_dir).run_id


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
