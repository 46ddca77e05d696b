"""Flower's processes, one home: environment, executables, ports, failure reasons, `flwr run`.

Both launchers (the simulation's private in-memory SuperLink, fedssl.run.simulation, and the
coordinator's TLS SuperLink, fedssl.deploy.coordinator) and the site agent start Flower
commands with these helpers. :class:`FlwrRun` is the one `flwr run ... --stream` child: its
output goes to the run's flwr.log, fedssl's own progress lines (and errors) are echoed once each,
and success is judged by the ServerApp's completion marker (SERVER_DONE), because `flwr run`
exits 0 even when the run failed.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedssl.errors import FedSSLError
from fedssl.fl.keys import RUN_CONFIG_PATH, RUN_COORDINATOR_DIR, RUN_DIR, RUN_RESUME
from fedssl.layout import RunDir
from fedssl.phases import mark
from fedssl.run.server_marks import stop_reason

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # this checkout: the Flower app fedssl runs by default
RESULTS_POLL_SECONDS = 0.05
# How often Flower's SuperExec looks for new ClientApp/ServerApp tasks (default 1 s).
# A supported setting: FLWR_SUPEREXEC_TASK_POLL_INTERVAL, bounds 0.01..60 s.
SUPEREXEC_POLL_SECONDS = "0.1"
# A deployment process's private FLWR_HOME, inside its own state dir (the coordinator's, each site's).
STATE_FLOWER_HOME = "flower"
FAILURE_REASON_CHARS = 400
# A line that says what went wrong, in Flower's, Ray's, gRPC's or Python's words.
_ERROR_MARKERS = ("ERROR", "Error", "error", "Exception", "exception", "Failed", "failed")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")

OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "PYTHONWARNINGS": "ignore",
}
# Ray (the simulation engine) binds its GCS, raylet and workers to all interfaces and its agents to the
# node's IP (the interface routing to the internet), all without authentication. With "cluster mode" off
# Ray takes 127.0.0.1 as the node IP and every one of its listeners follows it onto loopback.
# Flower's backend config cannot pass Ray's `_node_ip_address` (only num_cpus/num_gpus/logging), so the
# environment is the one supported switch. Forced, not a default: a simulation is never a cluster.
LOOPBACK_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# An inherited cluster address would send the simulation (data, models) to another Ray cluster or GCS store.
RAY_CLUSTER_ADDRESS_VARS = ("RAY_ADDRESS", "RAY_REDIS_ADDRESS")


class FlowerNotInstalled(FedSSLError):
    """A Flower command is missing from this environment."""


def flower_env(flwr_home: Path, *, pythonpath: Sequence[Path] = (),
               superexec_poll: str | None = SUPEREXEC_POLL_SECONDS) -> dict[str, str]:
    """The environment of a Flower command: offline, its own FLWR_HOME, this venv's executables first,
    and Ray (if the command starts it) on loopback only, never joining an inherited cluster.

    ``pythonpath`` goes before any inherited PYTHONPATH (the simulation's workers and the coordinator's
    ServerApp import fedssl from this checkout). ``superexec_poll`` is a default for
    FLWR_SUPEREXEC_TASK_POLL_INTERVAL that the caller's own environment overrides; None leaves it unset.
    """
    env = {name: value for name, value in os.environ.items() if name not in RAY_CLUSTER_ADDRESS_VARS}
    env.update(OFFLINE_ENV)
    env.update(LOOPBACK_RAY_ENV)
    env["FLWR_HOME"] = str(flwr_home)
    # Flower starts its own commands (flower-superlink, flower-superexec, flwr-clientapp, flwr-serverapp)
    # by name: they must resolve to this environment's, even when the venv is not activated.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if superexec_poll is not None:
        env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", superexec_poll)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), *filter(None, [env.get("PYTHONPATH", "")])])
    return env


def flower_bin(name: str) -> str:
    """A Flower executable from this interpreter's environment (the venv), else PATH."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        raise FlowerNotInstalled(f"the `{name}` command is not installed; run `make setup` (or pip install 'flwr[simulation]>=1.42,<1.43')")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def run_config(run_dir: Path, coordinator_dir: Path | None = None, resume: bool = False) -> str:
    """`flwr run --run-config`: where both apps find the run's resolved config and its directory
    (and the ServerApp the coordinator's state dir, in a deployment; whether to resume from its checkpoint)."""
    extra = f" {RUN_COORDINATOR_DIR}='{coordinator_dir}'" if coordinator_dir is not None else ""
    extra += f" {RUN_RESUME}=true" if resume else ""
    return f"{RUN_CONFIG_PATH}='{RunDir(run_dir).config}' {RUN_DIR}='{run_dir}'{extra}"


def failure_reason(text: str) -> str:
    """The line of a Flower command's output that says why it failed: the last one naming an error,
    else the last line; colours stripped, at most FAILURE_REASON_CHARS characters."""
    lines = [line for line in (_ANSI.sub("", raw).strip() for raw in text.splitlines()) if line]
    for line in reversed(lines):
        if any(marker in line for marker in _ERROR_MARKERS):
            return line[-FAILURE_REASON_CHARS:]
    return lines[-1][-FAILURE_REASON_CHARS:] if lines else "no output"


def progress_message(line: str) -> str | None:
    """Our own progress lines (Flower logs each twice, with different prefixes) and errors."""
    if "fedssl:" in line:
        return "fedssl:" + line.split("fedssl:", 1)[1].rstrip()
    if "ERROR" in line or "Traceback" in line:
        return line.rstrip()
    return None


def command_lines() -> Iterator[tuple[int, str]]:
    """(pid, command line) of every live process this user can see (Linux /proc)."""
    for proc_dir in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        yield int(proc_dir.name), cmdline


def signal_pid(pid: int, sig: int) -> None:
    """Send ``sig`` to ``pid``; a process that is already gone (or not ours to signal) is left alone."""
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie our own child left counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


# Lines of `flwr run --stream` that end a start-up phase (benchmarks/federation_overhead.py).
_MILESTONES = {
    "Using SuperLink:": "superlink_ready",
    "Successfully started run": "run_submitted",  # FAB built and uploaded
    "Starting Flower Simulation": "simulation_started",
}


def _mark_milestone(line: str) -> None:
    for needle, phase in _MILESTONES.items():
        if needle in line:
            mark(phase)
            return


@dataclass(frozen=True)
class RunOutcome:
    run_dir: Path
    seconds: float  # from the start until :meth:`FlwrRun.finish` had cleaned up
    flwr_exit_seconds: float  # from the start until `flwr run` exited (however late finish() was called)


class FlwrRun:
    """One `flwr run ... --stream` in progress, started at once.

    The ServerApp's last act is to write SERVER_DONE; from then on the run's results (final encoder,
    ledgers, metrics) are complete, while Flower still shuts down (a simulation stops its Ray workers
    and Ray, flushes its log upload, pushes the run status and lets `flwr run` notice it: ~3-4 s).
    :meth:`wait_for_results` returns at SERVER_DONE so the caller can evaluate meanwhile;
    :meth:`finish` waits for `flwr run` to exit, then ``on_exit`` cleans up (stops the SuperLink).
    :meth:`abort` kills it instead, for a caller that fails or is interrupted before the results.
    Failures are raised as ``error`` (a FedSSLError subclass).
    """

    def __init__(self, cmd: Sequence[str], *, run_dir: Path, env: dict[str, str], cwd: Path, stream: bool,
                 echo: Callable[[str], None], on_exit: Callable[[], None], error: type[FedSSLError]) -> None:
        self.run_dir = Path(run_dir)
        self._paths = RunDir(self.run_dir)
        self._echo, self._stream, self._on_exit, self._error = echo, stream, on_exit, error
        self._started = time.perf_counter()
        self._flwr_exit_s = 0.0
        self._outcome: RunOutcome | None = None
        self._closed = False
        try:
            self._log_file = self._paths.flwr_log.open("w")  # opened here: a failure is raised, not lost in the reader
            try:
                self._proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            except BaseException:
                self._log_file.close()
                raise
        except BaseException:
            self._close()
            raise
        self._reader = threading.Thread(target=self._read_output, name="flwr-run-output", daemon=True)
        self._reader.start()

    def _read_output(self) -> None:
        shown: set[str] = set()
        assert self._proc.stdout is not None
        with self._log_file as log_file:
            for line in self._proc.stdout:
                log_file.write(line)
                log_file.flush()
                _mark_milestone(line)
                message = progress_message(line)
                if self._stream and message and message not in shown:
                    shown.add(message)
                    self._echo(message)
        self._flwr_exit_s = time.perf_counter() - self._started  # its output closes as it exits

    def wait_for_results(self, timeout: float | None = None) -> float:
        """Block until the ServerApp has written its results; seconds since the start.

        Raises (after cleaning up) if `flwr run` exits first or ``timeout`` seconds pass."""
        done = self._paths.server_done
        while not done.exists():
            if self._paths.server_failed.exists() or (self._proc.poll() is not None and not done.exists()):
                self.finish()  # raises: no SERVER_DONE (the ServerApp's own reason when it stopped the run)
            if timeout is not None and time.perf_counter() - self._started > timeout:
                self.abort()
                raise self._error(f"the run did not finish within {timeout:.0f} s; log: {self._paths.flwr_log}")
            time.sleep(RESULTS_POLL_SECONDS)
        mark("results_ready")
        return time.perf_counter() - self._started

    def finish(self) -> RunOutcome:
        """Wait for `flwr run` to exit and clean up; judge the run by SERVER_DONE. Idempotent once it succeeded."""
        if self._outcome is not None:
            return self._outcome
        try:
            code = self._proc.wait()
            self._reader.join()
        finally:
            self._close()
        mark("driver_done")
        seconds = time.perf_counter() - self._started
        log = self._paths.flwr_log
        stopped = None if self._paths.server_done.exists() else stop_reason(self._paths)
        if stopped is not None:
            raise self._error(stopped)
        if not self._paths.server_done.exists():
            raise self._error(f"federated run failed (flwr exit {code}): {failure_reason(log.read_text(errors='replace'))}; full log: {log}")
        if code != 0:
            # The results were complete before Flower's own shutdown went wrong: keep them, say so.
            self._echo(f"fedssl: warning: `flwr run` exited with code {code} after the run had finished; results are complete; log: {log}")
        self._outcome = RunOutcome(run_dir=self.run_dir, seconds=seconds, flwr_exit_seconds=self._flwr_exit_s)
        return self._outcome

    def abort(self) -> None:
        """Kill `flwr run` (if it still runs) and clean up; no outcome. Safe after finish()."""
        if self._closed:
            return
        try:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            self._reader.join()
        finally:
            self._close()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._on_exit()
