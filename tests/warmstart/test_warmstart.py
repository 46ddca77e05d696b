"""Warm start: synthetic public digits, non-private pretraining, checkpoint files the server loads."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedssl.data import synthetic
from fedssl.errors import ConfigError
from fedssl.models import build_encoder
from fedssl.config import ModelConfig, RunConfig, WarmStartConfig
from fedssl.layout import WARM_START_FILE, WARM_START_INFO
from fedssl.warmstart.checkpoint import (
    load_warm_start,
    public_pretraining_description,
    read_checkpoint,
    run_warm_start,
    save_warm_start,
)
from fedssl.warmstart.pretrain import prepare_warm_start, pretrain_encoder

WIDTH, DEPTH = 8, 2


def _config(**warm_start) -> SimpleNamespace:
    """The sections prepare_warm_start reads, shaped like ExperimentConfig's."""
    model = ModelConfig(encoder="cnn", width=WIDTH, depth=DEPTH, input_shape=[1, 8, 8])
    return SimpleNamespace(model=model, warm_start=WarmStartConfig(**warm_start), run=RunConfig(device="cpu"))


# --------------------------------------------------------------------------- synthetic digits


def test_synthetic_digits_match_the_embedded_digits_format():
    images, labels = synthetic.synthetic_digits(50, seed=0)
    assert images.shape == (50, 1, 8, 8) and images.dtype == np.float32
    assert labels.dtype == np.int64 and set(labels.tolist()) == set(range(10))
    # optdigits' reduction: block counts 0..16, divided by 16
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert np.allclose(images * 16, np.round(images * 16))
    assert 0.15 < images.mean() < 0.45  # the real digits average ~0.30


def test_synthetic_digits_are_seeded_and_vary_with_the_seed():
    a, la = synthetic.synthetic_digits(20, seed=3)
    b, lb = synthetic.synthetic_digits(20, seed=3)
    c, _ = synthetic.synthetic_digits(20, seed=4)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert not np.array_equal(a, c)
    assert synthetic.fingerprint(a) == synthetic.fingerprint(b) != synthetic.fingerprint(c)


def test_synthetic_digits_use_bundled_fonts_only():
    fonts = synthetic.font_names()
    assert len(fonts) >= 5
    assert all(path.is_file() for path in synthetic.available_fonts())
    assert "no private or downloaded data" in synthetic.describe(100, 0)


def test_synthetic_digits_carry_class_information():
    """A classifier trained on synthetic digits beats chance on the real ones: the shapes are digit-like."""
    from sklearn.linear_model import LogisticRegression

    from fedssl.data.loaders import load_digits_labeled

    images, labels = synthetic.synthetic_digits(600, seed=0)
    real, real_labels = load_digits_labeled()
    clf = LogisticRegression(max_iter=500).fit(images.reshape(len(images), -1), labels)
    accuracy = float(np.mean(clf.predict(real.inputs.reshape(len(real), -1).numpy()) == real_labels))
    assert accuracy > 0.35  # chance is 0.10; ~0.6 with the full generator settings


def test_synthetic_digits_reject_an_empty_request():
    with pytest.raises(ValueError):
        synthetic.synthetic_digits(0)


def test_finer_sides_reduce_the_same_bitmaps():
    """side 16 / 32 draw the same digits as side 8: pooling them back by 2x2 / 4x4 gives the 8x8 images exactly."""
    coarse, labels = synthetic.synthetic_digits(12, seed=5)
    for side in (16, 32):
        fine, fine_labels = synthetic.synthetic_digits(12, seed=5, side=side)
        assert fine.shape == (12, 1, side, side) and fine.dtype == np.float32
        assert np.array_equal(fine_labels, labels)
        block = side // 8
        pooled = fine.reshape(12, 1, 8, block, 8, block).mean(axis=(3, 5))
        assert np.allclose(pooled, coarse, atol=1e-6)
    assert set(np.unique(synthetic.synthetic_digits(4, seed=5, side=32)[0]).tolist()) <= {0.0, 1.0}  # the bitmap itself
    with pytest.raises(ValueError, match="side must be one of 8, 16, 32"):
        synthetic.synthetic_digits(4, side=12)


# --------------------------------------------------------------------------- pretraining


def test_pretraining_changes_the_encoder_and_is_deterministic():
    images, _ = synthetic.synthetic_digits(64, seed=0)
    x = torch.from_numpy(images)
    kwargs = dict(encoder="cnn", width=WIDTH, depth=DEPTH, steps=3, batch_size=16, seed=1)
    first, second = pretrain_encoder(x, **kwargs), pretrain_encoder(x, **kwargs)
    start = build_encoder("cnn", (1, 8, 8), width=WIDTH, depth=DEPTH, seed=1).state_dict()
    assert set(first) == set(start)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], start[k]) for k in first)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "fields, key",
    [
        ({"source": "imagenet"}, "warm_start.source"),
        ({"source": "path"}, "warm_start.path"),
        ({"source": "path", "path": "x.pt"}, "warm_start.description"),
        ({"source": "synthetic", "steps": 0}, "warm_start.steps"),
        ({"source": "synthetic", "num_samples": 5}, "warm_start.num_samples"),
        ({"source": "synthetic", "lr": 0}, "warm_start.lr"),
    ],
)
def test_config_errors_name_the_key(fields, key):
    with pytest.raises(ConfigError, match=key):
        WarmStartConfig(**fields).validate()


def test_default_config_is_off_and_valid():
    config = WarmStartConfig()
    config.validate()
    assert not config.enabled


# --------------------------------------------------------------------------- files and the server side


def test_none_writes_nothing(tmp_path):
    assert prepare_warm_start(_config(), tmp_path) is None
    assert not (tmp_path / WARM_START_FILE).exists()
    assert public_pretraining_description(tmp_path / WARM_START_INFO) is None


def test_synthetic_warm_start_round_trip(tmp_path):
    messages: list[str] = []
    path = prepare_warm_start(_config(source="synthetic", num_samples=40, steps=2, batch_size=8), tmp_path, progress=messages.append)
    assert path == tmp_path / WARM_START_FILE and path.exists()
    info = json.loads((tmp_path / WARM_START_INFO).read_text())
    assert info["source"] == "synthetic" and info["uses_site_data"] is False
    assert info["pretraining"]["steps"] == 2 and len(info["public_data_sha256"]) == 64
    # What the ServerApp does: build the encoder from the config, load the warm start into it.
    encoder = build_encoder("cnn", (1, 8, 8), width=WIDTH, depth=DEPTH, seed=123)
    state = load_warm_start(path, encoder)
    assert all(torch.equal(encoder.state_dict()[k], state[k]) for k in state)
    description = public_pretraining_description(tmp_path / WARM_START_INFO)
    assert description and "synthetic digits" in description
    assert any("warm start written" in m for m in messages)


def test_checkpoint_loads_with_weights_only(tmp_path):
    """The server never unpickles code: the checkpoint must load under weights_only=True."""
    state = build_encoder("cnn", (1, 8, 8), width=WIDTH, depth=DEPTH, seed=0).state_dict()
    path = save_warm_start(tmp_path, state, {"source": "synthetic", "description": "test"})
    payload = torch.load(path, weights_only=True)
    assert set(payload["encoder"]) == set(state)


def test_server_refuses_a_checkpoint_for_another_architecture(tmp_path):
    state = build_encoder("cnn", (1, 8, 8), width=16, depth=DEPTH, seed=0).state_dict()
    path = save_warm_start(tmp_path, state, {"source": "synthetic", "description": "test"})
    with pytest.raises(ConfigError, match="shaped"):
        load_warm_start(path, build_encoder("cnn", (1, 8, 8), width=WIDTH, depth=DEPTH))
    with pytest.raises(ConfigError, match="missing"):
        load_warm_start(path, build_encoder("cnn", (1, 8, 8), width=16, depth=3))


def test_server_refuses_tampered_weights(tmp_path):
    state = build_encoder("cnn", (1, 8, 8), width=WIDTH, depth=DEPTH, seed=0).state_dict()
    path = save_warm_start(tmp_path, state, {"source": "synthetic", "description": "test"})
    payload = torch.load(path, weights_only=True)
    first = next(iter(payload["encoder"]))
    payload["encoder"][first] = payload["encoder"][first] + 1.0
    torch.save(payload, path)
    with pytest.raises(ConfigError, match="sha256"):
        load_warm_start(path, build_encoder("cnn", (1, 8, 8), width=WIDTH, depth=DEPTH))


def test_path_source_accepts_a_plain_state_dict_and_records_its_description(tmp_path):
    source = tmp_path / "public.pt"
    torch.save(build_encoder("cnn", (1, 8, 8), width=WIDTH, depth=DEPTH, seed=5).state_dict(), source)
    run_dir = tmp_path / "run"
    path = prepare_warm_start(_config(source="path", path=str(source), description="EMNIST digits, public"), run_dir)
    state, provenance = read_checkpoint(path)
    assert provenance["source"] == "path" and provenance["description"] == "EMNIST digits, public"
    assert public_pretraining_description(run_dir / WARM_START_INFO) == "EMNIST digits, public"
    assert set(state) == set(build_encoder("cnn", (1, 8, 8), width=WIDTH, depth=DEPTH).state_dict())


def test_path_source_refuses_a_mismatched_or_missing_checkpoint(tmp_path):
    source = tmp_path / "public.pt"
    torch.save(build_encoder("cnn", (1, 8, 8), width=16, depth=DEPTH).state_dict(), source)
    with pytest.raises(ConfigError, match="does not fit"):
        prepare_warm_start(_config(source="path", path=str(source), description="x"), tmp_path / "run")
    with pytest.raises(ConfigError, match="does not exist"):
        prepare_warm_start(_config(source="path", path=str(tmp_path / "missing.pt"), description="x"), tmp_path / "run2")


def test_synthetic_source_refuses_other_input_shapes(tmp_path):
    config = _config(source="synthetic", num_samples=20, steps=1)
    for shape in ([3, 32, 32], [1, 12, 12], [1, 16, 8]):
        config.model.input_shape = shape
        with pytest.raises(ConfigError, match="renders 1x8x8, 1x16x16, 1x32x32 digits"):
            prepare_warm_start(config, tmp_path)


def test_synthetic_source_fits_finer_grey_digits(tmp_path):
    """Site data kept at 16x16 get a warm start pretrained on 16x16 renderings, and its record says so."""
    config = _config(source="synthetic", num_samples=20, steps=1)
    config.model.input_shape = [1, 16, 16]
    _state, provenance = read_checkpoint(prepare_warm_start(config, tmp_path / "run"))
    assert "16x16" in provenance["description"]
    images, _ = synthetic.synthetic_digits(20, seed=config.warm_start.seed, side=16)
    assert provenance["public_data_sha256"] == synthetic.fingerprint(images)


def test_warmstart_module_keeps_the_server_free_of_data_loading():
    """The ServerApp imports fedssl.warmstart.checkpoint; that must not pull in the data layer."""
    import subprocess
    import sys

    code = (
        "import sys, fedssl.warmstart.checkpoint; "
        "bad = [m for m in sys.modules if m.startswith('fedssl.data') or m == 'sklearn']; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# --------------------------------------------------------------------------- the evaluation side


def test_run_warm_start_reads_back_what_the_federation_started_from(tmp_path):
    """prepare_warm_start keeps warm_start.pt in the run dir; the evaluation loads those very weights."""
    config = _config(source="synthetic", num_samples=40, steps=2, batch_size=8)
    written, _ = read_checkpoint(prepare_warm_start(config, tmp_path))
    encoder = build_encoder("cnn", (1, 8, 8), width=WIDTH, depth=DEPTH, seed=123)
    state = run_warm_start(config, tmp_path, encoder)
    assert state is not None and set(state) == set(written)
    assert all(torch.equal(state[k], written[k]) and torch.equal(encoder.state_dict()[k], written[k]) for k in written)
    # No warm start configured: nothing to score, even if a stray file is there.
    assert run_warm_start(_config(), tmp_path, encoder) is None


def test_run_warm_start_refuses_a_missing_or_tampered_file(tmp_path):
    config = _config(source="synthetic", num_samples=40, steps=1, batch_size=8)
    encoder = build_encoder("cnn", (1, 8, 8), width=WIDTH, depth=DEPTH)
    with pytest.raises(ConfigError, match="warm_start.pt missing.*warm_start.source=synthetic"):
        run_warm_start(config, tmp_path, encoder)
    path = prepare_warm_start(config, tmp_path)
    payload = torch.load(path, weights_only=True)
    first = next(iter(payload["encoder"]))
    payload["encoder"][first] = payload["encoder"][first] * 2.0
    torch.save(payload, path)
    with pytest.raises(ConfigError, match="sha256"):
        run_warm_start(config, tmp_path, encoder)


def _finished_run(tmp_path, name: str, warm_start: str):
    """A run directory as `fedssl simulate` leaves it before evaluation, minus the federation.

    The real digits-tiny config; encoder.pt stands in for the federated encoder. With a warm start,
    encoder.pt is the warm start itself (zero federated rounds), so the warm-start rows must equal
    the pretrained rows run by run.
    """
    from fedssl.config import load_config, save_config
    from fedssl.layout import FINAL_ENCODER

    overrides = [f"run.name={name}", f"run.output_dir={tmp_path}", f"warm_start.source={warm_start}",
                 "warm_start.num_samples=40", "warm_start.steps=2", "warm_start.batch_size=8",
                 "evaluation.label_seeds=[0,1]", "evaluation.methods=[linear_probe,finetune]",
                 "evaluation.finetune_epochs=1"]  # fmt: skip
    config = load_config(Path(__file__).resolve().parents[2] / "configs/experiments/digits-tiny.yaml", overrides)
    config.model.input_shape = [1, 8, 8]
    run_dir = tmp_path / name
    run_dir.mkdir()
    save_config(config, run_dir / "config.yaml")
    warm = prepare_warm_start(config, run_dir)
    m = config.model
    final = read_checkpoint(warm)[0] if warm else build_encoder(m.encoder, (1, 8, 8), width=m.width, depth=m.depth, seed=5).state_dict()
    torch.save(final, run_dir / FINAL_ENCODER)
    return run_dir


@pytest.mark.slow
def test_evaluate_run_adds_warm_start_rows_exactly_when_the_run_used_one(tmp_path):
    from fedssl.evaluation import (
        PRETRAINED_FINETUNE,
        PRETRAINED_PROBE,
        ROW_ORDER,
        WARM_START_FINETUNE,
        WARM_START_PROBE,
        WARM_START_ROWS,
    )
    from fedssl.evaluation.central import evaluate_run
    from fedssl.evaluation.results import RAW_TREES
    from fedssl.layout import EVALUATION_FILE

    image_rows = [row for row in ROW_ORDER if row != RAW_TREES]  # the trees row is for vectors and tables only
    plain = evaluate_run(_finished_run(tmp_path, "plain", "none"))
    assert plain.rows == [row for row in image_rows if row not in WARM_START_ROWS]

    run_dir = _finished_run(tmp_path, "warm", "synthetic")
    warm = evaluate_run(run_dir)
    assert warm.rows == image_rows
    # encoder.pt is the warm start here: read from warm_start.pt, scored on the same subsets and seeds,
    # the warm-start rows must reproduce the pretrained rows run by run.
    for row, baseline in ((PRETRAINED_PROBE, WARM_START_PROBE), (PRETRAINED_FINETUNE, WARM_START_FINETUNE)):
        assert warm.cell(row, 0.1).runs == warm.cell(baseline, 0.1).runs
        assert [run.label_seed for run in warm.cell(baseline, 0.1).runs] == [0, 1]
    gain = warm.gain_over_warm_start(0.1)
    assert gain.delta == 0.0 and gain.spread == 0.0 and gain.seeds == 2
    saved = json.loads((run_dir / EVALUATION_FILE).read_text())
    assert WARM_START_PROBE in saved["rows"] and WARM_START_FINETUNE in saved["rows"]
    # The rows come from the run's warm_start.pt (not from encoder.pt): without it the evaluation stops.
    (run_dir / WARM_START_FILE).unlink()
    with pytest.raises(ConfigError, match="warm_start.pt missing"):
        evaluate_run(run_dir)
