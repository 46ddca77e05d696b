"""The fedssl site runner's pieces, without processes: the app hash of a bundle (every file counts),
the refusal before anything from the bundle is used, and which ClientApp an approved task runs."""

from __future__ import annotations

import io
import shutil
import time
import uuid
import zipfile
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.clientapp import ClientApp

from test_deploy import PROJECT_ROOT, site_dir, write_site  # noqa: F401 - site_dir is a fixture

SMALL_APP = ("fedssl/__init__.py", "clients/__init__.py", "clients/client_app.py", "server/__init__.py",
             "server/server_app.py", "pyproject.toml", ".gitignore")


@pytest.fixture(scope="module")
def app_dir(tmp_path_factory) -> Path:
    """A small project directory `flwr build` accepts (the real pyproject and ClientApp files)."""
    root = tmp_path_factory.mktemp("app")
    for name in SMALL_APP:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(PROJECT_ROOT / name, root / name)
    return root


def add_to_bundle(fab: bytes, name: str, content: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(fab)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        dst.writestr(name, content)
    return out.getvalue()


def test_app_hash_is_the_hash_of_the_bundle_flwr_ships(app_dir, tmp_path):
    from flwr.cli.build import build_fab_from_disk

    from fedssl.deploy.site.pinning import app_hash, bundle_hash

    fab = build_fab_from_disk(app_dir)  # what `flwr run <app_dir>` sends
    (tmp_path / "app.fab").write_bytes(fab)
    assert app_hash(app_dir) == app_hash(tmp_path / "app.fab") == bundle_hash(fab)
    # every file counts: an extra package, or a changed non-Python file, is another app
    shadowed = add_to_bundle(fab, "opacus/__init__.py", b"# shadow\n")
    assert bundle_hash(shadowed) != bundle_hash(fab)
    (app_dir / "NOTES.md").write_text("changed\n")
    try:
        assert app_hash(app_dir) != bundle_hash(fab)
    finally:
        (app_dir / "NOTES.md").unlink()


def test_app_hash_errors_are_one_line(tmp_path):
    from fedssl.deploy.site.pinning import app_hash
    from fedssl.errors import ConfigError

    (tmp_path / "junk.fab").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="junk.fab: app bundle: not a readable .fab"):
        app_hash(tmp_path / "junk.fab")
    with pytest.raises(ConfigError, match="cannot build its app bundle"):
        app_hash(tmp_path)  # no pyproject.toml
    with pytest.raises(ConfigError, match="not an app directory or .fab"):
        app_hash(tmp_path / "missing")


def train_message() -> Message:
    metadata = Metadata(run_id=7, message_id=uuid.uuid4().hex, src_node_id=0, dst_node_id=42, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=3600.0, message_type="train")
    return Message(content=RecordDict({"config": ConfigRecord({"x": 1})}), metadata=metadata)


def recording_app(calls: list) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        calls.append(msg)
        return Message(content=RecordDict(), reply_to=msg)

    return app


def task(fab: bytes):
    from fedssl.deploy.site.runner import TaskInput

    context = Context(run_id=7, node_id=42, node_config={}, state=RecordDict(), run_config={})
    return TaskInput(message=train_message(), context=context, run_id=7, fab=fab)


def test_a_bundle_not_in_the_allowlist_is_refused_before_the_app_runs(site_dir, app_dir):  # noqa: F811
    from flwr.cli.build import build_fab_from_disk

    from fedssl.deploy.site.config import load_site_config
    from fedssl.deploy.site.events import read_events
    from fedssl.deploy.site.pinning import bundle_hash
    from fedssl.deploy.site.runner import handle_task

    genuine = build_fab_from_disk(app_dir)
    path = write_site(site_dir, **{"apps.allowed_hashes": [bundle_hash(genuine)]})
    calls: list = []
    shadowed = add_to_bundle(genuine, "opacus/__init__.py", b"raise SystemExit('imported the bundle')\n")
    for fab, what in ((shadowed, "is not in apps.allowed_hashes"), (b"not a zip", "not a readable .fab")):
        reply, completed = handle_task(task(fab), path, recording_app(calls))
        assert not completed and reply.has_error() and reply.error.reason.startswith("app refused: run 7: ")
        assert what in reply.error.reason
    assert calls == []  # nothing trained
    events = [e for e in read_events(load_site_config(path)) if e["kind"] == "app_refused"]
    assert [e["app_hash"] for e in events] == [bundle_hash(shadowed), ""]
    assert not (site_dir / "state" / "ledger.jsonl").exists()

    reply, completed = handle_task(task(genuine), path, recording_app(calls))
    assert completed and not reply.has_error() and len(calls) == 1


def test_a_failing_app_is_an_error_reply_not_a_crash(site_dir, app_dir):  # noqa: F811
    from flwr.cli.build import build_fab_from_disk

    from fedssl.deploy.site.pinning import bundle_hash
    from fedssl.deploy.site.runner import handle_task

    genuine = build_fab_from_disk(app_dir)
    path = write_site(site_dir, **{"apps.allowed_hashes": [bundle_hash(genuine)]})
    broken = ClientApp()

    @broken.train()
    def train(msg, context):
        raise RuntimeError("boom")

    reply, completed = handle_task(task(genuine), path, broken)
    assert not completed and "boom" in reply.error.reason


def test_the_runner_runs_the_sites_own_client_app():
    import clients.client_app

    from fedssl.deploy.site.runner import load_site_client_app, runner_command

    assert load_site_client_app() is clients.client_app.app
    assert Path(clients.client_app.__file__).resolve().is_relative_to(PROJECT_ROOT)
    cmd = runner_command(Path("/x/site.yaml"), 9999)
    assert cmd[1:4] == ["-P", "-m", "fedssl.deploy.site.runner"] and "127.0.0.1:9999" in cmd
    with pytest.raises(TypeError, match="is not a flwr ClientApp"):
        load_site_client_app("fedssl.deploy.site.runner:CLIENT_APP_REF")


def test_the_agent_stops_the_site_when_its_runner_dies(tmp_path):
    import sys

    from fedssl.deploy.processes import ManagedProcess
    from fedssl.deploy.site.supernode import _watch

    node = ManagedProcess("node", [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "node.log", {}, new_group=False)
    runner = ManagedProcess("runner", [sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "runner.log", {}, new_group=False)
    try:
        code, reason = _watch(node, 0, {"now": False}, lambda _: None, lambda: None, runner)
    finally:
        node.stop(grace=1)
        runner.stop(grace=1)
    assert code == 3 and reason.startswith("the site runner exited (code 3)")
