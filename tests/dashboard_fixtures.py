"""Dashboard fixtures: the session's one real tiny federation (tests/reference_run.py), the real `fedssl dashboard` process, and
Debian's chromium driven by Playwright. Registered by tests/conftest.py (``pytest_plugins``): a
tests/dashboard/conftest.py would shadow the shared conftest for every ``from conftest import ...``.

The browser is required, not optional: `make setup` installs chromium, and a machine without it fails
the browser tests with the command that installs it (a skipped browser test would pass CI untested).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "experiments" / "digits-tiny.yaml"
FEDSSL = str(Path(sys.executable).parent / "fedssl")
CHROMIUM = os.environ.get("FEDSSL_CHROMIUM", "/usr/bin/chromium")
# No downloads, no background traffic: the page must work offline.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def tiny_run(reference_run) -> Path:
    """A finished real 2-site x 2-round DP simulation (digits-tiny), evaluated and reported: the session's
    shared run (tests/reference_run.py). Do not modify."""
    assert reference_run.returncode == 0, reference_run.stderr[-3000:] + reference_run.stdout[-3000:]
    return reference_run.dir


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    """A private, writable copy of the tiny run (to append rounds to, or tamper with)."""
    target = tmp_path / "digits-tiny"
    shutil.copytree(tiny_run, target, ignore=shutil.ignore_patterns(".flwr"))
    return target


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Dashboard:
    process: subprocess.Popen
    port: int
    banner: str
    token: str | None = None

    def url(self, path: str = "/", token: str | None = None) -> str:
        query = f"?token={token}" if token else ""
        return f"http://127.0.0.1:{self.port}{path}{query}"


def _wait_until_serving(dashboard: Dashboard, deadline: float) -> None:
    while time.monotonic() < deadline:
        if dashboard.process.poll() is not None:
            raise AssertionError(f"fedssl dashboard exited {dashboard.process.returncode}: {dashboard.process.stdout.read()}")
        try:
            urllib.request.urlopen(dashboard.url("/favicon.ico", dashboard.token), timeout=2).close()
            return
        except urllib.error.HTTPError:  # it answered (401 without the token): it is serving
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    raise AssertionError("fedssl dashboard did not answer within its start-up time")


@pytest.fixture
def start_dashboard() -> Iterator[Callable[..., Dashboard]]:
    """``start_dashboard(path, *extra_args)``: the real CLI serving ``path`` on a free port, stopped afterwards."""
    started: list[Dashboard] = []

    def start(path: Path, *extra: str, token: str | None = None) -> Dashboard:
        port = free_port()
        process = subprocess.Popen([FEDSSL, "dashboard", str(path), "--port", str(port), *extra],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        banner = process.stdout.readline().strip()
        dashboard = Dashboard(process, port, banner, token)
        started.append(dashboard)
        _wait_until_serving(dashboard, time.monotonic() + 60)
        return dashboard

    yield start
    for dashboard in started:
        dashboard.process.terminate()
        try:
            dashboard.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            dashboard.process.kill()
            dashboard.process.wait()


@pytest.fixture(scope="session")
def browser():
    """Headless Debian chromium under Playwright; a missing browser is a failure that says how to install it."""
    if shutil.which(CHROMIUM) is None and not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} not found: the dashboard's browser tests need Debian's chromium "
                    "(`apt-get install -y chromium`, which `make setup` runs), or FEDSSL_CHROMIUM=/path/to/chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: `pip install -e '.[test]'` (make setup) installs it")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1300, "height": 1000})
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    opened.errors = errors
    yield opened
    context.close()
