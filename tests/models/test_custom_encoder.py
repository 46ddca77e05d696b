"""Bring your own encoder (`model.encoder: "package.module:factory"`): built alike everywhere, refused in
one line when it cannot be trained privately, before any site is contacted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedssl.errors import ConfigError
from fedssl.models import build_encoder, encoder_state_keys
from fedssl.models.private import check_encoder

ROOT = Path(__file__).resolve().parents[2]

USER_MODULE = '''
import torch
from torch import nn


def small_cnn(input_shape, width, depth):
    channels = input_shape[0]
    return nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(2, width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


def batchnorm_and_lstm(input_shape, width, depth):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(input_shape[0], width, 3), nn.BatchNorm2d(width))
            self.rnn = nn.LSTM(width, width, batch_first=True)

        def forward(self, x):
            h = self.stem(x).flatten(2).transpose(1, 2)
            return self.rnn(h)[0][:, -1]
    return Net()


def feature_map(input_shape, width, depth):
    return nn.Conv2d(input_shape[0], width, 3)


def wrong_arguments(shape):
    return nn.Flatten()

NOT_CALLABLE = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_encoders.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_encoders"
    sys.modules.pop("my_encoders", None)


def test_a_private_model_is_built_alike_with_its_feature_count(user_module):
    encoder = build_encoder(f"{user_module}:small_cnn", (1, 8, 8), width=4, depth=1, seed=3)
    assert encoder.out_dim == 4 and encoder.input_shape == (1, 8, 8)
    assert encoder(torch.randn(5, 1, 8, 8)).shape == (5, 4)
    again = build_encoder(f"{user_module}:small_cnn", (1, 8, 8), width=4, depth=1, seed=3)
    assert encoder_state_keys(encoder) == encoder_state_keys(again)
    assert all(torch.equal(a, b) for a, b in zip(encoder.state_dict().values(), again.state_dict().values()))
    check_encoder(f"{user_module}:small_cnn", (1, 8, 8), 4, 1)  # passes


def test_a_model_opacus_cannot_make_private_is_one_line_naming_each_layer_and_fix(user_module):
    with pytest.raises(ConfigError) as refused:
        check_encoder(f"{user_module}:batchnorm_and_lstm", (1, 8, 8), 4, 1)
    message = str(refused.value)
    assert "\n" not in message and message.startswith("model.encoder: my_encoders:batchnorm_and_lstm cannot be trained with DP-SGD")
    assert "stem.1 (BatchNorm2d): use nn.GroupNorm" in message and "rnn (LSTM): use opacus.layers.DPLSTM" in message


@pytest.mark.parametrize("factory,expected", [
    ("feature_map", "must return (batch, features)"),
    ("wrong_arguments", "it must accept those keyword arguments"),
    ("NOT_CALLABLE", "has no callable 'NOT_CALLABLE'"),
    ("missing", "has no callable 'missing'"),
])
def test_a_broken_factory_is_one_line(user_module, factory, expected):
    with pytest.raises(ConfigError, match=f"^model.encoder: .*{__import__('re').escape(expected)}") as refused:
        check_encoder(f"{user_module}:{factory}", (1, 8, 8), 4, 1)
    assert "\n" not in str(refused.value)


def test_an_unimportable_module_says_where_to_install_it():
    with pytest.raises(ConfigError, match="cannot import 'no_such_package.encoders'.*install the module on the coordinator and at every site"):
        build_encoder("no_such_package.encoders:net", (1, 8, 8))


def test_simulate_refuses_a_non_private_encoder_before_flower_starts(tmp_path):
    (tmp_path / "my_encoders.py").write_text(USER_MODULE)
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run(
        [str(Path(sys.executable).parent / "fedssl"), "simulate", str(ROOT / "configs" / "experiments" / "digits-tiny.yaml"),
         "--set", f"run.output_dir={tmp_path / 'runs'}", "--set", "model.encoder=my_encoders:batchnorm_and_lstm"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert "stem.1 (BatchNorm2d): use nn.GroupNorm" in done.stderr
    assert not (tmp_path / "runs").exists()  # nothing was started, no run directory was made
