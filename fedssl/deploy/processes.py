"""Start, watch and stop the Flower processes of a deployment (SuperLink, SuperNode, SuperExec).

Every process gets its own log file and its own process group, so stopping it also stops
whatever it started (Flower's SuperExec, ClientApp/ServerApp processes). ``stop`` sends
SIGTERM to the group, then SIGKILL after a grace period.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fedssl.errors import FedSSLError
from fedssl.run.flower_runtime import failure_reason, signal_pid


class DeployError(FedSSLError):
    """A deployment process could not be started or failed."""


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise DeployError(f"address {address!r}: expected host:port, e.g. 127.0.0.1:9092")
    return host.strip("[]"), int(port)


def tls_probe(address: str, ca_path: Path, timeout: float = 5.0) -> tuple[bool, str, float | None]:
    """Open a TLS connection to ``address`` and verify its certificate against ``ca_path``.

    Returns (ok, detail, days until the server certificate expires).
    """
    host, port = split_address(address)
    try:
        context = ssl.create_default_context(cafile=str(ca_path))
    except (OSError, ssl.SSLError) as err:
        return False, f"cannot load {ca_path} ({err})", None
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=host) as tls:
                cert = tls.getpeercert()
    except ssl.SSLCertVerificationError as err:
        return False, f"{address}: TLS certificate does not verify against {ca_path} ({err.verify_message})", None
    except (ssl.SSLError, OSError) as err:
        return False, f"{address}: not reachable over TLS ({err})", None
    days = None
    if cert and "notAfter" in cert:
        days = (ssl.cert_time_to_seconds(str(cert["notAfter"])) - time.time()) / 86400
    return True, f"{address}: reachable, TLS certificate verified against {ca_path.name}", days


class ManagedProcess:
    """One child process, output to a log file.

    ``new_group=True`` (the coordinator's SuperLink) puts it in its own process group, and
    ``stop`` then stops everything it started. ``new_group=False`` (a site's SuperNode and
    SuperExec) keeps it in the caller's group, so killing the site agent's group kills the
    whole site at once — as a crash would.
    """

    def __init__(self, name: str, cmd: Sequence[str], log_path: Path, env: dict[str, str], cwd: Path | None = None,
                 *, new_group: bool = True) -> None:
        self.name = name
        self.new_group = new_group
        self.cmd = list(cmd)
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            cwd=str(cwd) if cwd else None, start_new_session=new_group,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``ready`` until true; fail if the process exits or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            if not self.alive():
                raise DeployError(f"{self.name} exited (code {self.proc.returncode}) before {what}; see {self.log_path}: {failure_reason(self.log_text())}")
            time.sleep(0.2)
        raise DeployError(f"{self.name}: {what} did not happen within {timeout:.0f} s; see {self.log_path}")

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM the process (group), SIGKILL it after ``grace`` seconds; return the exit code."""
        send = _signal_group if self.new_group else signal_pid
        if self.alive():
            send(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        # Children (SuperExec, app processes) may outlive their parent: kill the whole group.
        send(self.proc.pid, signal.SIGKILL)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()
        return self.proc.returncode


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass

