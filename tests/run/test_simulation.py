"""End to end: `fedssl simulate` runs a real 2-site x 2-round Flower simulation, evaluates and reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fedssl.layout import RunDir
from fedssl.models import build_encoder, encoder_state_keys
from fedssl.privacy.analysis import epsilon_of
from fedssl.run.server_marks import read_done

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "experiments" / "digits-tiny.yaml"
TARGET_EPSILON = 8.0  # digits-tiny includes privacy/eps8.yaml


def site_epsilons(run) -> dict[int, list[float]]:
    by_site: dict[int, list[tuple[int, float]]] = {}
    for r in run.records("site_round"):
        by_site.setdefault(r["site_id"], []).append((r["round"], r["epsilon"]))
    return {site: [eps for _, eps in sorted(rounds)] for site, rounds in by_site.items()}


@pytest.fixture(scope="module")
def run(reference_run):
    """The session's finished digits-tiny run (tests/reference_run.py)."""
    return reference_run


def test_simulate_exits_0_and_writes_the_run(run):
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-3000:]
    assert "Traceback" not in run.stderr
    for name in ("config.yaml", "metrics.jsonl", "encoder.pt", "server_done.json", "report.md", "evaluation.json"):
        assert (run.dir / name).is_file(), name
    assert "report written" in run.stdout
    assert (run.dir / "report.md").read_text().strip()
    # the ServerApp's done record, read by its one reader: the run id the sites saw, not resumed
    done = read_done(RunDir(run.dir))
    assert done.run_id.isdigit() and done.rounds == 2 and done.resumed_after is None and done.seconds > 0


def test_two_sites_trained_two_rounds(run):
    sites = run.records("site_round")
    assert sorted((r["site_id"], r["round"], r["status"]) for r in sites) == [
        (0, 1, "trained"), (0, 2, "trained"), (1, 1, "trained"), (1, 2, "trained")
    ]
    rounds = run.records("round")
    assert [(r["round"], r["num_trained"]) for r in rounds] == [(1, 2), (2, 2)]


def test_epsilon_grows_per_site_and_stays_within_budget(run):
    for site, (eps1, eps2) in site_epsilons(run).items():
        assert 0 < eps1 < eps2 <= TARGET_EPSILON, site
        assert eps2 >= TARGET_EPSILON - 0.01, site  # the plan is calibrated to spend the budget
    for r in run.records("round"):
        same_round = [s["epsilon"] for s in run.records("site_round") if s["round"] == r["round"]]
        assert r["max_epsilon"] == max(same_round)


def test_final_encoder_has_exactly_the_encoders_keys(run):
    config = yaml.safe_load((run.dir / "config.yaml").read_text())
    m = config["model"]
    assert m["input_shape"] == [1, 8, 8]  # saved, resolved, for the server
    expected = encoder_state_keys(build_encoder(m["encoder"], m["input_shape"], width=m["width"], depth=m["depth"]))
    state = torch.load(run.dir / "encoder.pt", weights_only=True)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    initial = build_encoder(m["encoder"], m["input_shape"], width=m["width"], depth=m["depth"], seed=config["run"]["seed"]).state_dict()
    assert any(not torch.equal(state[k], initial[k]) for k in expected)  # the federation changed it


def test_each_site_state_matches_what_the_server_recorded(run):
    last = {site: epsilons[-1] for site, epsilons in site_epsilons(run).items()}
    delta = yaml.safe_load((run.dir / "config.yaml").read_text())["privacy"]["delta"]
    for site in (0, 1):
        state_dir = run.dir / "sites" / f"site-{site:03d}"
        assert (state_dir / "ledger.jsonl").is_file() and (state_dir / "accountant.json").is_file()
        state = json.loads((state_dir / "accountant.json").read_text())
        assert len(state["history"]) == 2
        assert epsilon_of([tuple(e) for e in state["history"]], delta) == pytest.approx(last[site], rel=1e-9)
        ledger = [json.loads(line) for line in (state_dir / "ledger.jsonl").read_text().splitlines() if line.strip()]
        events = [r["body"] for r in ledger if r["kind"] == "dp_event"]
        assert [e["round"] for e in events] == [1, 2]
        assert events[-1]["epsilon_after"] == pytest.approx(last[site], rel=1e-12)


def _flower_processes_of(run_dir: Path) -> list[str]:
    """Command lines of live processes started for ``run_dir`` (its private FLWR_HOME / staged app)."""
    from fedssl.run.flower_runtime import command_lines

    return [c for _, c in command_lines() if str(run_dir) in c and ("flwr" in c or "flower" in c)]


def test_results_are_ready_before_flower_has_exited_and_nothing_is_left_running(run):
    """The evaluation starts at SERVER_DONE, overlapping Flower's shutdown; the run still ends with Flower gone."""
    summary = json.loads((run.dir / "summary.json").read_text())
    assert 0 < summary["federation_seconds"] < summary["flwr_exit_seconds"] < summary["wall_seconds"]
    assert not list(run.dir.glob("*.tmp"))  # SERVER_DONE is written atomically
    assert _flower_processes_of(run.dir) == []


def test_a_run_whose_server_fails_is_an_error_not_a_result(tmp_path):
    """No SERVER_DONE: `run_federation` raises (Flower itself exits 0) and leaves no Flower process behind."""
    from fedssl.config import load_config
    from fedssl.run.pipeline import prepare_run_dir
    from fedssl.run.simulation import SimulationError, run_federation

    config = load_config(TINY, [f"run.output_dir={tmp_path}", "federation.rounds=1"])
    config.model.input_shape = [1, 8, 8]
    run_dir = prepare_run_dir(config, overwrite=True)
    (run_dir / "config.yaml").unlink()  # the ServerApp's first read fails
    with pytest.raises(SimulationError, match="federated run failed"):
        run_federation(config, run_dir, stream=False)
    assert not (run_dir / "server_done.json").exists()
    assert _flower_processes_of(run_dir) == []


def _run_files(run_dir: Path) -> list[str]:
    """The run dir's file list, less what only `fedssl simulate` keeps: its private FLWR_HOME and the
    `flwr run` output it captures (a stock `flwr run` prints that to its own terminal)."""
    files = (str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())
    return sorted(f for f in files if not f.startswith(".flwr/") and f != "flwr.log")


def test_stock_flwr_run_with_the_default_run_config_writes_the_same_run_dir(run, tmp_path, monkeypatch):
    """`flwr run . local` as Flower documents it (its own default config.toml and local SuperLink, pyproject's
    default run config), then `fedssl evaluate RUN_DIR`: the same files, ledgers and report as `fedssl simulate`."""
    from fedssl.run.flower_runtime import flower_bin, flower_env, free_port
    from fedssl.run.simulation import start_local_superlink, stop_local_superlink

    home = tmp_path / "flwr-home"
    home.mkdir()
    env = flower_env(home, pythonpath=[ROOT])
    http_port, control_port = free_port(), free_port()
    env.update(FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http_port), FLWR_LOCAL_CONTROL_API_PORT=str(control_port))
    monkeypatch.chdir(tmp_path)  # where `flwr run` is run from: its SuperLink's, and so the apps', working dir
    try:
        # Flower's own command line for the `local` connection's SuperLink, started here because `flwr run`
        # gives the one it starts 15 s (hard-coded), too little on a loaded CI machine; `flwr run` finds it up.
        start_local_superlink(env, home, http_port, control_port)
        done = subprocess.run([flower_bin("flwr"), "run", str(ROOT), "local", "--stream"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=400)
    finally:
        stop_local_superlink(control_port)  # `flwr run` leaves its local SuperLink running
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [run_dir] = (tmp_path / "runs").glob("flwr-run-*")  # <run.output_dir>/<run.name>-<Flower run id>
    assert f"fedssl evaluate {run_dir}" in done.stdout + done.stderr
    evaluated = subprocess.run([str(Path(sys.executable).parent / "fedssl"), "evaluate", str(run_dir)],
                               capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert _run_files(run_dir) == _run_files(run.dir)
    stock = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert sorted((r["site_id"], r["round"], r["status"]) for r in stock if r["kind"] == "site_round") == [
        (0, 1, "trained"), (0, 2, "trained"), (1, 1, "trained"), (1, 2, "trained")]
    assert "## Run summary" in (run_dir / "report.md").read_text()
