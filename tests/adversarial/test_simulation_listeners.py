"""Attack: a network attacker scans the machine while a simulation runs, looking for a Ray or Flower
service (GCS, raylet, workers, agents, the local SuperLink) to reach without authentication.

The attacker finds no simulation service listening beyond loopback: every TCP listener and every
unconnected UDP socket of every process the simulation starts is bound to 127.0.0.0/8 or ::1.
"""

from __future__ import annotations

import pytest

from fedssl.run.flower_runtime import flower_env


@pytest.mark.slow
def test_a_network_attacker_finds_no_simulation_service_beyond_loopback(reference_run):
    # The scan ran alongside the session's reference simulation (tests/reference_run.py): every process of
    # fedssl's tree, and anything detached that carries that run's FLWR_HOME, polled until the run ended.
    assert reference_run.returncode == 0, reference_run.stderr[-3000:]
    seen = reference_run.listeners
    commands = " ".join(item["command"] for item in seen)
    # Not vacuous: the scan saw Ray's services and Flower's SuperLink listening.
    assert "gcs_server" in commands and "raylet" in commands and "flower-superlink" in commands, \
        "\n".join(item["text"] for item in seen)
    exposed = [item["text"] for item in seen if not item["loopback"]]
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
