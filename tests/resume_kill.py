"""Kill-and-resume helpers shared by tests/run/test_resume_kill*.py (two files, so the two slow runs go to
two test workers)."""


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

from fedssl.run.checkpoint import load_checkpoint
from tests.listeners import processes

ROOT = Path(__file__).resolve().parents[1]
FEDSSL = str(Path(sys.executable).parent / "fedssl")
TINY = ROOT / "configs" / "experiments" / "digits-tiny.yaml"
ROUNDS, KILL_AFTER = 3, 1
# Steps per site round: enough that a round takes seconds, so the kill (within ~0.5 s of the checkpoint of round
# KILL_AFTER appearing) lands before any site has finished the next round. digits-tiny's 3 steps took 0.2 s, and
# a site that had already trained the next round keeps its pretext head, so the encoders differed (a flake).
LOCAL_STEPS = 60


def _args(tmp_path: Path, name: str, *extra: str) -> list[str]:
    sets = [f"run.output_dir={tmp_path / 'runs'}", f"run.name={name}", f"federation.rounds={ROUNDS}",
            f"training.local_steps={LOCAL_STEPS}", *extra]
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


