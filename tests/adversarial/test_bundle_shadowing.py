"""Attack: the coordinator ships a bundle that shadows the site's Opacus with a zero-noise one.

The bundle holds every file of the approved app plus a top-level ``opacus/`` package. Flower puts
an installed bundle first on ``sys.path``, so if any code of the bundle were imported at the site,
``import opacus`` would load the fake: it loads the real Opacus, replaces its noise with zeros and
writes a marker file each time it is used. The site must refuse the bundle (it is not the app
the site approved), train nothing and charge nothing — and still train with the genuine bundle.

Real processes on 127.0.0.1: `fedssl server start` (SuperLink, TLS, node authentication) and
`fedssl site start` (SuperNode + the site's runner), one site, one round per run.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest

from deploy_processes import FEDSSL, Procs, ledger_records, stop_agent, text, wait_until

pytestmark = pytest.mark.slow

SHADOW_OPACUS = '''
"""Not Opacus: loads the real one, then makes its noise zero."""
import importlib, os, sys
MARKER = {marker!r}
with open(MARKER, "a") as f:
    f.write("shadow opacus imported\\n")
_bundle = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_saved = list(sys.path)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _bundle]
del sys.modules["opacus"]
try:
    _real = importlib.import_module("opacus")
    importlib.import_module("opacus.optimizers")
finally:
    sys.path[:] = _saved


def _zero_noise(std, reference, *args, **kwargs):
    import torch
    with open(MARKER, "a") as f:
        f.write("zero noise\\n")
    return torch.zeros_like(reference)


for _name, _module in list(sys.modules.items()):
    if _name.startswith("opacus.") and hasattr(_module, "_generate_noise"):
        _module._generate_noise = _zero_noise
sys.modules["opacus"] = _real
'''


def shadowing_app(root: Path, marker: Path) -> Path:
    """Every file of the approved app's bundle, plus a top-level ``opacus/`` package."""
    from flwr.cli.build import build_fab_from_disk

    from fedssl.run.flower_runtime import PROJECT_ROOT

    app = root / "shadow-app"
    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(PROJECT_ROOT))) as genuine:
        for name in genuine.namelist():
            if not name.startswith(".info/"):
                (app / name).parent.mkdir(parents=True, exist_ok=True)
                (app / name).write_bytes(genuine.read(name))
    (app / "opacus").mkdir()
    (app / "opacus" / "__init__.py").write_text(SHADOW_OPACUS.format(marker=str(marker)))
    return app


def run_once(procs: Procs, fed, name: str, app: Path | None) -> tuple[str, str]:
    """One coordinator run (app: the bundle it ships) with the site's agent; (server log, agent log)."""
    import yaml

    server_yaml = yaml.safe_load(fed.server_yaml.read_text())
    server_yaml["set"] = [s for s in server_yaml["set"] if not s.startswith("run.name=")] + [f"run.name={name}"]
    server_yaml.pop("app", None)
    if app is not None:
        server_yaml["app"] = str(app)
    fed.server_yaml.write_text(yaml.safe_dump(server_yaml, sort_keys=False))
    server, server_log = procs.start(f"server-{name}", [FEDSSL, "server", "start", "--config", str(fed.server_yaml)])
    wait_until(lambda: "registered site site-a" in text(server_log) or server.poll() is not None, 180, "the SuperLink to start")
    agent, agent_log = procs.start(f"site-{name}", [FEDSSL, "site", "start", "--config", str(fed.site_yamls["site-a"])])
    try:
        server.wait(timeout=600)
    finally:
        stop_agent(agent)
    return text(server_log), text(agent_log)


def site_rounds(fed, name: str) -> list[dict]:
    path = fed.root / "runs" / name / "metrics.jsonl"
    return [r for r in map(json.loads, text(path).splitlines()) if r["kind"] == "site_round"]


def test_a_bundle_that_shadows_opacus_is_refused_and_the_genuine_one_trains(tmp_path_factory):
    from fedssl.deploy.localfed import make_local_federation
    from fedssl.deploy.site.config import load_site_config

    root = tmp_path_factory.mktemp("shadow")
    marker = root / "shadow-opacus-ran.log"
    fed = make_local_federation(root, ["site-a"], rounds=1)  # allowlist: the genuine app only
    state = load_site_config(fed.site_yamls["site-a"]).state_path
    procs = Procs(root)
    try:
        server_out, _ = run_once(procs, fed, "shadowed", shadowing_app(root, marker))
        # refused: nothing of the bundle ran, no noise-free step, nothing charged, the refusal logged
        assert not marker.exists(), f"the site imported the bundle's opacus: {marker.read_text()}"
        assert ledger_records(state, "dp_event") == []
        assert [r["status"] for r in site_rounds(fed, "shadowed")] == ["failed"], server_out
        assert "app refused" in site_rounds(fed, "shadowed")[0]["reason"]
        events = [json.loads(line) for line in text(state / "site_events.jsonl").splitlines()]
        refusals = [e for e in events if e["kind"] == "app_refused"]
        assert len(refusals) == 1 and "is not in apps.allowed_hashes" in refusals[0]["reason"], events
        assert "app refused" in text(state / "runner.log")

        # the same site trains with the genuine bundle (its own Opacus, with noise)
        server_out, agent_out = run_once(procs, fed, "genuine", None)
        assert [r["status"] for r in site_rounds(fed, "genuine")] == ["trained"], server_out + agent_out
        assert len(ledger_records(state, "dp_event")) == 1
        assert not marker.exists()
    finally:
        procs.kill_all()
