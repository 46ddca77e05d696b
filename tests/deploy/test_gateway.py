"""The Fleet gateway (fedssl.deploy.gateway) in front of a real TLS HTTP server on loopback.

The upstream here is a small real HTTPS server that records what reaches it, standing where
the SuperLink stands; the requests are raw bytes over real TLS sockets, so each refusal is
checked both on the wire (status) and at the upstream (nothing arrived).
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fedssl.deploy import pki
from fedssl.deploy.gateway import FLEET_PATHS, FleetGateway, refusal
from fedssl.deploy.processes import DeployError

MAX = 1024


class Upstream:
    """A real HTTPS server on 127.0.0.1 that records every request it gets."""

    def __init__(self, certs: Path) -> None:
        self.seen: list[tuple[str, dict, bytes]] = []
        seen = self.seen

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # as uvicorn: no delayed-ACK stalls in the timings

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                reply = b"echo:" + body
                self.send_response(201)
                self.send_header("X-Upstream", "yes")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args) -> None:
                pass

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(certs / pki.SERVER_CERT), str(certs / pki.SERVER_KEY))
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("gw-certs")
    pki.init_ca(directory)
    pki.server_cert(directory, ["localhost"], directory)  # 127.0.0.1 is added by server_cert itself
    return directory


@pytest.fixture
def gateway(certs, tmp_path):
    upstream = Upstream(certs)
    gw = FleetGateway("127.0.0.1", 0, upstream.port, cert=certs / pki.SERVER_CERT, key=certs / pki.SERVER_KEY,
                      ca=certs / pki.CA_CERT, max_bytes=MAX, log_path=tmp_path / "gateway.log")
    gw.start()
    yield gw, upstream
    gw.stop()
    upstream.close()


def exchange(gw: FleetGateway, certs: Path, raw: bytes) -> bytes:
    """Send raw bytes over TLS, return everything the gateway answers until it closes or goes quiet."""
    ctx = ssl.create_default_context(cafile=str(certs / pki.CA_CERT))
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock, ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
        tls.sendall(raw)
        tls.settimeout(3)
        out = b""
        try:
            while chunk := tls.recv(65536):
                out += chunk
        except (TimeoutError, socket.timeout):
            pass
        return out


def post(path: str, body: bytes = b"x", version: str = "HTTP/1.1", extra: str = "") -> bytes:
    return (f"POST {path} {version}\r\nHost: fl.example.org\r\nContent-Length: {len(body)}\r\n{extra}"
            f"Connection: close\r\n\r\n").encode() + body


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


# ---------------------------------------------------------------------------- refusals on the wire


@pytest.mark.parametrize("raw, status", [
    (post("/v1/control/register-node"), 403),  # flwr supernode register
    (post("/v1/control/start-run"), 403),  # flwr run
    (post("/v1/control/list-runs"), 403),  # flwr ls
    (post("/v1/control/stop-run"), 403),
    (post("/v1/fleet/get-run?x=1"), 403),
    (post("/v1/fleet/../control/start-run"), 403),
    (post("/v1/fleet/get-run/"), 403),
    (post("https://127.0.0.1/v1/fleet/get-run"), 403),
    (post("/docs"), 403),
    (post("/health"), 403),
    (b"GET /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    (b"PUT /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx", 405),
    (post("/v1/fleet/get-run", version="HTTP/1.0"), 505),
    (post("/v1/fleet/get-run", version="HTTP/2.0"), 505),
    (b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n", 411),
    (b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: x\r\n\r\n", 411),
    (post("/v1/fleet/push-object", b"y" * (MAX + 1)), 413),
    (post("/v1/fleet/get-run", extra="Content-Length: 1\r\n"), 400),  # two lengths: smuggling shape
])
def test_refused_requests_never_reach_the_superlink(gateway, certs, raw, status):
    gw, upstream = gateway
    reply = exchange(gw, certs, raw)
    assert status_of(reply) == status, reply[:200]
    assert upstream.seen == []


def test_plaintext_and_garbage_clients_are_dropped_and_the_gateway_keeps_serving(gateway, certs):
    gw, upstream = gateway
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(post("/v1/fleet/get-run"))  # no TLS at all
        sock.settimeout(5)
        try:
            assert b"HTTP/1.1 200" not in sock.recv(65536)
        except (ConnectionError, TimeoutError, socket.timeout):
            pass
    assert upstream.seen == []
    assert status_of(exchange(gw, certs, post("/v1/fleet/get-run"))) == 201
    assert "connection error" in (gw.log_path.read_text())


# ---------------------------------------------------------------------------- forwarding


def test_fleet_call_is_forwarded_with_its_signed_headers(gateway, certs):
    gw, upstream = gateway
    body = bytes(range(256))
    reply = exchange(gw, certs, post("/v1/fleet/pull-messages", body,
                                     extra="flwr-public-key: QUJD\r\nflwr-signature: c2ln\r\nflwr-timestamp: 2026-01-01T00:00:00\r\n"))
    assert status_of(reply) == 201
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert payload == b"echo:" + body and b"X-Upstream: yes" in head
    (path, headers, got), = upstream.seen
    assert path == "/v1/fleet/pull-messages" and got == body
    assert (headers["flwr-public-key"], headers["flwr-signature"], headers["flwr-timestamp"]) == ("QUJD", "c2ln", "2026-01-01T00:00:00")
    assert "connection" not in headers or headers["connection"] != "close"  # hop-by-hop stays on its hop


def test_keep_alive_serves_several_calls_on_one_connection(gateway, certs):
    gw, upstream = gateway
    one = b"POST /v1/fleet/send-node-heartbeat HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\na"
    reply = exchange(gw, certs, one + one.replace(b"\r\n\r\na", b"\r\n\r\nb"))
    assert reply.count(b"HTTP/1.1 201") == 2
    assert [s[2] for s in upstream.seen] == [b"a", b"b"]


def test_every_request_is_logged_without_forged_lines(gateway, certs):
    gw, _ = gateway
    exchange(gw, certs, post("/v1/fleet/get-run"))
    exchange(gw, certs, post("/v1/control/start-run\x1b[2Jfake"))
    exchange(gw, certs, post("/v1/fleet/get-run\x0bforged"))
    log = gw.log_path.read_text()
    assert '"POST /v1/fleet/get-run HTTP/1.1" 201' in log
    assert "/v1/control/start-run" in log and " 403 " in log
    assert "\x1b" not in log and "\x0b" not in log


def test_a_dead_superlink_is_a_502(certs, tmp_path):
    upstream = Upstream(certs)
    upstream.close()  # its port is now closed
    gw = FleetGateway("127.0.0.1", 0, upstream.port, cert=certs / pki.SERVER_CERT, key=certs / pki.SERVER_KEY,
                      ca=certs / pki.CA_CERT, max_bytes=MAX, log_path=tmp_path / "gateway.log")
    gw.start()
    try:
        assert status_of(exchange(gw, certs, post("/v1/fleet/get-run"))) == 502
    finally:
        gw.stop()


def test_port_in_use_is_one_line_naming_listen_port(certs, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(DeployError, match=r"^listen.port: cannot listen on 127.0.0.1:\d+"):
            FleetGateway("127.0.0.1", busy.getsockname()[1], 1, cert=certs / pki.SERVER_CERT, key=certs / pki.SERVER_KEY,
                         ca=certs / pki.CA_CERT, max_bytes=MAX, log_path=tmp_path / "gateway.log")


# ---------------------------------------------------------------------------- the rule itself


def headers(**values: str | list[str]) -> Message:
    message = Message()
    for key, value in values.items():
        for one in value if isinstance(value, list) else [value]:
            message[key.replace("_", "-")] = one
    return message


def test_every_fleet_path_the_supernode_uses_is_allowed():
    from flwr.supernode import fleet_http_client

    import inspect
    import re

    used = set(re.findall(r'path="(/v1/fleet/[a-z-]+)"', inspect.getsource(fleet_http_client)))
    assert used == FLEET_PATHS  # a Flower upgrade that adds or renames a Fleet call fails here
    for path in FLEET_PATHS:
        assert refusal("HTTP/1.1", "POST", path, headers(Content_Length="0"), MAX) is None


def test_exact_size_limit():
    assert refusal("HTTP/1.1", "POST", "/v1/fleet/push-object", headers(Content_Length=str(MAX)), MAX) is None
    assert refusal("HTTP/1.1", "POST", "/v1/fleet/push-object", headers(Content_Length=str(MAX + 1)), MAX)[0] == 413
    assert refusal("HTTP/1.1", "POST", "/v1/fleet/push-object", headers(Content_Length="-1"), MAX)[0] == 400


# ---------------------------------------------------------------------------- config and certificate


def test_server_cert_always_covers_loopback(certs):
    assert pki.covers_ip(certs / pki.SERVER_CERT, "127.0.0.1")
    assert not pki.covers_ip(certs / pki.CA_CERT, "127.0.0.1")  # no SAN at all


def test_listen_config_rules():
    from fedssl.deploy.coordinator import ListenConfig
    from fedssl.errors import ConfigError

    with pytest.raises(ConfigError, match="^listen.superlink_port: must differ"):
        ListenConfig(port=9092, superlink_port=9092).validate()
    with pytest.raises(ConfigError, match="^listen.max_request_mb"):
        ListenConfig(max_request_mb=0).validate()
    assert ListenConfig().superlink_port == 9093 and ListenConfig().max_request_mb == 64


def test_calls_in_flight_when_the_gateway_stops_end_quietly(certs, tmp_path, capfd):
    # The coordinator stops the SuperLink and then the gateway while SuperNodes still poll.
    upstream = Upstream(certs)
    port = upstream.port
    upstream.close()
    gw = FleetGateway("127.0.0.1", 0, port, cert=certs / pki.SERVER_CERT, key=certs / pki.SERVER_KEY,
                      ca=certs / pki.CA_CERT, max_bytes=MAX, log_path=tmp_path / "gateway.log")
    gw.start()
    ctx = ssl.create_default_context(cafile=str(certs / pki.CA_CERT))
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock, ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
        tls.sendall(post("/v1/fleet/get-run", b"y" * 10)[:-5])  # the body is not complete yet
        gw.stop()
        tls.sendall(b"y" * 5)  # now its handler forwards, fails, and logs after the log is closed
        tls.settimeout(5)
        try:
            assert b" 502 " in tls.recv(65536)
        except (ConnectionError, TimeoutError, socket.timeout, ssl.SSLError):
            pass
    time.sleep(1)
    assert "Traceback" not in capfd.readouterr().err
