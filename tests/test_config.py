"""Experiment configuration: every shipped config loads; every bad one is one clear line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedssl.config import ExperimentConfig, load_config, save_config
from fedssl.experiment import load_experiment
from fedssl.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted((ROOT / "configs" / "experiments").glob("*.yaml"))
TINY = ROOT / "configs" / "experiments" / "digits-tiny.yaml"
BASE = ROOT / "configs" / "base.yaml"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def config_error(path: Path, overrides: list[str] | None = None) -> str:
    """The one-line error of loading at the edge (config sections and the pretext registry)."""
    with pytest.raises(ConfigError) as info:
        load_experiment(path, overrides)
    message = str(info.value)
    assert message and "\n" not in message, f"not one line: {message!r}"
    return message


# ------------------------------------------------------------------ shipped configs


def test_there_are_experiment_configs():
    assert {p.name for p in EXPERIMENTS} >= {"digits-demo.yaml", "digits-nodp.yaml", "digits-tiny.yaml"}


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_config_loads(path):
    config = load_config(path)
    assert isinstance(config, ExperimentConfig)
    assert config.run.name == path.stem


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "pretext").glob("*.yaml")), ids=lambda p: p.name)
def test_every_pretext_config_names_its_registered_task(tmp_path, path):
    """configs/pretext/NAME.yaml, included over base.yaml, selects pretext NAME with parameters it accepts."""
    from fedssl.pretext import get_pretext

    experiment = write(tmp_path / "x.yaml", f"include:\n  - {BASE}\n  - {path}\nrun:\n  name: x\n")
    config = load_config(experiment)
    assert config.pretext.name == path.stem
    get_pretext(config.pretext.name, config.pretext.params)


def test_tiny_config_values_merge_includes_and_own_keys():
    config = load_config(TINY)
    assert (config.federation.num_sites, config.federation.rounds) == (2, 2)  # own keys
    assert (config.model.width, config.model.depth) == (8, 2)
    assert (config.training.local_steps, config.training.batch_size) == (3, 16)
    assert config.training.lr == 0.05  # from base.yaml
    assert config.pretext.name == "rotation"  # from pretext/rotation.yaml
    assert config.privacy.enabled and config.privacy.target_epsilon == 8.0
    assert config.privacy.delta == 1e-5 and isinstance(config.privacy.delta, float)
    assert config.evaluation.methods == ["linear_probe"]


def test_nested_include_and_later_files_win():
    config = load_config(ROOT / "configs" / "experiments" / "digits-nodp.yaml")
    assert config.privacy.enabled is False  # none.yaml after digits-demo.yaml
    assert config.pretext.name == "rotation_jigsaw"  # through digits-demo.yaml
    assert config.federation.num_sites == 5


def test_saved_config_loads_back_identically(tmp_path):
    config = load_config(TINY, ["model.input_shape=[1, 8, 8]"])
    save_config(config, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == config


# ------------------------------------------------------------------ errors: one line naming the key


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("run:\n  bogus: 1\n", "run.bogus"),
        ("privacy:\n  enabled: true\n  epsilon: 3\n", "privacy.epsilon"),
        ("bogus_section:\n  a: 1\n", "bogus_section"),
        ("1: a\nzzz: b\n", "1"),
        ("pretext:\n  name: rotation\n  params:\n    bogus: 1\n", "pretext.params.bogus"),
    ],
    ids=["run", "privacy", "section", "numeric-key", "pretext-param"],
)
def test_unknown_key(tmp_path, text, key):
    message = config_error(write(tmp_path / "c.yaml", text))
    assert message.startswith(f"{key}:")
    assert "unknown" in message or "not a parameter" in message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("federation:\n  rounds: two\n", "federation.rounds"),
        ("federation:\n  rounds: 2.5\n", "federation.rounds"),
        ("privacy:\n  enabled: maybe\n", "privacy.enabled"),
        ("training:\n  lr: fast\n", "training.lr"),
        ("run:\n  name: 7\n", "run.name"),
        ("model:\n  input_shape: 8\n", "model.input_shape"),
        ("evaluation:\n  label_fractions: [0.1, lots]\n", "evaluation.label_fractions[1]"),
        ("privacy: 3\n", "privacy"),
    ],
    ids=["int-word", "int-float", "bool", "float", "str", "list", "list-item", "section"],
)
def test_wrong_type(tmp_path, text, key):
    assert config_error(write(tmp_path / "c.yaml", text)).startswith(f"{key}:")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("privacy:\n  target_epsilon: -1\n", "privacy.target_epsilon"),
        ("privacy:\n  target_epsilon: .inf\n", "privacy.target_epsilon"),
        ("privacy:\n  delta: 1.5\n", "privacy.delta"),
        ("data:\n  test_fraction: 1.0\n", "data.test_fraction"),
        ("training:\n  lr: 0\n", "training.lr"),
        ("training:\n  lr: .nan\n", "training.lr"),
        ("model:\n  width: 0\n", "model.width"),
        ("federation:\n  num_sites: 2\n  min_sites: 3\n", "federation.min_sites"),
        ("model:\n  encoder: vgg\n", "model.encoder"),
        ("model:\n  readout: 9\n", "model.readout"),
        ("model:\n  encoder: mlp\n  readout: 2\n", "model.readout"),
    ],
    ids=["eps-negative", "eps-inf", "delta", "test-fraction", "lr-zero", "lr-nan", "width", "min-sites", "encoder",
         "readout-above-8", "readout-on-mlp"],
)
def test_out_of_range_value(tmp_path, text, key):
    message = config_error(write(tmp_path / "c.yaml", text))
    assert message.startswith(f"{key}:")
    assert "got" in message or "valid choices" in message


def test_bad_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path / "broken.yaml", "run:\n  name: [unclosed\nprivacy:\n  enabled: true\n")
    message = config_error(path)
    assert "broken.yaml" in message and "line" in message and "YAML" in message


def test_top_level_must_be_a_mapping(tmp_path):
    assert "top level" in config_error(write(tmp_path / "list.yaml", "- a\n- b\n"))


def test_file_that_is_not_text_is_a_config_error(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00run:\x81\x82\n")
    assert "binary.yaml" in config_error(path)


def test_missing_file(tmp_path):
    message = config_error(tmp_path / "nowhere.yaml")
    assert "nowhere.yaml" in message and "does not exist" in message


def test_missing_include(tmp_path):
    message = config_error(write(tmp_path / "c.yaml", "include: [gone.yaml]\n"))
    assert "gone.yaml" in message and "does not exist" in message


def test_include_cycle(tmp_path):
    write(tmp_path / "a.yaml", "include: [b.yaml]\nrun:\n  name: a\n")
    write(tmp_path / "b.yaml", "include: [a.yaml]\n")
    message = config_error(tmp_path / "a.yaml")
    assert message.startswith("include:") and "a.yaml" in message and "cycle" in message


def test_self_include(tmp_path):
    message = config_error(write(tmp_path / "self.yaml", "include: self.yaml\n"))
    assert message.startswith("include:") and "self.yaml" in message


@pytest.mark.parametrize("value", ["3", "[3]", "{a: b}", "[[x.yaml]]"])
def test_include_must_name_files(tmp_path, value):
    assert config_error(write(tmp_path / "c.yaml", f"include: {value}\n")).startswith("include:")


def test_include_paths_are_relative_to_the_including_file(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "part.yaml", "federation:\n  rounds: 7\n")
    write(tmp_path / "c.yaml", f"include: [{BASE}, sub/part.yaml]\nrun:\n  name: rel\n")
    config = load_config(tmp_path / "c.yaml")
    assert (config.federation.rounds, config.run.name, config.model.width) == (7, "rel", 64)


# ------------------------------------------------------------------ --set overrides


def test_overrides_apply_last_and_parse_yaml_scalars():
    config = load_config(
        TINY,
        [
            "privacy.delta=1e-5",
            "privacy.target_epsilon=2.5e-1",
            "federation.rounds=3",
            "run.name=other",
            "privacy.max_grad_norm=2",
            "pretext.params.all_rotations=true",
            "evaluation.label_fractions=[0.2, 0.5]",
            "training.optimizer=adam",
        ],
    )
    assert config.privacy.delta == 1e-5 and isinstance(config.privacy.delta, float)
    assert config.privacy.target_epsilon == 0.25
    assert config.federation.rounds == 3 and isinstance(config.federation.rounds, int)
    assert config.run.name == "other"
    assert config.privacy.max_grad_norm == 2.0 and isinstance(config.privacy.max_grad_norm, float)
    assert config.pretext.params == {"all_rotations": True}
    assert config.evaluation.label_fractions == [0.2, 0.5]
    assert config.training.optimizer == "adam"


def test_exponent_floats_in_files_too(tmp_path):
    # YAML 1.1 reads 1e-5 (no dot) as a string; the config must still treat it as a number.
    path = write(tmp_path / "c.yaml", f"include: [{BASE}]\nprivacy:\n  delta: 1e-5\n  target_epsilon: 4e0\n")
    config = load_config(path)
    assert (config.privacy.delta, config.privacy.target_epsilon) == (1e-5, 4.0)


def test_override_can_disable_privacy_for_a_coupled_method():
    config = load_config(TINY, ["privacy.enabled=false", "pretext.name=simclr"])
    assert config.pretext.name == "simclr" and not config.privacy.enabled


def test_override_into_an_empty_section(tmp_path):
    path = write(tmp_path / "c.yaml", f"include: [{BASE}]\nrun:\nprivacy:\n")
    config = load_config(path, ["run.name=from-cli", "privacy.target_epsilon=3"])
    assert config.run.name == "from-cli" and config.privacy.target_epsilon == 3.0


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("privacy.target_epsilon=-2", "privacy.target_epsilon"),
        ("privacy.delta=1e-5x", "privacy.delta"),
        ("federation.rounds=1e3", "federation.rounds"),
        ("run.bogus=1", "run.bogus"),
        ("run.name.deeper=1", "--set run.name.deeper"),
        ("privacy.delta", "--set 'privacy.delta'"),
    ],
)
def test_bad_overrides(override, key):
    assert config_error(TINY, [override]).startswith(key)


def test_the_config_module_leaves_pretext_checks_to_the_registry():
    # load_config is what the ServerApp may import: it never loads training code, so a pretext's
    # own parameters are the registry's to check (load_experiment, at the edge).
    assert load_config(TINY, ["pretext.params.bogus=1"]).pretext.params == {"bogus": 1}
    assert config_error(TINY, ["pretext.params.bogus=1"]).startswith("pretext.params.bogus")
    assert config_error(TINY, ["pretext.name=nope"]).startswith("pretext.name: unknown pretext 'nope'")
    assert config_error(TINY, ["warm_start.source=synthetic", "warm_start.pretext=nope"]).startswith("warm_start.pretext:")


def test_simclr_under_dp_is_a_config_error():
    message = config_error(TINY, ["pretext.name=simclr"])
    assert message.startswith("pretext.name:")
    assert "in-batch negatives" in message
    assert "privacy.enabled=false" in message  # tells the user the way out


# ------------------------------------------------------------------ the CLI


def cli_cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    bad = write(tmp_path / "bad.yaml", f"include: [{BASE}]\nprivacy:\n  target_epsilon: 8\n  budget: 3\n")
    return {
        "unknown-key": ([str(bad)], "privacy.budget"),
        "missing-file": ([str(tmp_path / "absent.yaml")], "absent.yaml"),
        "bad-override": ([str(TINY), "--set", "training.lr=-1"], "training.lr"),
        "bad-yaml": ([str(write(tmp_path / "broken.yaml", "run: [\n"))], "broken.yaml"),
    }


@pytest.mark.parametrize("case", ["unknown-key", "missing-file", "bad-override", "bad-yaml"])
def test_cli_main_reports_a_bad_config_in_one_line(tmp_path, capsys, case):
    from fedssl.cli import main

    args, expected = cli_cases(tmp_path)[case]
    assert main(["simulate", *args, "--set", f"run.output_dir={tmp_path / 'runs'}"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedssl: error: ") and expected in lines[0], captured.err
    assert not (tmp_path / "runs").exists()  # nothing was started


@pytest.mark.slow
def test_cli_bad_config_as_a_process_exits_2_with_one_line(tmp_path):
    args, expected = cli_cases(tmp_path)["unknown-key"]
    done = subprocess.run(
        [str(Path(sys.executable).parent / "fedssl"), "simulate", *args, "--set", f"run.output_dir={tmp_path / 'runs'}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("fedssl: error: ") and expected in lines[0]
    assert not (tmp_path / "runs").exists()


def test_empty_section_in_a_later_file_keeps_earlier_values(tmp_path):
    (tmp_path / "base.yaml").write_text("training:\n  local_steps: 7\n")
    (tmp_path / "exp.yaml").write_text("include: [base.yaml]\ntraining:\n")
    assert load_config(tmp_path / "exp.yaml").training.local_steps == 7


def test_cnn_needs_an_image_input_shape():
    with pytest.raises(ConfigError, match=r"^model\.input_shape: the cnn encoder needs images"):
        load_config("configs/experiments/digits-tiny.yaml", ["model.input_shape=[1, 8]"])


def test_round_timeout_must_be_positive():
    with pytest.raises(ConfigError, match=r"^federation\.round_timeout: must be > 0 seconds"):
        load_config("configs/experiments/digits-tiny.yaml", ["federation.round_timeout=0"])


def test_the_site_trains_with_its_validated_privacy_section_itself(tmp_path):
    # One settings type end to end: the site's settings hold the validated section, not a copy
    # that a new field (such as `clipping`) could fail to reach, and nothing downstream can edit it.
    import dataclasses

    from fedssl.experiment import site_settings

    config = load_config("configs/experiments/digits-demo.yaml",
                         ["privacy.clipping=opacus", "privacy.accountant=prv", "privacy.max_grad_norm=0.5"])
    privacy = site_settings(config, tmp_path, 0).privacy
    assert privacy is config.privacy
    assert (privacy.clipping, privacy.accountant, privacy.max_grad_norm) == ("opacus", "prv", 0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        privacy.target_epsilon = 100.0  # type: ignore[misc]


def test_data_partition_choices_are_the_partitioners():
    """config.PARTITIONS (torch-free, checked at load) names exactly fedssl.data.partition's partitioners."""
    from fedssl.config import PARTITIONS
    from fedssl.data.partition import PARTITIONERS

    assert set(PARTITIONS) == set(PARTITIONERS)


def test_an_experiment_and_a_site_read_samples_by_one_type():
    """data.image_size / max_length / categorical / categories / hash_buckets / series_length are SampleFormat's
    fields in both an experiment's data: and a site.yaml's data:, so a new reading key reaches both; the loaders'
    caches key on the copy of those fields alone (the config sections themselves are not hashable)."""
    import dataclasses

    from fedssl.config import DataConfig
    from fedssl.deploy.site.config import SiteData
    from fedssl.sample_format import SampleFormat

    reading = [f.name for f in dataclasses.fields(SampleFormat)]
    assert reading == ["image_size", "max_length", "categorical", "categories", "hash_buckets", "series_length"]
    assert issubclass(DataConfig, SampleFormat) and issubclass(SiteData, SampleFormat)
    data = load_config(BASE, ["data.max_length=16", "data.series_length=9", "data.categorical=[job]"]).data
    fmt = data.sample_format
    assert type(fmt) is SampleFormat and fmt == SampleFormat(max_length=16, series_length=9, categorical=["job"])
    assert hash(fmt) == hash(SampleFormat(max_length=16, series_length=9, categorical=["job"]))
    with pytest.raises(TypeError):
        hash(data)
    fmt.categorical.append("home")  # a copy: the section keeps its own lists
    assert data.categorical == ["job"]
