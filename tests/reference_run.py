"""One real `fedssl simulate configs/experiments/digits-tiny.yaml` per test session, shared by every test
file and every xdist worker that needs a finished tiny DP run (tests/run/test_simulation.py, the
dashboard's tests, the listener scan of tests/adversarial/test_simulation_listeners.py).

A simulation costs ~45 CPU-seconds (Ray, the SuperLink, the ServerApp, two ClientApp workers): on the
2-core CI machine, three copies of the same run were three times that. The first worker to ask runs it
under a file lock in the session's shared temp dir (pytest-xdist's documented pattern); the others wait
for it and read what it left. While it runs, the run's processes are scanned for listeners (the attack
of tests/adversarial/test_simulation_listeners.py), so that scan is of this very run.

Registered by tests/conftest.py (``pytest_plugins``). The run dir is read-only for its users: a test
that writes copies it first (tests/dashboard_fixtures.py ``run_copy``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from filelock import FileLock

from listeners import processes, watch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "experiments" / "digits-tiny.yaml"
FEDSSL = str(Path(sys.executable).parent / "fedssl")
RUN_NAME = "digits-tiny"
RESULT = "result.json"
RUN_TIMEOUT_SECONDS = 900  # then killed: its users fail on its return code


@dataclass(frozen=True)
class ReferenceRun:
    dir: Path  # the finished run dir (read-only)
    returncode: int
    stdout: str
    stderr: str
    listeners: list[dict]  # every listener its processes opened: command, address, loopback, text

    def records(self, kind: str) -> list[dict]:
        lines = (self.dir / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, filter(None, lines)) if r["kind"] == kind]


def _shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's temp dir every xdist worker shares (each worker's base temp is a child of it);
    without xdist, this session's own base temp (its parent holds earlier sessions' dirs)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _simulate(where: Path) -> dict:
    output_dir = where / "runs"
    cmd = [FEDSSL, "simulate", str(TINY), "--set", f"run.output_dir={output_dir}", "--overwrite"]
    # Files, not pipes: nobody reads a pipe while the scan polls, and a full one would stall the run.
    with (where / "stdout.txt").open("w") as stdout, (where / "stderr.txt").open("w") as stderr:
        sim = subprocess.Popen(cmd, cwd=ROOT, stdout=stdout, stderr=stderr, text=True)
    # The simulation's own processes: fedssl's tree, and anything detached that carries this run's FLWR_HOME.
    marker = f"FLWR_HOME={output_dir}"
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
        _, seen = watch(lambda: processes(roots=[sim.pid], environ_contains=marker),
                        until=lambda: sim.poll() is not None or time.monotonic() > deadline)
    finally:
        if sim.poll() is None:
            sim.kill()
        sim.wait()
    return {
        "returncode": sim.returncode,
        "stdout": (where / "stdout.txt").read_text(), "stderr": (where / "stderr.txt").read_text(),
        "listeners": [{"command": item.command, "loopback": item.loopback, "text": str(item)} for item in seen],
    }


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> ReferenceRun:
    """The finished real 2-site x 2-round DP simulation of digits-tiny, evaluated and reported. Do not modify."""
    where = _shared_dir(tmp_path_factory) / "reference-run"
    where.mkdir(exist_ok=True)
    with FileLock(str(where / "lock")):
        result = where / RESULT
        if not result.exists():
            result.write_text(json.dumps(_simulate(where)))
    return ReferenceRun(dir=where / "runs" / RUN_NAME, **json.loads(result.read_text()))
