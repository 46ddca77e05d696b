"""Who may see the dashboard: loopback by default; anything else only exposed on purpose, with a token."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedssl.dashboard.app import check_bind, is_loopback
from fedssl.errors import ConfigError

FEDSSL = str(Path(sys.executable).parent / "fedssl")


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_loopback_needs_no_token(host):
    assert is_loopback(host) and check_bind(host, expose=False, token=None) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "dashboard.example.org"])
def test_any_other_address_is_refused_unless_exposed(host):
    assert not is_loopback(host)
    with pytest.raises(ConfigError, match="--expose"):
        check_bind(host, expose=False, token="given")
    assert check_bind(host, expose=True, token="given") == "given"
    generated = check_bind(host, expose=True, token=None)
    assert generated and len(generated) >= 24 and generated != check_bind(host, expose=True, token=None)


def test_non_loopback_bind_without_expose_is_refused_at_start(tmp_path):
    """The attack at start-up: bind every interface, no token. One line, exit 2, nothing listening."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("run: {name: x}\n")
    done = subprocess.run([FEDSSL, "dashboard", str(run), "--host", "0.0.0.0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--expose" in done.stderr and done.stderr.count("\n") == 1
    assert "Traceback" not in done.stderr and done.stdout == ""
