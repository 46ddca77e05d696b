"""Attack: a network attacker scans the machine while a simulation runs, looking for a Ray or Flower
service (GCS, raylet, workers, agents, the local SuperLink) to reach without authentication.

The attacker finds no simulation service listening beyond loopback: every TCP listener and every
unconnected UDP socket of every process the simulation starts is bound to 127.0.0.0/8 or ::1.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedssl.run.flower_runtime import flower_env
from listeners import processes, watch

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "experiments" / "digits-tiny.yaml"


@pytest.mark.slow
def test_a_network_attacker_finds_no_simulation_service_beyond_loopback(tmp_path):
    output_dir = tmp_path / "runs"
    cmd = [str(Path(sys.executable).parent / "fedssl"), "simulate", str(TINY), "--set", f"run.output_dir={output_dir}",
           "--set", "federation.rounds=1", "--skip-evaluation", "--quiet", "--overwrite"]
    sim = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # The simulation's own processes: fedssl's tree, and anything detached that carries this run's FLWR_HOME.
    marker = f"FLWR_HOME={output_dir}"
    try:
        seen_pids, seen = watch(lambda: processes(roots=[sim.pid], environ_contains=marker), until=lambda: sim.poll() is not None)
    finally:
        if sim.poll() is None:
            sim.kill()
        output = sim.communicate(timeout=60)[0]
    assert sim.returncode == 0, output[-3000:]
    commands = " ".join(item.command for item in seen)
    # Not vacuous: the scan saw Ray's services and Flower's SuperLink listening.
    assert "gcs_server" in commands and "raylet" in commands and "flower-superlink" in commands, "\n".join(map(str, seen))
    exposed = [str(item) for item in seen if not item.loopback]
    assert not exposed, f"{len(exposed)} simulation listener(s) reachable beyond loopback:\n" + "\n".join(exposed)


def test_an_inherited_ray_cluster_address_or_cluster_mode_does_not_reach_the_simulation(tmp_path, monkeypatch):
    # Whoever sets the caller's environment points Ray at their own cluster (it would receive the sites'
    # data and models) or turns cluster mode back on (listeners on every interface).
    monkeypatch.setenv("RAY_ADDRESS", "203.0.113.7:6379")
    monkeypatch.setenv("RAY_REDIS_ADDRESS", "203.0.113.7:6380")
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1")
    env = flower_env(tmp_path)
    assert "RAY_ADDRESS" not in env and "RAY_REDIS_ADDRESS" not in env
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
