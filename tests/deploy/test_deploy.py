"""Deployment building blocks without Flower processes: site.yaml,
the site's own settings, app pinning, preflight, status, server.yaml."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from fedssl.cli import main as cli_main
from fedssl.deploy import pki
from fedssl.errors import ConfigError
from fedssl.run.flower_runtime import PROJECT_ROOT
from site_layout import write_site_yaml


# ---------------------------------------------------------------------------- site.yaml


@pytest.fixture
def site_dir(tmp_path):
    """A site laid out as an operator would: keys, data, CA, site.yaml with relative paths."""
    from fedssl.data.loaders import load_digits_labeled
    from fedssl.deploy.site.pinning import app_hash

    pki.init_ca(tmp_path / "certs")
    pki.init_node_key(tmp_path / "keys", "site-a")
    digits, _ = load_digits_labeled()
    (tmp_path / "data").mkdir()
    np.save(tmp_path / "data" / "a.npy", digits.inputs[:64].numpy())
    write_site_yaml(tmp_path, target_epsilon=1.0, site_id=3, data_path="data/a.npy", root_certificates="certs/ca.crt",
                    allowed_hashes=[app_hash(PROJECT_ROOT)])
    return tmp_path


def write_site(site_dir: Path, **changes) -> Path:
    data = yaml.safe_load((site_dir / "site.yaml").read_text())
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    path = site_dir / "site.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_site_config_resolves_paths_and_builds_settings(site_dir):
    from fedssl.deploy.site.config import load_site_config

    config = load_site_config(site_dir / "site.yaml")
    assert config.data.path == str(site_dir / "data" / "a.npy")
    settings = config.settings()
    assert settings.site_id == 3 and settings.state_dir == site_dir / "state"
    assert settings.privacy.target_epsilon == 1.0 and settings.key_path == site_dir / "keys" / "site-a.ed25519"
    assert settings.device == "cpu"


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"privacy.target_epsilon": -1}, "privacy.target_epsilon"),
        ({"site.id": -1}, "site.id"),
        ({"site.name": "../evil"}, "site.name"),
        ({"coordinator.address": "nohost"}, "coordinator.address"),
        ({"apps.allowed_hashes": ["md5:abc"]}, "apps.allowed_hashes[0]"),
        ({"supernode.isolation": "thread"}, "supernode.isolation"),
        ({"data.budget": 3}, "data.budget"),
        ({"keys.node_key": ""}, "keys.node_key"),
        ({"data.categories": {"home": []}}, "data.categories.home"),
        ({"data.hash_buckets": 0}, "data.hash_buckets"),
    ],
)
def test_site_config_errors_name_the_key(site_dir, changes, key):
    from fedssl.deploy.site.config import load_site_config

    with pytest.raises(ConfigError) as err:
        load_site_config(write_site(site_dir, **changes))
    message = str(err.value)
    assert message.startswith(key) and "\n" not in message


@pytest.mark.parametrize("loader", ["fedssl.deploy.site.config:load_site_config", "fedssl.deploy.coordinator:load_server_config"])
@pytest.mark.parametrize(
    "text, expected",
    [("site: [a\n", "line 2: not valid YAML"), ("- a list\n", "top level must be a mapping of sections ("), (b"\xff\xfe", "UTF-8")],
)
def test_site_and_server_yaml_errors_are_one_line(tmp_path, loader, text, expected):
    """site.yaml and server.yaml share the experiment config's reader: a broken file is one line naming it and the fix."""
    import importlib

    module, name = loader.split(":")
    path = tmp_path / "broken.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as err:
        getattr(importlib.import_module(module), name)(path)
    message = str(err.value)
    assert message.startswith(str(path)) and expected in message and "\n" not in message


def test_deployed_site_reads_only_site_yaml(site_dir):
    """The server's run config cannot point a site elsewhere or change its budget."""
    from fedssl.site_round import resolve_site

    hostile_run_config = {"config-path": "/etc/passwd", "run-dir": "/tmp/elsewhere", "data-dir": "/", "target-epsilon": 1e9}
    dataset, settings = resolve_site({"site-config": str(site_dir / "site.yaml")}, hostile_run_config)
    assert len(dataset) == 64 and settings.state_dir == site_dir / "state"
    assert settings.privacy.target_epsilon == 1.0


def test_deployed_site_encodes_its_table_by_the_schema_in_site_yaml(site_dir):
    """A CSV with a categorical column: the site's site.yaml names the column (public schema, fedssl/tables.py)."""
    from fedssl.site_round import resolve_site

    (site_dir / "data" / "t.csv").write_text("id,age,home\nu1,30,rent\nu2,41,owner\nu3,25,\n")
    path = write_site(site_dir, **{"data.path": "data/t.csv", "data.categories": {"home": ["rent", "owner"]}})
    with pytest.warns(UserWarning, match="missing"):
        dataset, _ = resolve_site({"site-config": str(path)}, {})
    assert dataset.input_shape == (1 + 4,) and dataset.feature_blocks == (4,)


def _site_reads(path: Path) -> tuple[tuple[int, ...], str]:
    """What a deployed site trains on (its sample shape and modality) and what its preflight says of the data."""
    from fedssl.deploy.site.config import deployed_site, load_site_config
    from fedssl.deploy.site.preflight import preflight

    dataset, _ = deployed_site(str(path))
    data_check = checks_by_name(preflight(load_site_config(path), check_coordinator=False))["data"]
    assert data_check.ok, data_check.detail
    return dataset.input_shape, data_check.detail


def test_deployed_text_site_reads_data_max_length_from_site_yaml(site_dir):
    """data.max_length in site.yaml sets a text site's token rows, as in a simulation (it used to be dropped)."""
    (site_dir / "data" / "notes.txt").write_text("a first note\nanother, somewhat longer note than the first\nthird\n")
    shape, detail = _site_reads(write_site(site_dir, **{"data.path": "data/notes.txt", "data.max_length": 16}))
    assert shape == (16,) and "3 samples, text, shape [16]" in detail


def test_deployed_timeseries_site_reads_data_series_length_from_site_yaml(site_dir):
    """data.series_length in site.yaml fits a time-series site's series, as in a simulation (it used to be dropped)."""
    np.save(site_dir / "data" / "s.npy", np.arange(5 * 10, dtype=np.float32).reshape(5, 10))
    path = write_site(site_dir, **{"data.path": "data/s.npy", "data.kind": "timeseries", "data.series_length": 24})
    shape, detail = _site_reads(path)
    assert shape == (1, 24) and "5 samples, timeseries, shape [1, 24]" in detail


@pytest.mark.parametrize(("changes", "rule"), [
    ({"data.max_length": 1}, "data.max_length: must be in [2, 4096] (CLS and at least one byte), got 1"),
    ({"data.series_length": -3}, "data.series_length: must be an integer in [0, 1000000]"),
    ({"data.kind": "npy", "data.categorical": ["job"]}, "data.categorical: applies to CSV sources only"),
])
def test_site_yaml_reading_keys_are_checked_like_the_experiments(site_dir, changes, rule):
    from fedssl.deploy.site.config import load_site_config

    with pytest.raises(ConfigError) as err:
        load_site_config(write_site(site_dir, **changes))
    assert str(err.value).startswith(rule) and "\n" not in str(err.value)


def test_deployed_site_caches_and_reloads(site_dir):
    from fedssl.deploy.site.config import deployed_site

    first, _ = deployed_site(str(site_dir / "site.yaml"))
    again, _ = deployed_site(str(site_dir / "site.yaml"))
    assert again is first
    write_site(site_dir, **{"privacy.target_epsilon": 2.0})
    _, settings = deployed_site(str(site_dir / "site.yaml"))
    assert settings.privacy.target_epsilon == 2.0


# ---------------------------------------------------------------------------- app pinning


# The app hash of a bundle and the refusal: tests/deploy/test_site_runner.py.


def test_cli_app_hash(capsys):
    from fedssl.deploy.site.pinning import app_hash

    assert cli_main(["site", "app-hash", str(PROJECT_ROOT)]) == 0
    assert capsys.readouterr().out.strip() == app_hash(PROJECT_ROOT)


# ---------------------------------------------------------------------------- preflight and status


def checks_by_name(checks):
    return {c.name: c for c in checks}


def test_preflight_passes_offline_checks_and_lists_egress(site_dir):
    from fedssl.deploy.site.config import load_site_config
    from fedssl.deploy.site.preflight import preflight, preflight_passed

    checks = preflight(load_site_config(site_dir / "site.yaml"), check_coordinator=False)
    assert preflight_passed(checks), [c for c in checks if not c.ok]
    by = checks_by_name(checks)
    assert "64 samples" in by["data"].detail
    assert "encoder weights only" in by["leaves the site"].detail and "epsilon" in by["leaves the site"].detail
    # the site trains with DP: the line names only what its egress guard lets out under DP
    assert "pretext-loss" not in by["leaves the site"].detail and "train-seconds" not in by["leaves the site"].detail
    assert "batch size x local steps" in by["leaves the site"].detail


def test_preflight_failures(site_dir):
    from fedssl.deploy.site.config import load_site_config
    from fedssl.deploy.site.preflight import preflight, preflight_passed

    (site_dir / "keys" / "site-a.node").chmod(0o644)
    path = write_site(site_dir, **{"data.path": "missing.npy", "apps.allowed_hashes": []})
    by = checks_by_name(preflight(load_site_config(path), check_coordinator=True))
    assert not by["data"].ok and "does not exist" in by["data"].detail
    assert not by["node key"].ok and "chmod 600" in by["node key"].detail
    assert not by["approved apps"].ok
    assert not by["coordinator"].ok and "not reachable" in by["coordinator"].detail
    assert not preflight_passed(list(by.values()))


def test_budget_spent_blocks_preflight_and_shows_in_status(site_dir, global_encoder, make_plan):
    """A site that trained its whole plan at epsilon = 1 has no budget for another round."""
    from fedssl.data.loaders import load_site_data
    from fedssl.deploy.site.config import load_site_config
    from fedssl.deploy.site.preflight import preflight
    from fedssl.deploy.site.status import status_text
    from fedssl.training.local import train_round

    config = load_site_config(site_dir / "site.yaml")
    dataset = load_site_data(config.data.path)
    plan = make_plan()
    result = train_round(dataset, global_encoder, plan, config.settings())
    train_round(dataset, result.encoder_state, plan.with_round(2), config.settings())
    by = checks_by_name(preflight(config, check_coordinator=False))
    assert not by["privacy budget"].ok and "spent" in by["privacy budget"].detail
    status = status_text(config)
    assert "SPENT" in status and "round 2" in status and "verified against the site's key" in status


def test_cli_site_preflight_exit_code(site_dir, capsys):
    assert cli_main(["site", "preflight", "--config", str(site_dir / "site.yaml")]) == 2  # nothing listens on :1
    out = capsys.readouterr().out
    assert "[ok]   data" in out and "[FAIL] coordinator" in out


# ---------------------------------------------------------------------------- server.yaml


def test_server_config_and_local_federation(tmp_path):
    from fedssl.deploy.coordinator import experiment_for, load_server_config
    from fedssl.deploy.localfed import make_local_federation
    from fedssl.deploy.site.config import load_site_config
    from fedssl.deploy.site.preflight import preflight, preflight_passed

    fed = make_local_federation(tmp_path, ["site-a", "site-b"], registered=["site-a"])
    config = load_server_config(fed.server_yaml)
    assert [e.name for e in config.site_entries()] == ["site-a"]
    assert Path(config.tls.ca_cert).is_absolute()
    experiment = experiment_for(config)
    assert experiment.model.input_shape == [1, 8, 8] and experiment.federation.rounds == 2
    site = load_site_config(fed.site_yamls["site-b"])
    assert preflight_passed(preflight(site, check_coordinator=False))


def test_server_config_errors(tmp_path):
    from fedssl.deploy.coordinator import load_server_config

    path = tmp_path / "server.yaml"
    path.write_text(yaml.safe_dump({"experiment": "x.yaml", "tls": {"ca_cert": "a", "server_cert": "b", "server_key": "c"}, "sites": []}))
    with pytest.raises(ConfigError, match="^sites: must list"):
        load_server_config(path)
    path.write_text(yaml.safe_dump({"experiment": "x.yaml", "tls": {"ca_cert": "a", "server_cert": "b"}, "sites": [{"name": "a", "public_key": "k"}]}))
    with pytest.raises(ConfigError, match="^tls.server_key"):
        load_server_config(path)


def test_supernode_command_is_tls_and_authenticated(site_dir):
    from fedssl.deploy.site.config import load_site_config
    from fedssl.deploy.site.supernode import supernode_commands

    config = load_site_config(site_dir / "site.yaml")
    supernode, runner = supernode_commands(config, site_dir / "site.yaml", 9999)
    assert "--insecure" not in supernode
    assert supernode[supernode.index("--root-certificates") + 1] == str(site_dir / "certs" / "ca.crt")
    assert supernode[supernode.index("--auth-supernode-private-key") + 1] == str(site_dir / "keys" / "site-a.node")
    assert supernode[supernode.index("--node-config") + 1] == f"site-config='{site_dir / 'site.yaml'}'"
    assert supernode[supernode.index("--host") + 1] == "127.0.0.1"  # the runtime API stays local
    assert supernode[supernode.index("--isolation") + 1] == "process"  # the SuperNode only holds tasks
    assert runner[1:4] == ["-P", "-m", "fedssl.deploy.site.runner"] and "127.0.0.1:9999" in runner


def test_a_crashed_session_is_told_apart_from_a_clean_stop(site_dir):
    from fedssl.deploy.site.config import load_site_config
    from fedssl.deploy.site.events import record_event
    from fedssl.deploy.site.supernode import previous_session_unclean

    config = load_site_config(site_dir / "site.yaml")
    assert not previous_session_unclean(config)
    record_event(config, "supernode_start", pid=1)
    assert not previous_session_unclean(config)  # never joined: nothing held at the coordinator
    record_event(config, "supernode_joined", pid=1)
    assert previous_session_unclean(config)  # joined, then nothing: a crash
    record_event(config, "supernode_stop", reason="operator")
    assert not previous_session_unclean(config)


def test_server_state_dir_must_stay_out_of_the_app_bundle(tmp_path):
    from fedssl.deploy.coordinator import load_server_config

    path = tmp_path / "server.yaml"
    path.write_text(yaml.safe_dump({
        "experiment": "x.yaml", "tls": {"ca_cert": "a", "server_cert": "b", "server_key": "c"},
        "sites": [{"name": "a", "public_key": "k"}], "state_dir": str(PROJECT_ROOT / "coordinator-state"),
    }))
    with pytest.raises(ConfigError, match="^state_dir: .* inside the app directory"):
        load_server_config(path)


def test_budget_view_falls_back_to_the_ledger(site_dir, global_encoder, make_plan):
    """Lose accountant.json: status and preflight still count what the signed ledger recorded."""
    from fedssl.data.loaders import load_site_data
    from fedssl.deploy.site.config import load_site_config
    from fedssl.deploy.site.status import budget_view
    from fedssl.training.local import train_round

    config = load_site_config(site_dir / "site.yaml")
    train_round(load_site_data(config.data.path), global_encoder, make_plan(), config.settings())
    before = budget_view(config)
    (config.state_path / "accountant.json").unlink()
    after = budget_view(config)
    assert before.spent > 0 and after.spent == pytest.approx(before.spent, rel=1e-9)
    assert after.rounds == before.rounds == 1 and after.next_round_epsilon == pytest.approx(before.next_round_epsilon, rel=1e-9)


def test_a_damaged_dp_event_is_one_line_in_status_and_preflight(site_dir, global_encoder, make_plan):
    """Lose accountant.json and damage a ledger body: the site says so in one line, never a traceback or 0."""
    import json as _json

    from fedssl.data.loaders import load_site_data
    from fedssl.deploy.site.config import load_site_config
    from fedssl.deploy.site.preflight import preflight
    from fedssl.deploy.site.status import budget_view
    from fedssl.errors import PrivacyError
    from fedssl.training.local import train_round

    config = load_site_config(site_dir / "site.yaml")
    train_round(load_site_data(config.data.path), global_encoder, make_plan(), config.settings())
    (config.state_path / "accountant.json").unlink()
    ledger = config.state_path / "ledger.jsonl"
    lines = ledger.read_text().splitlines()
    records = [_json.loads(line) for line in lines]
    index = next(i for i, r in enumerate(records) if r["kind"] == "dp_event")
    del records[index]["body"]["run_id"]
    ledger.write_text("".join(_json.dumps(r) + "\n" for r in records))
    with pytest.raises(PrivacyError, match=r"^ledger record seq \d+: unreadable dp_event"):
        budget_view(config)
    # The preflight verifies the ledger first: the edited record breaks its hash chain, the one failed check
    # (the budget and high-water checks read the same state and are not run on it).
    (failed,) = [c for c in preflight(config, check_coordinator=False) if not c.ok and c.blocking]
    assert failed.name == "privacy ledger" and "ledger.jsonl" in failed.detail and "\n" not in failed.detail
