"""Book-keeping per-sample gradients of Conv2d in every layout its rule uses, against autograd per sample."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedssl.models import build_encoder
from fedssl.pretext import get_pretext

from bookkeeping_reference import (  # noqa: F401  (one_thread: an autouse fixture, so imported to apply here)
    SEED, PerSample, bookkeeping_per_sample, check_exact, one_thread, per_sample_grads, seeded,
)


# ---------------------------------------------------------------------------------------------
# Conv2d per-sample gradients, every layout the rule uses (channels-last im2col from 8 input
# channels on, transposed NCHW matmul below that or for non-zero padding modes, grouped einsum)

CONV_CASES = {
    "cin1_pad1": (dict(in_channels=1, out_channels=8, kernel_size=3, padding=1), "transposed"),
    "cin1_pad0": (dict(in_channels=1, out_channels=8, kernel_size=3, padding=0), "transposed"),
    "cin3_pad1": (dict(in_channels=3, out_channels=5, kernel_size=3, padding=1), "transposed"),
    "cin8_pad1": (dict(in_channels=8, out_channels=5, kernel_size=3, padding=1), "channels_last"),
    "cin16_pad1": (dict(in_channels=16, out_channels=8, kernel_size=3, padding=1), "channels_last"),
    "cin16_pad0": (dict(in_channels=16, out_channels=8, kernel_size=3, padding=0), "channels_last"),
    "cin24_pad2_nobias": (dict(in_channels=24, out_channels=6, kernel_size=3, padding=2, bias=False), "channels_last"),
    "cin16_rect_pad_stride_dilation": (
        dict(in_channels=16, out_channels=4, kernel_size=(2, 3), padding=(1, 2), stride=(2, 1), dilation=(1, 2)),
        "channels_last",
    ),
    "cin16_same_reflect": (dict(in_channels=16, out_channels=4, kernel_size=3, padding="same", padding_mode="reflect"), "transposed"),
    "cin16_groups": (dict(in_channels=16, out_channels=8, kernel_size=3, padding=1, groups=4), "weight"),
}


def _conv_layout(module: nn.Conv2d) -> str:
    from fedssl.training.clip_rules import _channels_last_ok

    return "channels_last" if _channels_last_ok(module) else ("transposed" if module.groups == 1 else "weight")


@pytest.mark.parametrize("calls", [1, 2])
@pytest.mark.parametrize("name", sorted(CONV_CASES))
def test_conv2d_per_sample_gradients_equal_autograd(name, calls):
    kwargs, layout = CONV_CASES[name]
    build = seeded(lambda: PerSample(nn.Sequential(nn.Conv2d(**kwargs)), calls=calls))
    assert _conv_layout(build().net[0]) == layout
    x = torch.randn(5, kwargs["in_channels"], 7, 6, generator=torch.Generator().manual_seed(9))
    params, want = per_sample_grads(build(), x, SEED)
    got_params, got, norms = bookkeeping_per_sample(build(), x)
    assert [p.shape for p in got_params] == [p.shape for p in params]
    for i in range(len(x)):
        for g, w in zip(got[i], want[i]):
            assert g.shape == w.shape
            assert float((g - w).abs().max()) <= 1e-5 * float(w.abs().max())
        want_norm = torch.sqrt(sum(w.pow(2).sum() for w in want[i]))
        assert torch.allclose(norms[i], want_norm, rtol=1e-5)


@pytest.mark.parametrize("calls", [1, 3])
def test_wide_conv_stack_matches_reference(calls):
    """Channels-last layers (16 and 24 input channels) with GroupNorm, clipping both ways."""
    net = lambda: nn.Sequential(  # noqa: E731
        nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
        nn.Conv2d(16, 24, 3, padding=1), nn.GroupNorm(4, 24), nn.ReLU(),
        nn.Conv2d(24, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 6),
    )
    model = seeded(lambda: PerSample(net(), calls=calls))
    assert [_conv_layout(m) for m in model().modules() if isinstance(m, nn.Conv2d)] == ["transposed", "channels_last", "channels_last"]
    x = torch.randn(6, 3, 6, 6, generator=torch.Generator().manual_seed(10))
    clipped, kept = check_exact(model, x)
    assert clipped > 0 and kept > 0


@pytest.mark.parametrize("task", ["rotation", "byol", "jigsaw", "rotation_jigsaw"])
def test_pretext_tasks_with_a_wide_encoder_match_reference(task):
    """Width 16: the encoder's second and third convolutions take the channels-last path (rotation_jigsaw: the
    encoder runs twice per step, so each layer's per-sample gradient sums its two uses)."""
    small = {"hidden_dim": 16, "projection_dim": 8} if task == "byol" else {}

    def build():
        encoder = build_encoder("cnn", (1, 8, 8), width=16, depth=3, seed=0)
        torch.manual_seed(1)
        return get_pretext(task, small).build_model(encoder)

    assert sum(_conv_layout(m) == "channels_last" for m in build().encoder.modules() if isinstance(m, nn.Conv2d)) == 2
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(12))
    clipped, kept = check_exact(build, x)
    assert clipped > 0 and kept > 0
