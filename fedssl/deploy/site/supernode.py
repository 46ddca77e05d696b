"""Running a site: preflight, then the Flower SuperNode and the fedssl site runner until stopped.

The SuperNode (``--isolation process``) only holds tasks; the site runner (runner.py) takes
them from its local Runtime API, checks the app bundle against the site's allowlist and runs
the site's own installed ClientApp. Flower's SuperExec, which would install and run the
coordinator's bundle, is never started.

``fedssl site start`` blocks here. The agent follows the SuperNode's log to report progress
and to tell why it exited; after a crash it rejoins while the coordinator still holds the
site's previous session. Starts, joins, stops and exits go to the site's event log.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from fedssl.deploy.site.config import SiteConfig, load_site_config
from fedssl.deploy.site.events import read_events, record_event
from fedssl.deploy.site.preflight import format_checklist, preflight, preflight_passed
from fedssl.errors import FedSSLError

SUPERNODE_LOG = "supernode.log"
RUNNER_LOG = "runner.log"


class SiteStartError(FedSSLError):
    """The site could not join the federation."""


# Flower's SuperNode log: the node joined / the SuperLink refused to activate it. The
# SuperLink gives the same answer (code 2004) for an unregistered key and for a key whose
# previous session it still holds (a crash: it releases the node only after missing two
# 30 s heartbeats), so the agent tells them apart from its own record of the last session.
_JOINED = "SuperNode ID:"
_ACTIVATION_FAILED = "Failed to activate SuperNode"
_LIFECYCLE = ("supernode_joined", "supernode_stop", "supernode_exit")


def previous_session_unclean(config: SiteConfig) -> bool:
    """True when this site's last SuperNode joined and never stopped cleanly (a crash)."""
    lifecycle = [e["kind"] for e in read_events(config) if e.get("kind") in _LIFECYCLE]
    return bool(lifecycle) and lifecycle[-1] == "supernode_joined"


def supernode_commands(config: SiteConfig, config_path: Path, runtime_port: int) -> tuple[list[str], list[str]]:
    """The SuperNode's command and the site runner's (which serves the SuperNode's Runtime API port)."""
    from fedssl.deploy.site.runner import runner_command
    from fedssl.run.flower_runtime import flower_bin

    node_config = f"site-config='{config_path}'"
    supernode = [
        flower_bin("flower-supernode"),
        "--superlink", config.coordinator.address,
        "--root-certificates", config.coordinator.root_certificates,
        "--auth-supernode-private-key", config.keys.node_key,
        "--isolation", config.supernode.isolation,
        "--host", "127.0.0.1", "--port", str(runtime_port),
        "--max-wait-time", str(config.supernode.connect_timeout),
        "--node-config", node_config,
    ]
    return supernode, runner_command(config_path, runtime_port)


def start_site(config_path: str | Path, *, echo=print) -> int:
    """Preflight, then run the SuperNode (and its SuperExec) until stopped; rejoin after a crash.

    Returns the exit code. Blocks; SIGTERM/SIGINT stop the SuperNode cleanly.
    """
    from fedssl.run.flower_runtime import STATE_FLOWER_HOME, flower_env

    config_path = Path(config_path).expanduser().resolve()
    config = load_site_config(config_path)
    _preflight_or_refuse(config, echo)
    state = config.state_path
    env = flower_env(state / STATE_FLOWER_HOME)
    (state / STATE_FLOWER_HOME).mkdir(parents=True, exist_ok=True)
    stopping = {"now": False}
    rejoining = previous_session_unclean(config)
    if rejoining:
        echo("fedssl: the last session of this site ended without a clean stop (crash?); rejoining")

    def _stop(signum, frame):
        stopping["now"] = True

    previous = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _supervise(config, config_path, env, stopping, rejoining, echo)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _preflight_or_refuse(config: SiteConfig, echo) -> None:
    echo(f"fedssl: site {config.site.name} preflight")
    checks = preflight(config)
    echo(format_checklist(checks))
    if not preflight_passed(checks):
        failed = [c.name for c in checks if not c.ok and c.blocking]
        raise SiteStartError(f"preflight failed ({', '.join(failed)}); the site did not start")


def _supervise(config: SiteConfig, config_path: Path, env, stopping: dict, rejoining: bool, echo) -> int:
    """Run SuperNode sessions until the operator stops the site (0) or it cannot (re)join (raises)."""
    deadline_rejoin = None
    while True:
        code, reason = _run_session(config, config_path, env, stopping, echo)
        if stopping["now"]:
            record_event(config, "supernode_stop", reason="operator")
            echo("fedssl: site stopped")
            return 0
        if reason == "activation_failed" and rejoining:
            deadline_rejoin = deadline_rejoin or time.monotonic() + config.supernode.rejoin_timeout
            if time.monotonic() < deadline_rejoin:
                echo("fedssl: the coordinator still holds this site's previous session; it releases it within ~60 s. Retrying in 5 s")
                _sleep_unless(5, stopping)
                continue
            record_event(config, "supernode_exit", reason="rejoin timed out")
            raise SiteStartError(f"the coordinator kept this site's previous session for {config.supernode.rejoin_timeout:.0f} s; try again later")
        record_event(config, "supernode_exit", code=code, reason=reason)
        if reason == "activation_failed":
            raise SiteStartError(
                f"the coordinator refused this site's node key: {config.keys.node_key}.pub is not registered there "
                "(send it to the coordinator), or a SuperNode with this key is already connected"
            )
        raise SiteStartError(f"SuperNode exited (code {code}): {reason}; see {config.state_path / SUPERNODE_LOG}")


def _run_session(config: SiteConfig, config_path: Path, env, stopping: dict, echo) -> tuple[int | None, str]:
    """Start one SuperNode and its site runner, follow it until it exits or we stop, then stop both."""
    from fedssl.deploy.processes import ManagedProcess
    from fedssl.run.flower_runtime import free_port

    state = config.state_path
    port = config.supernode.port or free_port()
    supernode_cmd, runner_cmd = supernode_commands(config, config_path, port)
    log_start = _log_size(state / SUPERNODE_LOG)
    node = ManagedProcess("SuperNode", supernode_cmd, state / SUPERNODE_LOG, env, new_group=False)
    runner = None
    record_event(config, "supernode_start", pid=node.pid, coordinator=config.coordinator.address)
    echo(f"fedssl: SuperNode started (pid {node.pid}), connecting to {config.coordinator.address}; log {state / SUPERNODE_LOG}")
    try:
        runner = ManagedProcess("site runner", [*runner_cmd, "--parent-pid", str(node.pid)], state / RUNNER_LOG, env,
                                new_group=False)
        return _watch(node, log_start, stopping, echo, lambda: record_event(config, "supernode_joined", pid=node.pid), runner)
    finally:
        node.stop()
        if runner is not None:
            runner.stop()


def _log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _sleep_unless(seconds: float, stopping: dict) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end and not stopping["now"]:
        time.sleep(0.2)


def _watch(node, log_start: int, stopping: dict, echo, on_joined, runner=None) -> tuple[int | None, str]:
    """Follow the SuperNode's log until it or the site runner exits, or we are asked to stop."""
    from fedssl.run.flower_runtime import failure_reason

    seen, joined = log_start, False
    while not stopping["now"]:
        data = _read_from(node.log_path, seen)
        seen += len(data.encode())
        for line in data.splitlines():
            if _JOINED in line and not joined:
                joined = True
                on_joined()
            message = _progress(line)
            if message:
                echo(message)
        if runner is not None and not runner.alive() and node.alive():
            # without its runner the SuperNode would hold every task until it expires: stop the site
            return runner.proc.returncode, f"the site runner exited (code {runner.proc.returncode}); see {runner.log_path}"
        if not node.alive():
            tail = _read_from(node.log_path, log_start)
            if joined:
                return node.proc.returncode, f"disconnected after joining ({failure_reason(tail)})"
            if _ACTIVATION_FAILED in tail:
                return node.proc.returncode, "activation_failed"
            return node.proc.returncode, failure_reason(tail)
        time.sleep(0.3)
    return None, "stopped"


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def _progress(line: str) -> str | None:
    if "SuperNode ID:" in line:
        return "fedssl: joined the federation (" + line.split("SuperNode ID:", 1)[1].strip() + " is this site's node id)"
    if "Receiving:" in line:
        return "fedssl: received a training request"
    if "Sent successfully" in line:
        return "fedssl: reply sent (encoder weights + whitelisted metrics)"
    return None
