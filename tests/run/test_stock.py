"""Stock `flwr run .` (fedssl.run.stock): both apps resolve the same config and run dir on their own,
the ServerApp prepares the run dir or refuses in one line, and `fedssl evaluate` finishes the run.

The real `flwr run .` end to end is in tests/run/test_simulation.py (slow)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import yaml

from fedssl.cli import main
from fedssl.errors import ConfigError, FedSSLError
from fedssl.fl.keys import NODE_PARTITION_ID, NODE_SITE_CONFIG, RUN_CONFIG_PATH, RUN_DIR
from fedssl.layout import RunDir
from fedssl.run.pipeline import finish_run_dir
from fedssl.run.server_marks import ServerDone, write_done, write_failed
from fedssl.run.stock import APP_ROOT, DEFAULT_CONFIG, launch_run_config, prepare_stock_run, resolve_launch

TINY = APP_ROOT / DEFAULT_CONFIG


def _pyproject_run_config() -> dict:
    import tomllib

    return tomllib.loads((APP_ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_defaults_resolve_to_the_tiny_config_and_a_run_dir_per_flower_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    launch = resolve_launch(_pyproject_run_config(), 42)
    assert launch.stock and launch.source == TINY
    assert launch.run_dir == tmp_path / "runs" / "flwr-run-42"
    assert resolve_launch(_pyproject_run_config(), 43).run_dir.name == "flwr-run-43"  # a second `flwr run` never reuses it
    assert launch.run_config({"resume": ""}) == {"resume": "", RUN_CONFIG_PATH: str(TINY), RUN_DIR: str(launch.run_dir)}


def test_a_fedssl_launchers_run_config_is_taken_as_given(tmp_path):
    given = {RUN_CONFIG_PATH: str(RunDir(tmp_path).config), RUN_DIR: str(tmp_path)}
    launch = resolve_launch(given, 7)
    assert not launch.stock and launch.run_dir == tmp_path and launch.config_path == RunDir(tmp_path).config


def test_run_config_overrides_relative_to_the_app_or_absolute(tmp_path):
    relative = resolve_launch({RUN_CONFIG_PATH: "configs/experiments/digits-nodp.yaml", RUN_DIR: str(tmp_path / "r")}, 1)
    assert relative.source == APP_ROOT / "configs/experiments/digits-nodp.yaml" and relative.run_dir == tmp_path / "r"
    assert resolve_launch({RUN_CONFIG_PATH: str(TINY), RUN_DIR: ""}, 1).source == TINY
    with pytest.raises(ConfigError, match="config-path 'nope.yaml' is not a file"):
        resolve_launch({RUN_CONFIG_PATH: "nope.yaml"}, 1)


def test_the_clientapp_resolves_the_same_config_and_run_dir(tmp_path):
    run_config = {RUN_CONFIG_PATH: str(TINY), RUN_DIR: str(tmp_path / "run")}
    simulated = SimpleNamespace(node_config={NODE_PARTITION_ID: 1}, run_config=run_config, run_id=5)
    assert launch_run_config(simulated) == {RUN_CONFIG_PATH: str(TINY), RUN_DIR: str(tmp_path / "run")}
    deployed = SimpleNamespace(node_config={NODE_SITE_CONFIG: "site.yaml"}, run_config=run_config, run_id=5)
    assert launch_run_config(deployed) is run_config  # a deployed site names its own site.yaml


def test_prepare_writes_the_resolved_config_once(tmp_path):
    launch = resolve_launch({RUN_CONFIG_PATH: str(TINY), RUN_DIR: str(tmp_path / "run")}, 1)
    prepare_stock_run(launch)
    saved = yaml.safe_load(launch.config_path.read_text())
    assert saved["run"]["name"] == "flwr-run" and saved["model"]["input_shape"] == [1, 8, 8]
    before = launch.config_path.read_bytes()
    with pytest.raises(ConfigError, match="holds a run already"):
        prepare_stock_run(launch)
    assert launch.config_path.read_bytes() == before


@pytest.mark.parametrize("extra, field", [
    ({"warm_start": {"source": "synthetic"}}, "warm_start.enabled"),
    ({"model": {"input_shape": []}}, "model.input_shape"),
])
def test_prepare_refuses_what_needs_data_or_torch(tmp_path, extra, field):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"include": [str(TINY)], **extra}))
    launch = resolve_launch({RUN_CONFIG_PATH: str(config), RUN_DIR: str(tmp_path / "run")}, 1)
    with pytest.raises(ConfigError, match=field):
        prepare_stock_run(launch)
    assert not (tmp_path / "run").exists()


def test_finish_needs_a_finished_run_and_writes_its_summary(tmp_path):
    with pytest.raises(FedSSLError, match="not a run directory"):
        finish_run_dir(tmp_path)
    launch = resolve_launch({RUN_CONFIG_PATH: str(TINY), RUN_DIR: str(tmp_path)}, 1)
    prepare_stock_run(launch)
    run = RunDir(tmp_path)
    with pytest.raises(FedSSLError, match="did not finish .*flwr log"):
        finish_run_dir(tmp_path)
    write_failed(run, "1", "every site failed in round 1")
    with pytest.raises(FedSSLError, match="every site failed in round 1"):
        finish_run_dir(tmp_path)
    write_done(run, ServerDone(run_id="1", rounds=2, resumed_after=None, seconds=12.5))
    finish_run_dir(tmp_path)
    assert json.loads(run.summary.read_text()) == {"run_name": "flwr-run", "federation_seconds": 12.5, "launcher": "flwr run"}


def test_evaluate_of_an_unfinished_run_is_one_line(tmp_path, capsys):
    prepare_stock_run(resolve_launch({RUN_CONFIG_PATH: str(TINY), RUN_DIR: str(tmp_path)}, 1))
    assert main(["evaluate", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did not finish" in err[0]
