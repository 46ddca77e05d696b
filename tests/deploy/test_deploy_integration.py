"""Real deployment on 127.0.0.1: SuperLink + SuperNodes with TLS and node authentication.

Everything is a real process started through the `fedssl` CLI (or raw Flower commands for
the clients the SuperLink must refuse); nothing is mocked. Sites a and b (registered), x (not
registered), a 2-round run; site a reaches the SuperLink through a TLS-terminating recorder, so
the test sees exactly what leaves the site, and its data and labels carry a canary. While the run
is live, an unregistered key, a plaintext client and a client with the wrong CA are refused.
After the run, site b's budget is spent and it refuses to start. (Federations 2 and 3:
test_deploy_rejoin.py, test_deploy_secagg.py; one file each so parallel workers can run them at once.)
"""

from __future__ import annotations

import ssl
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

from deploy_processes import (  # noqa: F401  (procs is a fixture)
    FEDSSL, FLOWER_SUPERNODE, accountant_state, ledger_records, procs, set_site, site_round_records, stop_agent, text, wait_until,
)

pytestmark = pytest.mark.slow

CANARY_TEXT = b"CANARY-7f3a9c1e-DO-NOT-LEAK"
CANARY_FLOATS = np.array([0.1234567, 0.7654321, 0.3141592, 0.2718281], dtype=np.float32)


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


# ---------------------------------------------------------------------------- federation 1


def _check_refused_clients(procs, fed, other) -> None:
    """An unregistered node key, a plaintext SuperNode and one trusting another CA are all refused by the live
    SuperLink, and preflight names the wrong CA before any connection."""
    from fedssl.deploy.pki import CA_CERT
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


def _check_site_epsilons(fed, records: list[dict], report: str) -> None:
    """Each site's last reported ε is what its own accountant and budget view say, within its target, in the report."""
    from fedssl.privacy.analysis import epsilon_of
    from fedssl.deploy.site.config import load_site_config
    from fedssl.deploy.site.status import budget_view

    for site_id, name in enumerate(["site-a", "site-b"]):
        config = load_site_config(fed.site_yamls[name])
        history, delta, accountant = accountant_state(config.state_path)
        assert len(history) == 2 and len(ledger_records(config.state_path, "dp_event")) == 2
        last = max((r for r in records if r["site_id"] == site_id), key=lambda r: r["round"])
        assert last["epsilon"] == pytest.approx(epsilon_of(history, delta, accountant), rel=1e-9)
        assert 0 < last["epsilon"] <= config.privacy.target_epsilon * (1 + 1e-9)
        assert budget_view(config).spent == pytest.approx(last["epsilon"], rel=1e-9)
        assert f"{last['epsilon']:.3f}" in report


def _check_wire(sent: bytes, canary_file: Path) -> None:
    """Site a's replies as recorded on the wire: its ε and encoder weights, nothing of its data, ids or labels."""
    assert b"epsilon" in sent, "the recorder did not see the site's replies"
    assert b"pretext-loss" not in sent, "a DP site released its exact (unnoised) pretext loss"
    assert len(sent) > 2 * 4 * 500, "the recorder saw no encoder weights"
    raw_rows = np.load(canary_file)["x"].reshape(300, -1)
    assert CANARY_TEXT not in sent
    assert CANARY_FLOATS.tobytes() not in sent
    assert all(row.tobytes()[:64] not in sent for row in raw_rows[:50])


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
    _check_refused_clients(procs, fed, other)

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
    _check_site_epsilons(fed, records, report)

    # --- wire check: nothing of site a's data, ids or labels left the site ---------------
    recorder.close()
    _check_wire(bytes(recorder.sent), canary_file)

    # --- budget spent: site b refuses to start --------------------------------------------
    assert stop_agent(agent_b) == 0
    assert stop_agent(agent_a) == 0
    spent = subprocess.run([FEDSSL, "site", "start", "--config", str(fed.site_yamls["site-b"])], capture_output=True, text=True, timeout=120)
    assert spent.returncode == 2
    assert "[FAIL] privacy budget: spent" in spent.stdout and "preflight failed" in spent.stderr, spent.stdout + spent.stderr
    status = subprocess.run([FEDSSL, "site", "status", "--config", str(fed.site_yamls["site-b"])], capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "SPENT" in status.stdout and "round 2" in status.stdout, status.stdout
