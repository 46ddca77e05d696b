"""The simulation launcher: a whole federation on one machine through Flower's Simulation Engine.

The simulation is the real Flower path — ServerApp, ClientApps in Ray workers, records on
the wire — driven offline (fedssl.run.flower_runtime): a private FLWR_HOME, telemetry, update
checks and runtime dependency installation off, and a private in-memory SuperLink on free ports,
stopped when the run ends. The pipeline (fedssl.run.pipeline) drives it like any launcher.

`flwr run` is pointed at a staged copy of the app (fedssl.run.app_stage): the same files Flower would
put in the FAB, without the checkout's .venv, runs/ and .git, which `flwr run` would otherwise walk
file by file before filtering them out (~47k files: 3-6 s of every run's start-up).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from fedssl.config import ExperimentConfig
from fedssl.errors import FedSSLError
from fedssl.layout import RunDir
from fedssl.phases import mark
from fedssl.run.app_stage import APP_STAGE_DIR, stage_app  # staged under the run's FLWR_HOME, removed at its end
from fedssl.run.flower_runtime import (
    PROJECT_ROOT, FlwrRun, RunOutcome, alive, command_lines, flower_bin, flower_env, free_port, run_config, signal_pid,
)
from fedssl.run.pipeline import say, wait_or_abort

# The Flower app `flwr run` stages and runs, and what its workers import first; tests point it at a recording app.
APP_DIR = PROJECT_ROOT
CONNECTION = "fedssl-sim"
SUPERLINK_START_SECONDS = 120.0  # generous: a loaded 2-core CI machine can take tens of seconds to import Flower


class SimulationError(FedSSLError):
    """The federated run did not complete."""


class Simulation:
    """The launcher of `fedssl simulate` (see fedssl.run.pipeline.Launcher)."""

    evaluation_optional = False  # the simulated data carries the consented labels: no evaluation is an error
    simulates_sites = True  # data.source is split into the sites' data
    results_timeout = None

    def __init__(self, *, stream: bool = True, echo=say) -> None:
        self.stream, self.echo = stream, echo

    def input_shape(self, config: ExperimentConfig) -> list[int]:
        from fedssl.experiment import central_data_for  # loads the data: only when the config does not say

        return list(central_data_for(config).train.input_shape)

    def describe(self, config: ExperimentConfig) -> str:
        p = config.privacy
        privacy = f"DP eps<={p.target_epsilon:g}, delta={p.delta:g} per site" if p.enabled else "NO differential privacy"
        return f"{config.federation.num_sites} sites x {config.federation.rounds} rounds, pretext {config.pretext.name}, {privacy}"

    def summary_fields(self) -> dict:
        return {}

    def start(self, config: ExperimentConfig, run_dir: Path, resume: bool = False) -> FlwrRun:
        """Start `flwr run` against a private local simulation SuperLink (``resume``: from the run dir's
        checkpoint, fedssl.run.checkpoint); returns at once."""
        flwr = flower_bin("flwr")
        flwr_home = RunDir(run_dir).flower_home
        flwr_home.mkdir(exist_ok=True)
        # A private, in-memory simulation SuperLink on free ports: runs never collide with each
        # other (or with a SuperLink another checkout left behind), and it is stopped afterwards.
        (flwr_home / "config.toml").write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = ":local-in-memory:"\n')
        # Workers must import fedssl, clients/ and server/ from this checkout.
        env = flower_env(flwr_home, pythonpath=[APP_DIR], superexec_poll=None)
        fleet_port, control_port = free_port(), free_port()
        env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(fleet_port)
        env["FLWR_LOCAL_CONTROL_API_PORT"] = str(control_port)
        federation = federation_config(config)
        mark("driver_start")
        app_dir = stage_app(APP_DIR, flwr_home / APP_STAGE_DIR)
        # Started here rather than by `flwr run`, whose own start gives a SuperLink 15 s (hard-coded)
        # to answer: too little on a loaded 2-core machine. `flwr run` then finds it up and uses it.
        start_local_superlink(env, flwr_home, fleet_port, control_port)

        def clean_up() -> None:
            stop_local_superlink(control_port)
            shutil.rmtree(app_dir, ignore_errors=True)

        cmd = [flwr, "run", str(app_dir), CONNECTION, "--stream", "--run-config", run_config(run_dir, resume=resume), "--federation-config", federation]
        return FlwrRun(cmd, run_dir=run_dir, env=env, cwd=APP_DIR, stream=self.stream, echo=self.echo, on_exit=clean_up,
                       error=SimulationError)


def federation_config(config: ExperimentConfig) -> str:
    """`flwr run --federation-config`: the simulated sites and what each Ray actor gets."""
    sim = config.simulation
    federation = (
        f"num-supernodes={config.federation.num_sites} "
        f"client-resources-num-cpus={_toml_number(sim.client_cpus)} "
        f"client-resources-num-gpus=0"
    )
    if sim.ray_cpus is not None:  # Flower sizes its actor pool as Ray's CPUs / client_cpus
        federation += f" init-args-num-cpus={sim.ray_cpus}"
    return federation


def run_federation(config: ExperimentConfig, run_dir: Path, stream: bool = True) -> RunOutcome:
    """Run the simulated federation of a prepared run directory until Flower has fully exited
    (no evaluation, no report: for tests and benchmarks; `fedssl simulate` is fedssl.run.pipeline)."""
    run = Simulation(stream=stream).start(config, run_dir)
    wait_or_abort(run)
    return run.finish()


def start_local_superlink(env: dict[str, str], flwr_home: Path, http_port: int, control_port: int,
                          timeout: float = SUPERLINK_START_SECONDS) -> None:
    """Start the in-memory simulation SuperLink `flwr run` would start for a ``:local-in-memory:``
    connection (Flower's own command line, loopback only), and wait until its health endpoint answers."""
    log_file = flwr_home / "local-superlink" / "superlink.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    command = [
        flower_bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
        "--control-api-address", f"127.0.0.1:{control_port}", "--host", "127.0.0.1", "--port", str(http_port),
        "--log-file", str(log_file),
    ]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SimulationError(f"the simulation's SuperLink exited with code {process.returncode} at start; see {log_file}")
        if _healthy(f"http://127.0.0.1:{http_port}/health"):
            return
        time.sleep(0.2)
    process.kill()
    raise SimulationError(f"the simulation's SuperLink did not answer within {timeout:.0f} s; see {log_file}")


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return 200 <= response.status < 300
    except (OSError, ValueError):
        return False


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
        pids = [pid for pid in pids if alive(pid)]
    for pid in pids:
        signal_pid(pid, signal.SIGKILL)


def _toml_number(value: float) -> int | float:
    # Flower's federation config wants whole CPU counts as TOML integers.
    return int(value) if float(value).is_integer() else value
