"""Real processes for the deployment tests: start, watch and stop `fedssl` and Flower commands.

Shared by tests/deploy/test_deploy_*.py and the adversarial deployment tests. Every process group a
test module starts is registered in its :class:`Procs` (the ``procs`` fixture) and killed at
teardown, also on failure.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ledger_files import ledger_records  # noqa: F401  (re-exported: the deployment tests read ledgers too)

FEDSSL = str(Path(sys.executable).parent / "fedssl")
FLOWER_SUPERNODE = str(Path(sys.executable).parent / "flower-supernode")


class Procs:
    """Every process group this module starts; all killed at teardown."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[subprocess.Popen] = []

    def start(self, name: str, args: list[str], env: dict | None = None) -> tuple[subprocess.Popen, Path]:
        log = self.root / "logs" / f"{name}-{len(self.started)}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        handle = log.open("wb")
        # Flower starts its helpers (flower-superexec, flwr-clientapp) by name: this venv's.
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        proc = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, "PATH": path, **(env or {})})
        handle.close()
        self.started.append(proc)
        return proc, log

    def kill_all(self) -> None:
        for proc in self.started:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
                try:
                    proc.wait(timeout=40)  # a coordinator stops its SuperLink on SIGTERM
                    break
                except subprocess.TimeoutExpired:
                    continue
        # A SuperLink runs in its own process group; if its coordinator did not get to stop
        # it, its pid file names it.
        for pid_file in self.root.parent.glob("*/coordinator/state/superlink.pid"):
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, PermissionError, ValueError):
                pass


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def stop_agent(proc: subprocess.Popen) -> int:
    """SIGTERM a site agent (graceful: it deactivates its SuperNode) and wait for it."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait(timeout=10)


@pytest.fixture(scope="module")
def procs(tmp_path_factory):
    registry = Procs(tmp_path_factory.mktemp("deploy-procs"))
    yield registry
    registry.kill_all()


def set_site(path: Path, **changes) -> None:
    data = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def site_round_records(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "site_round"]


def accountant_state(state_dir: Path) -> tuple[list, float, str]:
    """The accountant's history as tuples, with its δ and accountant kind."""
    state = json.loads((state_dir / "accountant.json").read_text())
    return [tuple(e) for e in state["history"]], state["mechanism"]["delta"], state["mechanism"]["accountant"]
