"""Two attacks on a site through the coordinator's side of one real federation (threat rows 1 and 2).

1. **A bundle that shadows the site's Opacus.** The coordinator ships every file of the approved app plus
   a top-level ``opacus/`` package. Flower puts an installed bundle first on ``sys.path``, so if any code of
   the bundle were imported at the site, ``import opacus`` would load the fake: it loads the real Opacus,
   replaces its noise with zeros and writes a marker file each time it is used. The site must refuse the
   bundle (it is not the app the site approved), train nothing and charge nothing.
2. **An outsider drives the SuperLink's Control API.** In Flower 1.42 the SuperLink serves the Fleet API
   (sites), the Control API (`flwr run`, `flwr ls`, `flwr stop`, `flwr supernode register`) and the
   ServerApp runtime API on one HTTP port, and Control needs no credentials unless OIDC is configured.
   An outsider holding only the federation's ``ca.crt`` (every site has it) who reaches the coordinator's
   public address could register their own node key, push an app bundle to every site, or list and stop
   runs. The attacker is a second FLWR_HOME holding only ca.crt; every Control call must be refused.

Both attacks need the same positive control: the same site, through the same public address, still trains
a round of the genuine bundle. So one federation serves both (a coordinator and site run costs ~2 CPU-min
on the 2-core CI machine): run 1 ships the shadowing bundle; run 2 ships the genuine one, and the outsider
attacks its coordinator before the site joins. Real processes on 127.0.0.1, started as an operator does:
`fedssl server start` (SuperLink, TLS gateway, node authentication) and `fedssl site start`, one round each.
"""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from deploy_processes import FEDSSL, Procs, ledger_records, stop_agent, text, wait_until

pytestmark = pytest.mark.slow

SHADOW_OPACUS = '''
"""Not Opacus: loads the real one, then makes its noise zero."""
import importlib, os, sys
MARKER = {marker!r}
with open(MARKER, "a") as f:
    f.write("shadow opacus imported\\n")
_bundle = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_saved = list(sys.path)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _bundle]
del sys.modules["opacus"]
try:
    _real = importlib.import_module("opacus")
    importlib.import_module("opacus.optimizers")
finally:
    sys.path[:] = _saved


def _zero_noise(std, reference, *args, **kwargs):
    import torch
    with open(MARKER, "a") as f:
        f.write("zero noise\\n")
    return torch.zeros_like(reference)


for _name, _module in list(sys.modules.items()):
    if _name.startswith("opacus.") and hasattr(_module, "_generate_noise"):
        _module._generate_noise = _zero_noise
sys.modules["opacus"] = _real
'''


@dataclass
class Run:
    server_log: str
    agent_log: str
    agent_exit: int  # the site agent's exit code on SIGTERM (0: a graceful stop)
    gateway_log: str  # what the coordinator's gateway logged during this run (the file is appended to)
    charged: int  # the site's DP charges in its ledger once this run ended


@dataclass
class Federation:
    fed: object  # fedssl.deploy.localfed.LocalFederation
    state: Path  # the site's state dir
    marker: Path  # written by the shadow Opacus whenever any of it runs
    shadowed: Run
    genuine: Run
    attacks: dict[str, subprocess.CompletedProcess]  # the outsider's flwr commands
    superlink_port_reachable: str | None  # the non-loopback address the SuperLink's own port answered on


def shadowing_app(root: Path, marker: Path) -> Path:
    """Every file of the approved app's bundle, plus a top-level ``opacus/`` package."""
    from flwr.cli.build import build_fab_from_disk

    from fedssl.run.flower_runtime import PROJECT_ROOT

    app = root / "shadow-app"
    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(PROJECT_ROOT))) as genuine:
        for name in genuine.namelist():
            if not name.startswith(".info/"):
                (app / name).parent.mkdir(parents=True, exist_ok=True)
                (app / name).write_bytes(genuine.read(name))
    (app / "opacus").mkdir()
    (app / "opacus" / "__init__.py").write_text(SHADOW_OPACUS.format(marker=str(marker)))
    return app


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


def control_api_attacks(fed, root: Path) -> dict[str, subprocess.CompletedProcess]:
    """Mallory, from the network with only ca.crt, runs each Control command against the public address."""
    from fedssl.deploy import pki
    from fedssl.run.flower_runtime import PROJECT_ROOT

    mallory = root / "mallory"
    env = attacker_home(mallory, fed.root / "coordinator" / "certs" / pki.CA_CERT, f"127.0.0.1:{fed.port}")
    pki.init_node_key(mallory, "mallory")
    return {
        "flwr supernode register": attack(env, "supernode", "register", str(mallory / "mallory.node.pub"), "target", cwd=mallory),
        "flwr ls": attack(env, "ls", "target", "--format", "json", cwd=mallory),
        "flwr run": attack(env, "run", str(PROJECT_ROOT), "target", cwd=PROJECT_ROOT),
        "flwr stop": attack(env, "stop", "1", "target", cwd=mallory),
    }


def non_loopback_ip() -> str | None:
    """This machine's address on its default route, if it has one (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
            ip = probe.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def superlink_port_reachable(fed) -> str | None:
    """The non-loopback address on which the SuperLink's own port accepted a connection, if any."""
    port = yaml.safe_load(fed.server_yaml.read_text())["listen"]["superlink_port"]
    ip = non_loopback_ip()
    if ip is None:
        return None
    try:
        socket.create_connection((ip, port), timeout=5).close()
    except OSError:
        return None
    return f"{ip}:{port}"


def run_once(procs: Procs, fed, state: Path, name: str, app: Path | None,
             before_site: Callable[[], None] = lambda: None) -> Run:
    """One coordinator run (app: the bundle it ships; None: the genuine app) with the site's agent;
    ``before_site`` runs once the coordinator is up and before the site joins."""
    gateway_log = fed.root / "coordinator" / "state" / "gateway.log"
    gateway_start = gateway_log.stat().st_size if gateway_log.exists() else 0
    server_yaml = yaml.safe_load(fed.server_yaml.read_text())
    server_yaml["set"] = [s for s in server_yaml["set"] if not s.startswith("run.name=")] + [f"run.name={name}"]
    server_yaml.pop("app", None)
    if app is not None:
        server_yaml["app"] = str(app)
    fed.server_yaml.write_text(yaml.safe_dump(server_yaml, sort_keys=False))
    server, server_log = procs.start(f"server-{name}", [FEDSSL, "server", "start", "--config", str(fed.server_yaml)])
    wait_until(lambda: "registered site site-a" in text(server_log) or server.poll() is not None, 180, "the SuperLink to start")
    assert server.poll() is None, text(server_log)
    before_site()
    agent, agent_log = procs.start(f"site-{name}", [FEDSSL, "site", "start", "--config", str(fed.site_yamls["site-a"])])
    try:
        server.wait(timeout=600)
    finally:
        agent_exit = stop_agent(agent)
    return Run(text(server_log), text(agent_log), agent_exit, text(gateway_log)[gateway_start:],
               len(ledger_records(state, "dp_event")))


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    from fedssl.deploy.localfed import make_local_federation
    from fedssl.deploy.site.config import load_site_config

    root = tmp_path_factory.mktemp("coordinator-attacks")
    marker = root / "shadow-opacus-ran.log"
    fed = make_local_federation(root, ["site-a"], rounds=1)  # allowlist: the genuine app only
    state = load_site_config(fed.site_yamls["site-a"]).state_path
    procs = Procs(root)
    seen: dict = {}

    def attack_the_coordinator() -> None:
        seen["attacks"] = control_api_attacks(fed, root)
        seen["reachable"] = superlink_port_reachable(fed)

    try:
        shadowed = run_once(procs, fed, state, "shadowed", shadowing_app(root, marker))
        genuine = run_once(procs, fed, state, "genuine", None, before_site=attack_the_coordinator)
        yield Federation(fed, state, marker, shadowed, genuine, seen["attacks"], seen["reachable"])
    finally:
        procs.kill_all()


def site_rounds(fed, name: str) -> list[dict]:
    path = fed.root / "runs" / name / "metrics.jsonl"
    return [r for r in map(json.loads, text(path).splitlines()) if r["kind"] == "site_round"]


def test_a_bundle_that_shadows_opacus_is_refused_and_the_genuine_one_trains(federation):
    f = federation
    # refused: nothing of the bundle ran, no noise-free step, nothing charged, the refusal logged
    assert not f.marker.exists(), f"the site imported the bundle's opacus: {f.marker.read_text()}"
    assert f.shadowed.charged == 0
    assert [r["status"] for r in site_rounds(f.fed, "shadowed")] == ["failed"], f.shadowed.server_log
    assert "app refused" in site_rounds(f.fed, "shadowed")[0]["reason"]
    events = [json.loads(line) for line in text(f.state / "site_events.jsonl").splitlines()]
    refusals = [e for e in events if e["kind"] == "app_refused"]
    assert len(refusals) == 1 and "is not in apps.allowed_hashes" in refusals[0]["reason"], events
    assert "app refused" in text(f.state / "runner.log")
    # the same site trains with the genuine bundle (its own Opacus, with noise)
    assert [r["status"] for r in site_rounds(f.fed, "genuine")] == ["trained"], f.genuine.server_log + f.genuine.agent_log
    assert f.genuine.charged == 1


def test_control_api_is_not_reachable_from_the_network(federation):
    f = federation
    # `flwr ls --format json` exits 0 even on failure: it says so in its JSON instead
    accepted = {name: (done.stdout + done.stderr)[-400:] for name, done in f.attacks.items()
                if done.returncode == 0 and '"success": false' not in done.stdout}
    assert not accepted, f"the Control API answered an outsider holding only ca.crt: {accepted}"
    gateway_log = f.genuine.gateway_log
    for path in ("/v1/control/register-node", "/v1/control/list-runs"):
        assert f'"POST {path} HTTP/1.1" 403' in gateway_log, gateway_log
    # the SuperLink's own port answers on loopback only
    assert f.superlink_port_reachable is None, f"the SuperLink's port answered on {f.superlink_port_reachable}"
    # the legitimate site still trained, through the same public address
    assert "round 1/1: 1/1 sites trained" in f.genuine.server_log, f.genuine.server_log
    assert '"POST /v1/fleet/push-messages HTTP/1.1" 200' in gateway_log
    assert f.genuine.agent_exit == 0, f.genuine.agent_log
