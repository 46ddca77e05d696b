"""The live dashboard: a small read-only Starlette app, served by uvicorn.

    GET /               the page (fedssl.dashboard.page), which opens:
    GET /events         server-sent events: a ``snapshot`` event now and on every change of the run's files
    GET /snapshot.json  the current snapshot

The run's files are polled (their mtimes and sizes, every POLL_SECONDS); a change rebuilds the
snapshot once, off the event loop, for every open page. Only GET (and HEAD) exist; anything else is 405.

Security: :func:`check_bind` refuses a non-loopback address unless the caller both exposes it on
purpose and sets a token; with a token every request needs it (``Authorization: Bearer TOKEN`` or
``?token=TOKEN``), else 401.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from fedssl.dashboard.page import render_page
from fedssl.dashboard.snapshot import build_snapshot, signature
from fedssl.errors import ConfigError

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
KEEPALIVE_SECONDS = 15.0
LOOPBACK_NAMES = {"localhost"}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname: it may resolve to anything


def check_bind(host: str, *, expose: bool, token: str | None) -> str | None:
    """The token to require: None on loopback without one; ConfigError for an exposure not asked for."""
    if is_loopback(host):
        return token
    if not expose:
        raise ConfigError(f"--host {host}: not a loopback address; the dashboard shows every site's privacy budget, "
                          "so exposing it needs --expose (and then a --token, or one is generated)")
    return token or secrets.token_urlsafe(24)


class TokenGuard:
    """Plain ASGI middleware: every HTTP request must carry the token, compared in constant time."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app, self.token = app, token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self._allowed(Request(scope)):
            response = PlainTextResponse("401: this dashboard needs its token (?token=... or Authorization: Bearer ...)",
                                         status_code=401, headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _allowed(self, request: Request) -> bool:
        header = request.headers.get("authorization", "")
        given = header[len("Bearer "):] if header.startswith("Bearer ") else request.query_params.get("token", "")
        return hmac.compare_digest(given.encode(), self.token)


class Watch:
    """The run's current snapshot. A change of its files is answered at once with the quick snapshot (no
    ledger audit, milliseconds); a background thread audits the same files (seconds of re-accounting) and
    its snapshot replaces the quick one while the files stay as they were. The quick path never waits for
    an audit, and each snapshot is built once per change however many pages are open."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._quick: tuple[tuple | None, dict[str, Any] | None] = (None, None)
        self._audited: tuple[tuple | None, dict[str, Any] | None] = (None, None)
        self._lock = anyio.Lock()
        self._guard = threading.Lock()
        self._auditor: threading.Thread | None = None

    def _audit_forever(self) -> None:
        while True:
            try:
                now = signature(self.path)
                if now != self._audited[0]:
                    snapshot = build_snapshot(self.path)
                    with self._guard:
                        self._audited = (now, snapshot)
                    continue
            except Exception as err:  # e.g. the run dir was removed: keep serving what the quick path reads
                log.warning("dashboard audit of %s failed: %s", self.path, err)
            time.sleep(POLL_SECONDS)

    async def current(self) -> tuple[tuple, dict[str, Any]]:
        """(a key that changes with every new snapshot, the snapshot)."""
        if self._auditor is None:
            self._auditor = threading.Thread(target=self._audit_forever, name="dashboard-audit", daemon=True)
            self._auditor.start()
        async with self._lock:
            now = await anyio.to_thread.run_sync(signature, self.path)
            with self._guard:
                audited = self._audited
            if audited[0] == now:
                return (now, True), audited[1]
            if self._quick[0] != now:
                self._quick = (now, await anyio.to_thread.run_sync(partial(build_snapshot, self.path, audit=False)))
            done = not self._quick[1]["audit"]["pending"]  # a site state dir is always audited
            return (now, done), self._quick[1]

    async def audited(self) -> dict[str, Any]:
        while True:
            (_, done), snapshot = await self.current()
            if done:
                return snapshot
            await anyio.sleep(POLL_SECONDS / 5)


def _event(snapshot: dict[str, Any]) -> str:
    return f"event: snapshot\ndata: {json.dumps(snapshot, allow_nan=False)}\n\n"


async def _stream(watch: Watch, request: Request) -> AsyncIterator[str]:
    sent, quiet = None, 0.0
    while not await request.is_disconnected():
        current, snapshot = await watch.current()
        if current != sent:
            yield _event(snapshot)
            sent, quiet = current, 0.0
        elif quiet >= KEEPALIVE_SECONDS:
            yield ": keep-alive\n\n"
            quiet = 0.0
        await anyio.sleep(POLL_SECONDS)
        quiet += POLL_SECONDS


def create_app(path: Path, *, token: str | None = None) -> Starlette:
    """The dashboard over ``path`` (a run dir or a site state dir), requiring ``token`` when given."""
    watch = Watch(path)
    page = render_page(live=True)

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    async def snapshot(request: Request) -> Response:
        current = await watch.audited()
        return JSONResponse(current, headers={"Cache-Control": "no-store"})

    async def events(request: Request) -> Response:
        return StreamingResponse(_stream(watch, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def no_icon(request: Request) -> Response:
        return Response(status_code=204)

    routes = [Route("/", index, methods=["GET"]), Route("/snapshot.json", snapshot, methods=["GET"]),
              Route("/events", events, methods=["GET"]), Route("/favicon.ico", no_icon, methods=["GET"])]
    middleware = [Middleware(TokenGuard, token=token)] if token else []
    return Starlette(routes=routes, middleware=middleware)


def serve(path: Path, *, host: str, port: int, token: str | None, show_token: bool = False) -> None:
    """Run the dashboard until interrupted (the caller has checked the bind with :func:`check_bind`).
    A generated token is printed once, in the URL (``show_token``); a token the user gave is not echoed."""
    import uvicorn

    shown = f"[{host}]" if ":" in host else host
    query = f"?token={token}" if token and show_token else ("?token=<your --token>" if token else "")
    print(f"fedssl: dashboard of {path} on http://{shown}:{port}/{query} (read-only; Ctrl-C to stop)", flush=True)
    uvicorn.run(create_app(path, token=token), host=host, port=port, log_level="warning", access_log=False)
