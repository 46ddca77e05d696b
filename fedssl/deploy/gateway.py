"""The coordinator's public face: a TLS gateway that passes on the Fleet API and nothing else.

In Flower 1.42 one HTTP server (``flower-superlink --host/--port``) serves the Fleet API
(SuperNodes), the Control API (``flwr run/ls/stop``, ``flwr supernode register``) and the
ServerApp runtime API; Control is unauthenticated unless OIDC is configured, and Flower
offers no client-certificate check or separate bind address for it. Anyone holding only the
public ``ca.crt`` could therefore register a node key, submit a bundle to every site or stop
the run. So the SuperLink binds 127.0.0.1 only (``listen.superlink_port``) and this gateway,
on ``listen.host:listen.port``, forwards exactly the Fleet calls a SuperNode makes:

- ``POST`` (405 otherwise), HTTP/1.1 (505 otherwise), one of :data:`FLEET_PATHS` verbatim
  (403 otherwise: no prefix match, no query string, no ``..``),
- a ``Content-Length`` body (411 for chunked or no length) of at most ``listen.max_request_mb``
  (413), read in full before anything reaches the SuperLink.

Node authentication stays the SuperLink's: signed headers pass through unchanged. Every
request, forwarded or refused, is one line in ``gateway.log`` in the coordinator's state dir.
"""

from __future__ import annotations

import datetime as dt
import http.client
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from fedssl.deploy.processes import DeployError

# The Fleet calls of flwr.supernode.fleet_http_client.FleetHttpClient (Flower 1.42).
FLEET_PATHS = frozenset({
    "/v1/fleet/register-node", "/v1/fleet/activate-node", "/v1/fleet/deactivate-node", "/v1/fleet/unregister-node",
    "/v1/fleet/send-node-heartbeat", "/v1/fleet/pull-messages", "/v1/fleet/push-messages", "/v1/fleet/get-run",
    "/v1/fleet/get-fab", "/v1/fleet/push-object", "/v1/fleet/pull-object", "/v1/fleet/confirm-message-received",
})
# Per-connection headers (RFC 9110 §7.6.1) are the gateway's own business on each side.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
                        "te", "trailer", "transfer-encoding", "upgrade", "content-length"})
UPSTREAM_TIMEOUT = 120.0  # a Fleet call is short; a hung SuperLink must not pin a thread forever
IDLE_TIMEOUT = 60.0  # a silent or half-finished client connection is dropped after this long


def refusal(version: str, method: str, path: str, headers, max_bytes: int) -> tuple[int, str] | None:
    """Why this request may not reach the SuperLink — (status, reason) — or None to forward it.

    ``headers`` is an ``email.message.Message`` (what http.server parses), so repeated
    headers are visible.
    """
    if version != "HTTP/1.1":
        return 505, "only HTTP/1.1 is served"
    if method != "POST":
        return 405, "only POST is served"
    if path not in FLEET_PATHS:
        return 403, "only the Fleet API is served here"
    if headers.get_all("Transfer-Encoding"):
        return 411, "send a Content-Length body, not Transfer-Encoding"
    lengths = headers.get_all("Content-Length") or []
    if not lengths:
        return 411, "Content-Length is required"
    if len(lengths) > 1 or not lengths[0].strip().isdigit():
        return 400, "exactly one numeric Content-Length is required"
    if int(lengths[0]) > max_bytes:
        return 413, f"request body over {max_bytes} bytes"
    return None


def _printable(text: str) -> str:
    # Request lines come from the network: no forged log lines through control characters.
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the SuperNode's httpx client expects
    server_version = "fedssl-gateway"
    sys_version = ""
    timeout = IDLE_TIMEOUT
    disable_nagle_algorithm = True  # headers and body are two writes: without this, delayed ACKs add ~40 ms a call
    server: _GatewayServer

    def parse_request(self) -> bool:
        # http.server's contract: return False after sending the error; nothing is forwarded.
        words = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n").split()
        if len(words) != 3 or words[2] != "HTTP/1.1":
            # Checked first: http.server answers other versions without a status line.
            self.command, self.request_version = "", "HTTP/1.1"
            self.requestline = _printable(" ".join(words))[:200]
            self.close_connection = True
            self.send_error(505, "only HTTP/1.1 is served")
            return False
        if not super().parse_request():
            return False
        refused = refusal(self.request_version, self.command, self.path, self.headers, self.server.max_bytes)
        if refused:
            self.send_error(*refused)  # also sends `Connection: close`: an unread body cannot desync
            return False
        return True

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        body = self.rfile.read(length)
        if len(body) != length:  # the client went away mid-body
            self.close_connection = True
            return
        try:
            status, reason, headers, payload = self.server.forward(self.path, body, self._forward_headers())
        except (OSError, http.client.HTTPException) as err:
            self.log_message("upstream error: %s", err)
            self.send_error(502, "the SuperLink is not reachable")
            return
        self.send_response(status, reason)
        for key, value in headers:
            if key.lower() not in HOP_BY_HOP | {"server", "date"}:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _forward_headers(self) -> list[tuple[str, str]]:
        return [(k, v) for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP]

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's signature
        self.server.log(f"{self.client_address[0]} {_printable(format % args)}")


class _GatewayServer(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client never blocks the coordinator's exit

    def __init__(self, address: tuple[str, int], upstream_port: int, server_ctx: ssl.SSLContext,
                 client_ctx: ssl.SSLContext, max_bytes: int, log_path: Path) -> None:
        self.upstream_port, self.client_ctx, self.max_bytes = upstream_port, client_ctx, max_bytes
        self._log = log_path.open("a", encoding="utf-8")
        self._log_lock = threading.Lock()
        try:
            super().__init__(address, _Handler)
        except BaseException:
            self._log.close()
            raise
        # The handshake runs in the request's own thread (first read), so a client that never
        # finishes it cannot stall accepting the others.
        self.socket = server_ctx.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    def forward(self, path: str, body: bytes, headers: list[tuple[str, str]]):
        """One request to the SuperLink on loopback TLS, on a fresh connection: a failed call is never retried
        on a connection the SuperLink may have half-used."""
        conn = http.client.HTTPSConnection("127.0.0.1", self.upstream_port, timeout=UPSTREAM_TIMEOUT, context=self.client_ctx)
        try:
            conn.putrequest("POST", path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", f"127.0.0.1:{self.upstream_port}")
            for key, value in headers:
                if key.lower() != "host":
                    conn.putheader(key, value)
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            response = conn.getresponse()
            return response.status, response.reason, response.getheaders(), response.read()
        finally:
            conn.close()

    def handle_error(self, request, client_address) -> None:
        # TLS handshake failures (plaintext clients, wrong CA) are expected: one line, no traceback.
        self.log(f"{client_address[0]} connection error: {_printable(str(sys.exc_info()[1]))}")

    def log(self, line: str) -> None:
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        with self._log_lock:
            # Handler threads still finishing after stop() may log; after close they cannot.
            if not self._log.closed:
                self._log.write(f"{stamp} {line}\n")
                self._log.flush()

    def server_close(self) -> None:
        super().server_close()
        with self._log_lock:
            self._log.close()


class FleetGateway:
    """The gateway, serving in a background thread of the coordinator process."""

    def __init__(self, host: str, port: int, upstream_port: int, *, cert: Path, key: Path, ca: Path,
                 max_bytes: int, log_path: Path) -> None:
        self.host, self.port, self.log_path = host, port, Path(log_path)
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        server_ctx.set_alpn_protocols(["http/1.1"])
        server_ctx.load_cert_chain(str(cert), str(key))
        client_ctx = ssl.create_default_context(cafile=str(ca))  # the SuperLink's cert must name 127.0.0.1
        try:
            self._server = _GatewayServer((host, port), upstream_port, server_ctx, client_ctx, max_bytes, self.log_path)
        except OSError as err:
            raise DeployError(f"listen.port: cannot listen on {host}:{port} ({err.strerror or err}); free it or choose another port") from None
        self.port = self._server.server_address[1]  # port 0 picks a free one (tests)
        self._thread = threading.Thread(target=self._server.serve_forever, name="fleet-gateway", daemon=True)

    def start(self) -> None:
        self._server.log(f"gateway listening on {self.host}:{self.port}, forwarding the Fleet API to 127.0.0.1:{self._server.upstream_port}")
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=10)
        self._server.server_close()
