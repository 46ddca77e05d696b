"""Real deployment on 127.0.0.1: SuperLink + SuperNodes with TLS and node authentication.

Everything is a real process started through the `fedssl` CLI (or raw Flower commands for
the clients the SuperLink must refuse); nothing is mocked. Two federations, each with its
own CA:

* federation 1 — sites a and b (registered), x (not registered). A 2-round run; site a
  reaches the SuperLink through a TLS-terminating recorder, so the test sees exactly what
  leaves the site, and its data and labels carry a canary. While the run is live, an
  unregistered key, a plaintext client and a client with the wrong CA are refused. After
  the run, site b's budget is spent and it refuses to start.
* federation 2 — sites c and d, 2 rounds. d has not approved this app version and refuses
  every round; c is SIGKILLed right after charging round 1 (write-ahead) and restarted,
  rejoins, and its ε never falls below what it actually spent.

Every process group started here is killed in a finalizer, also on failure.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.slow

CANARY_TEXT = b"CANARY-7f3a9c1e-DO-NOT-LEAK"
CANARY_FLOATS = np.array([0.1234567, 0.7654321, 0.3141592, 0.2718281], dtype=np.float32)
FEDSSL = str(Path(sys.executable).parent / "fedssl")
FLOWER_SUPERNODE = str(Path(sys.executable).parent / "flower-supernode")


# ---------------------------------------------------------------------------- process helpers


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


# ---------------------------------------------------------------------------- the wire recorder


class TLSRecorder:
    """A TLS-terminating relay between one site and the SuperLink that keeps every byte the
    site sends (decrypted) — what an observer of the plaintext would see leave the site.

    asyncio in a background thread: one event loop owns every TLS object (OpenSSL objects
    must not be read and written from two threads at once)."""

    def __init__(self, upstream_port: int, cert: Path, key: Path, ca: Path) -> None:
        import asyncio

        self.upstream_port = upstream_port
        self.server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server_ctx.load_cert_chain(str(cert), str(key))
        self.client_ctx = ssl.create_default_context(cafile=str(ca))
        self.sent = bytearray()  # site -> SuperLink
        self.received = bytearray()  # SuperLink -> site
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.port = 0

        async def serve() -> None:
            self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.server_ctx)
            self.port = self.server.sockets[0].getsockname()[1]
            ready.set()

        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(serve(), self.loop)
        assert ready.wait(30), "the recorder did not start"

    async def _handle(self, down_reader, down_writer) -> None:
        import asyncio

        try:
            up_reader, up_writer = await asyncio.open_connection(
                "127.0.0.1", self.upstream_port, ssl=self.client_ctx, server_hostname="127.0.0.1")
        except (OSError, ssl.SSLError):
            down_writer.close()
            return
        await asyncio.gather(self._pump(down_reader, up_writer, self.sent), self._pump(up_reader, down_writer, self.received))

    @staticmethod
    async def _pump(reader, writer, sink: bytearray) -> None:
        try:
            while chunk := await reader.read(65536):
                sink.extend(chunk)
                writer.write(chunk)
                await writer.drain()
        except (OSError, ssl.SSLError, ConnectionError):
            pass
        finally:
            try:
                writer.close()
            except (OSError, RuntimeError):
                pass

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)


# ---------------------------------------------------------------------------- fixtures


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


def plant_canary(site_dir: Path) -> Path:
    """Replace the site's data with a file whose inputs, ids and labels carry the canary."""
    data = np.load(next((site_dir / "data").glob("*.npy")))
    rows = data.reshape(len(data), -1).copy()
    rows[:, : len(CANARY_FLOATS)] = CANARY_FLOATS  # the canary bytes sit in every sample's raw data
    ids = np.array([f"{CANARY_TEXT.decode()}-{i}" for i in range(len(rows))])
    labels = np.array([CANARY_TEXT.decode()] * len(rows))
    path = site_dir / "data" / "canary.npz"
    np.savez(path, x=rows.reshape(data.shape), ids=ids, y=labels)
    (site_dir / "data" / "labels.csv").write_text("id,label\n" + "".join(f"{i},{CANARY_TEXT.decode()}\n" for i in ids))
    return path


def site_round_records(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "site_round"]


def accountant_history(state_dir: Path) -> tuple[list, float, str]:
    state = json.loads((state_dir / "accountant.json").read_text())
    return [tuple(e) for e in state["history"]], state["mechanism"]["delta"], state["mechanism"]["accountant"]


def ledger_records(state_dir: Path, kind: str) -> list[dict]:
    path = state_dir / "ledger.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == kind]


# ---------------------------------------------------------------------------- federation 1


def test_two_site_run_with_refusals_and_wire_check(tmp_path_factory, procs):
    from fedssl.deploy.localfed import make_local_federation
    from fedssl.deploy.pki import CA_CERT, SERVER_CERT, SERVER_KEY

    root = tmp_path_factory.mktemp("fed1")
    fed = make_local_federation(root, ["site-a", "site-b", "site-x"], registered=["site-a", "site-b"], rounds=2)
    other = make_local_federation(tmp_path_factory.mktemp("other-ca"), ["site-q"])  # only for its CA
    certs = root / "coordinator" / "certs"
    canary_file = plant_canary(fed.site_dir("site-a"))
    recorder = TLSRecorder(fed.port, certs / SERVER_CERT, certs / SERVER_KEY, certs / CA_CERT)
    set_site(fed.site_yamls["site-a"], **{"data.path": str(canary_file), "coordinator.address": f"127.0.0.1:{recorder.port}"})

    server, server_log = procs.start("server1", [FEDSSL, "server", "start", "--config", str(fed.server_yaml)])
    wait_until(lambda: "registered site site-b" in text(server_log) or server.poll() is not None, 120, "the SuperLink to start")
    assert server.poll() is None, text(server_log)

    agent_a, log_a = procs.start("site-a", [FEDSSL, "site", "start", "--config", str(fed.site_yamls["site-a"])])
    agent_b, log_b = procs.start("site-b", [FEDSSL, "site", "start", "--config", str(fed.site_yamls["site-b"])])

    # --- refusals, against the live SuperLink -----------------------------------------
    from fedssl.run.flower_runtime import free_port

    node_config = f"site-config='{fed.site_yamls['site-x']}'"
    unregistered, log_x = procs.start("unregistered", [FEDSSL, "site", "start", "--config", str(fed.site_yamls["site-x"])])
    plaintext, log_plain = procs.start("plaintext", [
        FLOWER_SUPERNODE, "--insecure", "--superlink", f"127.0.0.1:{fed.port}", "--max-retries", "2", "--max-wait-time", "10",
        "--port", str(free_port()), "--node-config", node_config])
    wrong_ca, log_wrong = procs.start("wrong-ca", [
        FLOWER_SUPERNODE, "--superlink", f"127.0.0.1:{fed.port}", "--root-certificates", str(other.root / "coordinator" / "certs" / CA_CERT),
        "--auth-supernode-private-key", str(fed.site_dir("site-x") / "keys" / "site-x.node"),
        "--max-retries", "2", "--max-wait-time", "10", "--port", str(free_port()), "--node-config", node_config])
    wrong_ca_site = fed.site_dir("site-x") / "site-wrong-ca.yaml"
    wrong_ca_site.write_text(fed.site_yamls["site-x"].read_text())
    set_site(wrong_ca_site, **{"coordinator.root_certificates": str(other.root / "coordinator" / "certs" / CA_CERT)})
    preflight_wrong_ca = subprocess.run([FEDSSL, "site", "preflight", "--config", str(wrong_ca_site)], capture_output=True, text=True, timeout=120)

    assert unregistered.wait(timeout=180) != 0
    assert "refused this site's node key" in text(log_x), text(log_x)
    assert plaintext.wait(timeout=180) != 0
    assert wrong_ca.wait(timeout=180) != 0
    for log in (log_x, log_plain, log_wrong):
        assert "SuperNode ID" not in text(log), f"{log.name}: a refused client joined the federation:\n{text(log)}"
    assert "Failed to initialize the connection to the SuperLink" in text(log_plain), text(log_plain)
    assert "CERTIFICATE_VERIFY_FAILED" in text(log_wrong) or "certificate verify failed" in text(log_wrong), text(log_wrong)
    assert preflight_wrong_ca.returncode == 2
    assert "[FAIL] coordinator" in preflight_wrong_ca.stdout and "does not verify" in preflight_wrong_ca.stdout, preflight_wrong_ca.stdout

    # --- the run ----------------------------------------------------------------------
    assert server.wait(timeout=600) == 0, text(server_log)
    out = text(server_log)
    assert "round 2/2: 2/2 sites trained" in out, out
    run_dir = root / "runs" / f"deploy-{root.name}"
    assert (run_dir / "report.md").exists() and (run_dir / "encoder.pt").exists()
    report = (run_dir / "report.md").read_text()
    records = site_round_records(run_dir)
    assert {(r["round"], r["site_id"], r["status"]) for r in records} == {(1, 0, "trained"), (1, 1, "trained"), (2, 0, "trained"), (2, 1, "trained")}
    assert len({r["node_id"] for r in records}) == 2  # no refused client ever took part

    # per-site ε: what the server recorded is what each site's own accountant says
    from fedssl.privacy.analysis import epsilon_of
    from fedssl.deploy.site.config import load_site_config
    from fedssl.deploy.site.status import budget_view

    for site_id, name in enumerate(["site-a", "site-b"]):
        config = load_site_config(fed.site_yamls[name])
        history, delta, accountant = accountant_history(config.state_path)
        assert len(history) == 2 and len(ledger_records(config.state_path, "dp_event")) == 2
        last = max((r for r in records if r["site_id"] == site_id), key=lambda r: r["round"])
        assert last["epsilon"] == pytest.approx(epsilon_of(history, delta, accountant), rel=1e-9)
        assert 0 < last["epsilon"] <= config.privacy.target_epsilon * (1 + 1e-9)
        assert budget_view(config).spent == pytest.approx(last["epsilon"], rel=1e-9)
        assert f"{last['epsilon']:.3f}" in report

    # --- wire check: nothing of site a's data, ids or labels left the site ---------------
    recorder.close()
    sent = bytes(recorder.sent)
    assert b"epsilon" in sent, "the recorder did not see the site's replies"
    assert b"pretext-loss" not in sent, "a DP site released its exact (unnoised) pretext loss"
    assert len(sent) > 2 * 4 * 500, "the recorder saw no encoder weights"
    raw_rows = np.load(canary_file)["x"].reshape(300, -1)
    assert CANARY_TEXT not in sent
    assert CANARY_FLOATS.tobytes() not in sent
    assert all(row.tobytes()[:64] not in sent for row in raw_rows[:50])

    # --- budget spent: site b refuses to start --------------------------------------------
    assert stop_agent(agent_b) == 0
    assert stop_agent(agent_a) == 0
    spent = subprocess.run([FEDSSL, "site", "start", "--config", str(fed.site_yamls["site-b"])], capture_output=True, text=True, timeout=120)
    assert spent.returncode == 2
    assert "[FAIL] privacy budget: spent" in spent.stdout and "preflight failed" in spent.stderr, spent.stdout + spent.stderr
    status = subprocess.run([FEDSSL, "site", "status", "--config", str(fed.site_yamls["site-b"])], capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "SPENT" in status.stdout and "round 2" in status.stdout, status.stdout


# ---------------------------------------------------------------------------- federation 2


def test_unapproved_app_refused_and_killed_site_rejoins(tmp_path_factory, procs):
    from fedssl.deploy.localfed import make_local_federation
    from fedssl.privacy.analysis import epsilon_of
    from fedssl.deploy.site.config import load_site_config

    root = tmp_path_factory.mktemp("fed2")
    fed = make_local_federation(root, ["site-c", "site-d"], rounds=2)
    set_site(fed.site_yamls["site-d"], **{"apps.allowed_hashes": ["sha256:" + "0" * 64]})
    c_config, d_config = load_site_config(fed.site_yamls["site-c"]), load_site_config(fed.site_yamls["site-d"])

    server, server_log = procs.start("server2", [FEDSSL, "server", "start", "--config", str(fed.server_yaml)])
    wait_until(lambda: "registered site site-d" in text(server_log) or server.poll() is not None, 120, "the SuperLink to start")
    assert server.poll() is None, text(server_log)
    agent_c, _ = procs.start("site-c", [FEDSSL, "site", "start", "--config", str(fed.site_yamls["site-c"])])
    agent_d, _ = procs.start("site-d", [FEDSSL, "site", "start", "--config", str(fed.site_yamls["site-d"])])

    # SIGKILL the whole site c (agent, SuperNode, SuperExec, ClientApp) the moment round 1 is charged
    wait_until(lambda: ledger_records(c_config.state_path, "dp_event") or server.poll() is not None, 300, "site c to charge round 1", interval=0.01)
    os.killpg(agent_c.pid, signal.SIGKILL)
    agent_c.wait(timeout=10)
    charged_before_kill = len(ledger_records(c_config.state_path, "dp_event"))
    assert charged_before_kill == 1
    restarted, restart_log = procs.start("site-c-restart", [FEDSSL, "site", "start", "--config", str(fed.site_yamls["site-c"])])

    assert server.wait(timeout=600) == 0, text(server_log)
    run_dir = root / "runs" / f"deploy-{root.name}"
    records = site_round_records(run_dir)

    # site d never trained: every round refused before training, logged at the site
    d_node = {r["node_id"] for r in records if r["status"] == "failed" and "app refused" in r.get("reason", "")}
    assert len(d_node) == 1
    assert not [r for r in records if r["site_id"] == 1]
    assert ledger_records(d_config.state_path, "dp_event") == []
    events = [json.loads(line) for line in (d_config.state_path / "site_events.jsonl").read_text().splitlines()]
    refusals = [e for e in events if e["kind"] == "app_refused"]
    assert len(refusals) == 2
    # what was hashed is the bundle the coordinator sent, checked by the site runner before any use
    assert all(e["app_hash"].startswith("sha256:") and "is not in apps.allowed_hashes" in e["reason"] for e in refusals), refusals

    # site c rejoined after the crash and trained again
    c_trained = sorted((r for r in records if r["site_id"] == 0 and r["status"] == "trained"), key=lambda r: r["round"])
    assert c_trained and c_trained[-1]["round"] >= 2, records
    assert "joined the federation" in text(restart_log)

    # ε never below the true spend: every ε the site reported covers at least the rounds it
    # actually trained, and its ledger also counts the round that was cut off by the crash
    history, delta, accountant = accountant_history(c_config.state_path)
    charged_rounds = [r["body"]["round"] for r in ledger_records(c_config.state_path, "dp_event")]
    assert 1 in charged_rounds and len(history) == len(charged_rounds) >= len(c_trained)
    for i, record in enumerate(c_trained, start=1):
        true_spend = epsilon_of(history[:i], delta, accountant)  # i rounds surely trained by then
        assert record["epsilon"] >= true_spend * (1 - 1e-9)
    assert epsilon_of(history, delta, accountant) >= epsilon_of(history[: len(c_trained)], delta, accountant)
    from fedssl.privacy.ledger import Ledger

    assert Ledger(c_config.state_path).verify().ok

    for agent in (restarted, agent_d):
        assert stop_agent(agent) == 0


# ---------------------------------------------------------------------------- federation 3


def test_secure_aggregation_and_warm_start_over_tls(tmp_path_factory, procs):
    # Deployment with SecAgg+ (three sites, each holding a share of the others' secrets) and a
    # synthetic warm start the coordinator builds before any site connects.
    from fedssl.deploy.localfed import make_local_federation
    from fedssl.layout import WARM_START_FILE

    root = tmp_path_factory.mktemp("fed3")
    fed = make_local_federation(root, ["site-e", "site-f", "site-g"], rounds=1, experiment_overrides=[
        "federation.min_sites=3", "secure_aggregation.enabled=true", "secure_aggregation.timeout=120",
        "warm_start.source=synthetic", "warm_start.num_samples=300", "warm_start.steps=10",
    ])
    server, server_log = procs.start("server3", [FEDSSL, "server", "start", "--config", str(fed.server_yaml)])
    wait_until(lambda: "registered site site-g" in text(server_log) or server.poll() is not None, 180, "the SuperLink to start")
    assert server.poll() is None, text(server_log)
    agents = [procs.start(name, [FEDSSL, "site", "start", "--config", str(fed.site_yamls[name])])[0] for name in fed.site_yamls]

    assert server.wait(timeout=600) == 0, text(server_log)
    run_dir = root / "runs" / f"deploy-{root.name}"
    assert (run_dir / WARM_START_FILE).exists(), text(server_log)
    records = site_round_records(run_dir)
    assert sorted((r["site_id"], r["status"]) for r in records) == [(0, "trained"), (1, "trained"), (2, "trained")], records
    statement = (run_dir / "report.md").read_text()
    assert "SecAgg+" in statement and "synthetic" in statement.lower(), statement
    for agent in agents:
        assert stop_agent(agent) == 0
