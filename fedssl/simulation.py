"""Run a whole federation on one machine through Flower's Simulation Engine (`flwr run`).

The simulation is the real Flower path — ServerApp, ClientApps in Ray workers, records on
the wire — driven offline: a private FLWR_HOME, telemetry, update checks and runtime
dependency installation off. `flwr run` exits 0 even when the run failed, so success
is judged from the server's completion marker (SERVER_DONE), written once the results are complete;
the caller may use them while Flower is still shutting down (:class:`FederationRun`).

`flwr run` is pointed at a staged copy of the app (:func:`stage_app`): the same files Flower would
put in the FAB, without the checkout's .venv, runs/ and .git, which `flwr run` would otherwise walk
file by file before filtering them out (~47k files: 3-6 s of every run's start-up).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fedssl.config import ExperimentConfig, save_config
from fedssl.errors import FedSSLError
from fedssl.fl.keys import RUN_CONFIG_PATH, RUN_DIR
from fedssl.layout import SERVER_DONE
from fedssl.phases import mark

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RESULTS_POLL_SECONDS = 0.05
RESOLVED_CONFIG = "config.yaml"
FLWR_LOG = "flwr.log"
CONNECTION = "fedssl-sim"
APP_STAGE_DIR = "app-source"  # under the run's private FLWR_HOME; removed once the run ends
# Never part of a FAB: Flower's own exclusions (.venv, .flwr, __pycache__) and git's internals.
NEVER_IN_FAB = frozenset({".venv", ".flwr", "__pycache__", ".git"})

OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "PYTHONWARNINGS": "ignore",
}


class SimulationError(FedSSLError):
    """The federated run did not complete."""


@dataclass(frozen=True)
class SimulationOutcome:
    run_dir: Path
    seconds: float  # from the start until :meth:`FederationRun.finish` had cleaned up
    flwr_exit_seconds: float  # from the start until `flwr run` exited (however late finish() was called)


def flower_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    env["FLWR_HOME"] = str(flwr_home)
    # `flwr run` starts `flower-superlink` from PATH: make it this interpreter's, so
    # `.venv/bin/fedssl` works without an activated venv.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # Workers must import fedssl, clients/ and server/ from this checkout.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH", "")]))
    return env


def prepare_run_dir(config: ExperimentConfig, overwrite: bool) -> Path:
    run_dir = config.run_dir().resolve()
    if run_dir.exists():
        if not overwrite:
            raise FedSSLError(
                f"run dir {run_dir} exists; pick another run.name (--set run.name=...) or pass --overwrite to replace it"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    save_config(config, run_dir / RESOLVED_CONFIG)
    return run_dir


def run_federation(config: ExperimentConfig, run_dir: Path, stream: bool = True) -> SimulationOutcome:
    """Submit the run to a local simulation SuperLink and wait until Flower has fully exited."""
    run = start_federation(config, run_dir, stream=stream)
    run.wait_for_results()
    return run.finish()


def start_federation(config: ExperimentConfig, run_dir: Path, stream: bool = True) -> FederationRun:
    """Start `flwr run` against a private local simulation SuperLink; returns at once."""
    flwr = shutil.which("flwr", path=str(Path(sys.executable).parent)) or shutil.which("flwr")
    if flwr is None:
        raise SimulationError("the `flwr` command is not installed; run `make setup` (or pip install 'flwr[simulation]>=1.42,<1.43')")
    flwr_home = run_dir / ".flwr"
    flwr_home.mkdir(exist_ok=True)
    # A private, in-memory simulation SuperLink on free ports: runs never collide with each
    # other (or with a SuperLink another checkout left behind), and it is stopped afterwards.
    (flwr_home / "config.toml").write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = ":local-in-memory:"\n')
    env = flower_env(flwr_home)
    fleet_port, control_port = free_port(), free_port()
    env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(fleet_port)
    env["FLWR_LOCAL_CONTROL_API_PORT"] = str(control_port)
    sim = config.simulation
    federation = (
        f"num-supernodes={config.federation.num_sites} "
        f"client-resources-num-cpus={_toml_number(sim.client_cpus)} "
        f"client-resources-num-gpus=0"
    )
    run_config = f"{RUN_CONFIG_PATH}='{run_dir / RESOLVED_CONFIG}' {RUN_DIR}='{run_dir}'"
    mark("driver_start")
    return FederationRun(flwr, run_dir, flwr_home, env, control_port, federation, run_config, stream)


class FederationRun:
    """One `flwr run` in progress.

    The ServerApp's last act is to write SERVER_DONE; from then on the run's results (final encoder,
    ledgers, metrics) are complete, while Flower still stops its Ray workers and Ray, flushes its log
    upload (a fixed 1 s wait), pushes the run status and lets `flwr run` notice it (~3-4 s in all).
    :meth:`wait_for_results` returns at SERVER_DONE so the caller can evaluate meanwhile;
    :meth:`finish` waits for Flower to exit and cleans up. `flwr run` exits 0 even when the run failed,
    so SERVER_DONE, not the exit code, is what says the run succeeded.
    """

    def __init__(self, flwr: str, run_dir: Path, flwr_home: Path, env: dict[str, str], control_port: int,
                 federation: str, run_config: str, stream: bool) -> None:
        self.run_dir = run_dir
        self._control_port = control_port
        self._started = time.perf_counter()
        self._log_path = run_dir / FLWR_LOG
        self._log_file = self._log_path.open("w")  # opened here, so a failure is raised, not lost in the reader thread
        self._app_dir = stage_app(PROJECT_ROOT, flwr_home / APP_STAGE_DIR)
        self._stream = stream
        cmd = [flwr, "run", str(self._app_dir), CONNECTION, "--stream", "--run-config", run_config, "--federation-config", federation]
        try:
            self._proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        except OSError:
            self._log_file.close()
            self._cleanup()
            raise
        self._flwr_exit_s = 0.0
        self._reader = threading.Thread(target=self._read_output, name="flwr-run-output", daemon=True)
        self._reader.start()
        self._outcome: SimulationOutcome | None = None

    def _read_output(self) -> None:
        shown: set[str] = set()
        assert self._proc.stdout is not None
        with self._log_file as log_file:
            for line in self._proc.stdout:
                log_file.write(line)
                log_file.flush()
                _mark_milestone(line)
                message = _progress_message(line)
                if self._stream and message and message not in shown:
                    shown.add(message)
                    print(message, flush=True)
        self._flwr_exit_s = time.perf_counter() - self._started  # its output closes as it exits

    def wait_for_results(self) -> float:
        """Block until the ServerApp has written its results; seconds since the start.

        Raises SimulationError (after cleaning up) if Flower exits first."""
        done = self.run_dir / SERVER_DONE
        while not done.exists():
            if self._proc.poll() is not None and not done.exists():
                self.finish()  # raises: no SERVER_DONE
            time.sleep(RESULTS_POLL_SECONDS)
        mark("results_ready")
        return time.perf_counter() - self._started

    def finish(self) -> SimulationOutcome:
        """Wait for Flower to exit, stop the SuperLink, remove the staged app; idempotent."""
        if self._outcome is not None:
            return self._outcome
        try:
            code = self._proc.wait()
            self._reader.join()
        finally:
            self._cleanup()
        mark("driver_done")
        seconds = time.perf_counter() - self._started
        if not (self.run_dir / SERVER_DONE).exists():
            raise SimulationError(f"federated run failed (flwr exit {code}): {_failure_reason(self._log_path)}; full log: {self._log_path}")
        if code != 0:
            # The results were complete before Flower's own shutdown went wrong: keep them, say so.
            print(f"fedssl: warning: `flwr run` exited with code {code} after the run had finished; "
                  f"results are complete; log: {self._log_path}", flush=True)
        self._outcome = SimulationOutcome(run_dir=self.run_dir, seconds=seconds, flwr_exit_seconds=self._flwr_exit_s)
        return self._outcome

    def _cleanup(self) -> None:
        stop_local_superlink(self._control_port)
        shutil.rmtree(self._app_dir, ignore_errors=True)


def stage_app(project: Path, dest: Path) -> Path:
    """Copy the Flower app at ``project`` to ``dest``, minus what can never be in its FAB.

    Skipped: directories git ignores (.gitignore at the top, e.g. .venv/ and runs/) and
    :data:`NEVER_IN_FAB`. Everything else is copied as is and `flwr run` applies all of its own
    rules to the copy, so the FAB (and its hash) is the one `flwr run <project>` builds; only the
    walk over the ignored trees is saved. Without a readable .gitignore, only NEVER_IN_FAB is skipped.
    """
    project = project.resolve()
    ignored = _gitignore_matcher(project / ".gitignore")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for dirpath, dirnames, filenames in os.walk(project, followlinks=False):
        here = Path(dirpath)
        rel_dir = here.relative_to(project)
        dirnames[:] = [
            d for d in dirnames
            if d not in NEVER_IN_FAB and not (here / d).is_symlink() and not ignored((rel_dir / d).as_posix() + "/")
        ]
        for name in filenames:
            source = here / name
            rel = (rel_dir / name).as_posix()
            if source.is_symlink() or ignored(rel):  # `flwr run` skips symlinks too
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    return dest


def _gitignore_matcher(path: Path):
    try:
        import warnings

        import pathspec  # a dependency of flwr; the same matcher (and pattern style) its FAB builder uses

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            spec = pathspec.PathSpec.from_lines("gitwildmatch", path.read_text().splitlines())
    except (ImportError, OSError, ValueError):
        return lambda rel: False
    return spec.match_file


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


def _progress_message(line: str) -> str | None:
    """Our own progress lines (Flower logs each twice, with different prefixes) and errors."""
    if "fedssl:" in line:
        return "fedssl:" + line.split("fedssl:", 1)[1].rstrip()
    if "ERROR" in line or "Traceback" in line:
        return line.rstrip()
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_local_superlink(control_port: int, grace_seconds: float = 5.0) -> None:
    """Stop the SuperLink `flwr run` started in the background (and its SuperExec child), and wait
    until they are gone (SIGKILL after ``grace_seconds``): a finished run leaves no process behind."""
    marker = f"127.0.0.1:{control_port}"
    pids = [pid for pid, cmdline in command_lines() if "flower-superlink" in cmdline and marker in cmdline]
    for pid in pids:
        signal_pid(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while pids and time.monotonic() < deadline:
        time.sleep(0.05)
        pids = [pid for pid in pids if _alive(pid)]
    for pid in pids:
        signal_pid(pid, signal.SIGKILL)


def command_lines():
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


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie our own child left counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _failure_reason(log_path: Path) -> str:
    lines = [l.strip() for l in log_path.read_text(errors="replace").splitlines() if l.strip()]
    for line in reversed(lines):
        if any(marker in line for marker in ("Error:", "ERROR", "error", "Exception")):
            return line[-300:]
    return lines[-1][-300:] if lines else "no output"


def write_summary(run_dir: Path, **fields) -> None:
    path = run_dir / "summary.json"
    current = json.loads(path.read_text()) if path.exists() else {}
    current.update(fields)
    path.write_text(json.dumps(current, indent=1))


def _toml_number(value: float) -> int | float:
    # Flower's federation config wants whole CPU counts as TOML integers.
    return int(value) if float(value).is_integer() else value
