"""Attack: drive the coordinator's SuperLink from the network with nothing but the public ca.crt.

In Flower 1.42 the SuperLink serves the Fleet API (sites), the Control API (`flwr run`, `flwr ls`,
`flwr stop`, `flwr supernode register`) and the ServerApp runtime API on one HTTP port, and Control
needs no credentials unless OIDC is configured. An outsider who holds only the federation's
``ca.crt`` (every site has it) and can reach the coordinator's public address could register their
own node key, push an app bundle to every site, or list and stop runs.

The coordinator is started exactly as an operator does (`fedssl server start`: TLS + node
authentication); the attacker is a second FLWR_HOME holding only ca.crt, aimed at the public
address. Every Control call must be refused, and a legitimate site must still train a round
through the same public address.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from deploy_processes import FEDSSL, Procs, stop_agent, text, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def procs(tmp_path):
    registry = Procs(tmp_path / "procs")
    yield registry
    registry.kill_all()


def attacker_home(root: Path, ca_cert: Path, address: str) -> dict[str, str]:
    """A FLWR_HOME that knows only the public address and ca.crt: no key, no account, no token."""
    from fedssl.run.flower_runtime import flower_env

    home = root / "attacker-home"
    home.mkdir(parents=True)
    shutil.copy(ca_cert, home / "ca.crt")
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "target"\n\n[superlink.target]\naddress = "{address}"\nroot-certificates = "{home / "ca.crt"}"\n')
    return flower_env(home)


def attack(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess:
    from fedssl.run.flower_runtime import flower_bin

    return subprocess.run([flower_bin("flwr"), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=180)


def non_loopback_ip() -> str | None:
    """This machine's address on its default route, if it has one (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
            ip = probe.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def test_control_api_is_not_reachable_from_the_network(tmp_path, procs):
    from fedssl.deploy import pki
    from fedssl.deploy.localfed import make_local_federation
    from fedssl.run.flower_runtime import PROJECT_ROOT

    fed = make_local_federation(tmp_path / "fed", ["site-a"], rounds=1, local_steps=2)
    certs = fed.root / "coordinator" / "certs"
    server, server_log = procs.start("server", [FEDSSL, "server", "start", "--config", str(fed.server_yaml)])
    wait_until(lambda: "registered site site-a" in text(server_log) or server.poll() is not None, 180, "the coordinator to start")
    assert server.poll() is None, text(server_log)

    # --- the attacker, from the network, with only ca.crt --------------------------------
    public = f"127.0.0.1:{fed.port}"
    env = attacker_home(tmp_path / "mallory", certs / pki.CA_CERT, public)
    pki.init_node_key(tmp_path / "mallory", "mallory")
    outcomes = {
        "flwr supernode register": attack(env, "supernode", "register", str(tmp_path / "mallory" / "mallory.node.pub"), "target", cwd=tmp_path),
        "flwr ls": attack(env, "ls", "target", "--format", "json", cwd=tmp_path),
        "flwr run": attack(env, "run", str(PROJECT_ROOT), "target", cwd=PROJECT_ROOT),
        "flwr stop": attack(env, "stop", "1", "target", cwd=tmp_path),
    }
    # `flwr ls --format json` exits 0 even on failure: it says so in its JSON instead
    accepted = {name: (done.stdout + done.stderr)[-400:] for name, done in outcomes.items()
                if done.returncode == 0 and '"success": false' not in done.stdout}
    assert not accepted, f"the Control API answered an outsider holding only ca.crt: {accepted}"
    gateway_log = text(fed.root / "coordinator" / "state" / "gateway.log")
    for path in ("/v1/control/register-node", "/v1/control/list-runs"):
        assert f'"POST {path} HTTP/1.1" 403' in gateway_log, gateway_log

    # the SuperLink's own port answers on loopback only
    superlink_port = yaml.safe_load(fed.server_yaml.read_text())["listen"]["superlink_port"]
    ip = non_loopback_ip()
    if ip is not None:
        with pytest.raises(OSError):
            socket.create_connection((ip, superlink_port), timeout=5).close()

    # --- the legitimate site still trains, through the same public address ---------------
    agent, _ = procs.start("site-a", [FEDSSL, "site", "start", "--config", str(fed.site_yamls["site-a"])])
    assert server.wait(timeout=600) == 0, text(server_log)
    assert "round 1/1: 1/1 sites trained" in text(server_log), text(server_log)
    assert '"POST /v1/fleet/push-messages HTTP/1.1" 200' in text(fed.root / "coordinator" / "state" / "gateway.log")
    assert stop_agent(agent) == 0
