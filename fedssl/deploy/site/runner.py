"""The fedssl site runner: the site's executor for Flower tasks, in place of Flower's SuperExec.

Flower's own executor installs the app bundle (FAB) the coordinator sent and imports it with
the bundle directory first on ``sys.path``, so any package in the bundle (a fake ``opacus/``)
shadows the site's own. The runner never installs or imports the bundle. For each task the
SuperNode holds (``--isolation process``), it talks to the SuperNode's local Runtime API on
127.0.0.1 as ``flower-superexec`` and ``flwr-clientapp`` do:

1. ``AcquireTask`` — a ClientApp task and its token;
2. ``PullTaskInput`` / ``PullMessages`` — the message, context, run and the bundle's bytes;
3. the bundle's hash against ``apps.allowed_hashes`` (pinning.py), before anything else;
4. refused: one logged line, a site event, an error reply to the coordinator, nothing trained;
   approved: the site's OWN installed ClientApp (``clients.client_app:app``, imported from the
   site's install, never from the bundle) handles the message in this process;
5. ``PushMessages`` / ``PushTaskOutput`` — the reply and the updated context.

The site's installation (the fedssl and clients packages this interpreter imports) is the
trusted code base: the allowlist says which coordinator runs the site takes part in, the install
says what code runs. One long-lived process also keeps torch and Opacus loaded between rounds,
where Flower starts a new Python process per message.

Run by the site agent (supernode.py): ``python -P -m fedssl.deploy.site.runner ...`` (``-P``: the
working directory is not put on ``sys.path``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedssl.deploy.site.pinning import AppNotApprovedError, check_bundle_approved

log = logging.getLogger("fedssl.site.runner")

# The ClientApp the site runs, from its own install (pyproject's [tool.flwr.app.components]).
# Loaded by name, as Flower's loader does: fedssl does not import clients/ statically.
CLIENT_APP_REF = "clients.client_app:app"
# How often the runner asks the SuperNode for a task (loopback, one small request).
DEFAULT_POLL_SECONDS = 0.1


@dataclass
class TaskInput:
    message: Any
    context: Any
    run_id: int
    fab: bytes


def load_site_client_app(ref: str = CLIENT_APP_REF):
    """The site's own ClientApp object, imported from this interpreter's install."""
    from flwr.clientapp import ClientApp

    module_name, _, attribute = ref.partition(":")
    app = getattr(importlib.import_module(module_name), attribute)
    if not isinstance(app, ClientApp):
        raise TypeError(f"{ref} is not a flwr ClientApp")
    return app


def handle_task(task: TaskInput, config_path: Path, client_app) -> tuple[Any, bool]:
    """(reply, completed): the pinning check, then the site's ClientApp; never raises."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode

    from fedssl.deploy.site.config import current_site_config

    try:
        check_bundle_approved(current_site_config(config_path), task.fab, run_id=task.run_id)
        return client_app(message=task.message, context=task.context), True
    except AppNotApprovedError as err:
        code, reason = ErrorCode.CLIENT_APP_RAISED_EXCEPTION, str(err)
    except Exception as ex:  # noqa: BLE001 - reported to the coordinator as Flower's ClientApp process would
        log.error("ClientApp raised an exception", exc_info=ex)
        code, reason = ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(ex)}:<'{ex}'>"
    return Message(Error(code=code, reason=reason), reply_to=task.message), False


class RuntimeConnection:
    """The Flower-facing part: the SuperNode's local Runtime API, as Flower's own processes use it."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.client = self._client("SuperExec")

    def _client(self, component: str, token: str | None = None):
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        interceptors = [RuntimeVersionHttpInterceptor(component_name=component)]
        if token is not None:
            interceptors.append(RuntimeTokenHttpInterceptor(token))
        return RuntimeHttpClient.from_server_address(server_address=self.address, insecure=True, root_certificates=None,
                                                     interceptors=interceptors, retry_invoker=make_simple_http_retry_invoker())

    def acquire(self) -> str | None:
        """The token of a pending ClientApp task, or None."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
        from flwr.supercore.constant import TaskType

        res = self.client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP], agentapp_fab_hashes=[]))
        return res.token if res.HasField("task") and res.token else None

    def run_task(self, token: str, handler) -> None:
        """Pull the task's input, let ``handler`` make the reply, push reply and context back."""
        from flwr.common.constant import SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
        from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

        client = self._client("flwr-clientapp", token)
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        context, status, details = None, SubStatus.FAILED, "fedssl site runner: task input could not be read"
        try:
            message, context, run, fab = pull_task_input(client)
            reply, completed = handler(TaskInput(message, context, run.run_id, fab.content))
            status, details = (SubStatus.COMPLETED, "") if completed else (SubStatus.FAILED, reply.error.reason)
            push_message(client, reply, context)
        finally:
            push_task_output(client=client, context=context, sub_status=status, details=details)
            heartbeat.stop()
            client.close()

    def close(self) -> None:
        self.client.close()


def serve(config_path: Path, address: str, poll_seconds: float, should_stop=lambda: False) -> None:
    """Execute the SuperNode's ClientApp tasks until ``should_stop()`` (or the process is killed)."""
    client_app = load_site_client_app()
    connection = RuntimeConnection(address)
    log.info("fedssl site runner: serving %s with the site's own %s (%s)", address, CLIENT_APP_REF,
             Path(sys.modules[CLIENT_APP_REF.partition(":")[0]].__file__).parent)
    try:
        while not should_stop():
            token = connection.acquire()
            if token is None:
                time.sleep(poll_seconds)
                continue
            try:
                connection.run_task(token, lambda task: handle_task(task, config_path, client_app))
            except (Exception, KeyboardInterrupt) as ex:  # noqa: BLE001 - one task must not stop the site
                # KeyboardInterrupt too: on a revoked task token (HTTP 401, e.g. the run was stopped
                # mid-task) Flower's retry invoker SIGINTs its own process, as flwr-clientapp exits then.
                log.error("fedssl site runner: task failed: %r", ex)
    finally:
        connection.close()


def runner_command(config_path: Path, runtime_port: int, parent_pid: int | None = None) -> list[str]:
    """How the site agent starts the runner: this interpreter, the site's install."""
    cmd = [sys.executable, "-P", "-m", __name__, "--site-config", str(config_path),
           "--runtime-api-address", f"127.0.0.1:{runtime_port}"]
    return cmd + (["--parent-pid", str(parent_pid)] if parent_pid is not None else [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedssl-site-runner", description=__doc__.splitlines()[0])
    parser.add_argument("--site-config", required=True, type=Path)
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--parent-pid", type=int, help="exit when this process (the SuperNode) exits")
    parser.add_argument("--poll", type=float, default=DEFAULT_POLL_SECONDS, help="seconds between task checks")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per task poll otherwise (10 a second)
    if args.parent_pid is not None:
        from flwr.supercore.app_utils import start_parent_process_monitor

        start_parent_process_monitor(args.parent_pid)
    serve(args.site_config, args.runtime_api_address, args.poll)
    return 0


if __name__ == "__main__":
    sys.exit(main())
