"""Book-keeping per-sample clipping (fedssl.training.bookkeeping) against a direct reference.

The reference is the definition: one autograd pass per sample on one shared forward (same
rotations, views and masks), each sample's whole gradient clipped to C with Opacus' factor
min(1, C / (||g_i|| + 1e-6)), then summed.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedssl.models import build_encoder
from fedssl.models.resnet import ResNetGNEncoder
from fedssl.models.vit import ViTEncoder
from fedssl.pretext import get_pretext
from fedssl.training.bookkeeping import BookkeepingEngine, supported_types

from bookkeeping_reference import (  # noqa: F401  (one_thread: an autouse fixture, so imported to apply here)
    RTOL, SEED, max_rel_error, one_thread, per_sample_grads, pretext_model, reference_clipped_sum,
)


def bookkeeping_clipped_sum(model: nn.Module, x: torch.Tensor, clip: float, seed: int = SEED, reduction: str = "mean"):
    engine = BookkeepingEngine(model, loss_reduction=reduction)
    torch.manual_seed(seed)
    losses = model(x)
    loss = (losses.mean() if reduction == "mean" else losses.sum()) if losses.numel() else losses.sum()
    loss.backward()
    norms = engine.write_clipped_sum(clip)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    engine.remove()
    return grads, norms


def check_exact(build, x: torch.Tensor, reduction: str = "mean", clip_quantile: float = 0.5) -> tuple[int, int]:
    """BK == reference with C at the ``clip_quantile`` of the per-sample norms; returns (#clipped, #not)."""
    reference_model = build()
    _, norms = reference_clipped_sum(reference_model, x, clip=1.0)
    clip = float(torch.quantile(norms, clip_quantile))
    want, _ = reference_clipped_sum(reference_model, x, clip=clip)
    model = build()
    got, bk_norms = bookkeeping_clipped_sum(model, x, clip, reduction=reduction)
    assert torch.allclose(bk_norms, norms, rtol=RTOL, atol=1e-7)
    assert max_rel_error(got, want) < RTOL
    clipped = int((norms > clip + 1e-6).sum())
    return clipped, len(norms) - clipped


class PerSample(nn.Module):
    """Wrap a network into a per-sample loss: a fixed nonlinear function of its output."""

    def __init__(self, net: nn.Module, calls: int = 1) -> None:
        super().__init__()
        self.net = net
        self.calls = calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = sum(self.net(x * (k + 1)) for k in range(self.calls))  # calls > 1: parameter tying
        return torch.tanh(out).pow(2).flatten(1).sum(1) + out.flatten(1).sum(1)


def seeded(factory):
    def build():
        torch.manual_seed(0)
        return factory()

    return build


class _LookupBySign(nn.Module):
    """An Embedding whose row per pixel is chosen by the signs of the sample's first two channels."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = (x[:, 0].flatten(1) > 0).long() + 2 * (x[:, 1].flatten(1) > 0).long()
        return self.table(rows)


LAYERS = {
    "conv2d": lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)),
    "conv2d_stride_dilation": lambda: nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, dilation=2, padding=2)),
    "conv2d_groups_nobias": lambda: nn.Sequential(nn.Conv2d(4, 6, 3, groups=2, bias=False)),
    "conv2d_same_reflect": lambda: nn.Sequential(nn.Conv2d(3, 4, (2, 3), padding="same", padding_mode="reflect")),
    "conv2d_same": lambda: nn.Sequential(nn.Conv2d(3, 4, (2, 3), padding="same")),
    "linear": lambda: nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 5)),
    "linear_sequence": lambda: nn.Sequential(nn.Linear(6, 5)),  # (B, 3, 6, 6): a sequence input
    "linear_frozen_bias": lambda: nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 5)),
    "group_norm": lambda: nn.Sequential(nn.GroupNorm(1, 3)),
    "layer_norm": lambda: nn.Sequential(nn.LayerNorm([6, 6])),
    # stride-2 convs, bias-free convs, 1x1 shortcuts, residual sums, GroupNorm on a 1x1 map
    "resnet_gn": lambda: ResNetGNEncoder((3, 6, 6), width=4, depth=1),
    # data-dependent lookups with repeated rows (the scatter must add them up)
    "embedding": lambda: _LookupBySign(),
    # strided patch conv, position Embedding, attention from Linear on (B, T, D), LayerNorm on 3-D
    "vit": lambda: ViTEncoder((3, 6, 6), width=16, depth=1),
    "conv_gn_relu_linear": lambda: nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 8), nn.LayerNorm(8)
    ),
}


def _layer_model(name: str, calls: int = 1) -> nn.Module:
    model = PerSample(LAYERS[name](), calls=calls)
    if name == "linear_frozen_bias":
        model.net[1].bias.requires_grad_(False)
    for p in model.parameters():  # non-trivial affine parameters for the norm layers
        if p.requires_grad:
            with torch.no_grad():
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_each_layer_type_matches_reference(name):
    x = torch.randn(6, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    if name == "conv2d_groups_nobias":
        x = torch.randn(6, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    clipped, kept = check_exact(seeded(lambda: _layer_model(name)), x)
    assert clipped > 0 and kept > 0  # both branches of the clip factor are exercised


@pytest.mark.parametrize("name", ["conv2d", "linear", "linear_sequence", "group_norm", "layer_norm", "conv_gn_relu_linear"])
def test_parameter_tying_sums_calls_before_the_norm(name):
    x = torch.randn(5, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    clipped, kept = check_exact(seeded(lambda: _layer_model(name, calls=3)), x)
    assert clipped > 0 and kept > 0


def test_sum_reduction_and_nothing_clipped():
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    build = seeded(lambda: _layer_model("conv_gn_relu_linear"))
    clipped, _ = check_exact(build, x, reduction="sum", clip_quantile=1.0)
    assert clipped == 0


@pytest.mark.parametrize(
    "task, params",
    [("rotation", {}), ("rotation", {"all_rotations": True}), ("masked_reconstruction", {}), ("byol", {}), ("simsiam", {})],
)
def test_pretext_tasks_match_reference(task, params):
    """BYOL, SimSiam and all-rotations run the encoder several times per sample (tying)."""
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    clipped, kept = check_exact(pretext_model(task, **params), x)
    assert clipped > 0 and kept > 0


# Conv1d runs through the Conv2d rule on a 1 x L view: every layout that rule picks (channels-last from
# 8 input channels, transposed below, grouped), strides, dilation, string and non-zero padding.
SERIES_LAYERS = {
    "conv1d": lambda: nn.Sequential(nn.Conv1d(8, 4, 5, padding=2)),
    "conv1d_stride_dilation": lambda: nn.Sequential(nn.Conv1d(8, 4, 3, stride=2, dilation=2, padding=2)),
    "conv1d_groups_nobias": lambda: nn.Sequential(nn.Conv1d(8, 6, 3, groups=2, bias=False)),
    "conv1d_same_reflect": lambda: nn.Sequential(nn.Conv1d(8, 4, 4, padding="same", padding_mode="reflect")),
    "conv1d_narrow_then_gn": lambda: nn.Sequential(nn.Conv1d(8, 3, 1), nn.Conv1d(3, 4, 3, padding=1), nn.GroupNorm(2, 4)),
    "conv1d_encoder": lambda: build_encoder("conv1d", (8, 12), width=8, depth=3),
}


@pytest.mark.parametrize("calls", [1, 3])
@pytest.mark.parametrize("name", sorted(SERIES_LAYERS))
def test_conv1d_layers_match_reference(name, calls):
    x = torch.randn(6, 8, 12, generator=torch.Generator().manual_seed(1))
    clipped, kept = check_exact(seeded(lambda: PerSample(SERIES_LAYERS[name](), calls=calls)), x)
    assert clipped > 0 and kept > 0


@pytest.mark.parametrize("task", ["masked_segment", "ts_views"])
def test_time_series_pretexts_match_reference(task):
    small = {"hidden_dim": 16, "projection_dim": 8, "predictor_hidden_dim": 4} if task == "ts_views" else {}

    def build():
        encoder = build_encoder("conv1d", (3, 16), width=8, depth=2, seed=0)
        torch.manual_seed(1)
        return get_pretext(task, small).build_model(encoder)

    x = torch.randn(8, 3, 16, generator=torch.Generator().manual_seed(4))
    clipped, kept = check_exact(build, x)
    assert clipped > 0 and kept > 0


def test_byol_target_network_is_not_trained():
    model = pretext_model("byol")()
    engine = BookkeepingEngine(model)
    assert not any(m in engine.layers for m in model.target_encoder.modules())
    assert {id(p) for p in engine.params} == {id(p) for p in model.parameters() if p.requires_grad}


def test_weight_gradients_are_not_computed_by_backward():
    """The point of book-keeping: autograd's convolution backward runs with the weight and
    bias entries of its output mask off, and no parameter receives an autograd gradient."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class ConvBackwardMasks(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.masks = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.convolution_backward.default:
                self.masks.append(tuple(args[-1]))
            return func(*args, **(kwargs or {}))

    x = torch.rand(4, 1, 8, 8)
    plain = pretext_model("simsiam")()
    with ConvBackwardMasks() as seen:
        plain(x).mean().backward()
    assert any(mask[1] for mask in seen.masks)  # the probe does see ordinary weight gradients

    model = pretext_model("simsiam")()
    BookkeepingEngine(model)
    loss = model(x).mean()
    with ConvBackwardMasks() as seen:
        loss.backward()
    assert seen.masks and not any(mask[1] or mask[2] for mask in seen.masks)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.encoder.parameters())  # unfrozen after the forward


def test_empty_batch_gives_zero_clipped_sum():
    model = pretext_model("byol")()
    got, norms = bookkeeping_clipped_sum(model, torch.zeros(0, 1, 8, 8), clip=1.0)
    assert norms.shape == (0,)
    assert got and all(torch.count_nonzero(g) == 0 for g in got.values())


def test_unsupported_trainable_layer_is_refused():
    model = PerSample(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 16, 2)))
    model.net.append(nn.PReLU())
    with pytest.raises(ValueError, match=r"'net\.3' of type PReLU.*supported types: Conv1d, Conv2d, Embedding, GroupNorm, LayerNorm, Linear"):
        BookkeepingEngine(model)
    model.net[3].requires_grad_(False)  # a frozen layer needs no rule
    BookkeepingEngine(model)


def test_unsupported_parameter_on_a_container_is_refused():
    model = PerSample(nn.Sequential(nn.Linear(6, 2)))
    model.scale = nn.Parameter(torch.ones(1))
    with pytest.raises(ValueError, match="of type PerSample"):
        BookkeepingEngine(model)
    assert "Conv2d" in supported_types()


def test_second_forward_after_backward_is_refused():
    model = _layer_model("linear")
    BookkeepingEngine(model)
    x = torch.randn(3, 3, 6, 6)
    model(x).mean().backward()
    with pytest.raises(RuntimeError, match="gradient accumulation"):
        model(x)


def test_remove_restores_an_ordinary_module():
    model = _layer_model("conv_gn_relu_linear")
    engine = BookkeepingEngine(model)
    engine.remove()
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


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


def _bk_per_sample(model: nn.Module, x: torch.Tensor) -> tuple[list[nn.Parameter], list[list[torch.Tensor]], torch.Tensor]:
    """Per-sample gradients as the engine's rules form them: finish(one-hot e_i) = g_i."""
    from fedssl.training.clip_rules import SUPPORTED

    engine = BookkeepingEngine(model, loss_reduction="sum")
    torch.manual_seed(SEED)
    model(x).sum().backward()
    batch = len(x)
    norm_sq = torch.zeros(batch)
    finishers = []
    for module in engine.layers:
        layer_sq, finish = SUPPORTED[type(module)](module, engine.calls[module], engine._trainable, engine._buffers)
        norm_sq += layer_sq
        finishers.append(finish)
    params = [p for p in model.parameters() if p.requires_grad]
    per_sample = []
    for i in range(batch):
        got = {}
        for finish in finishers:
            got.update(finish(torch.eye(batch)[i]))
        per_sample.append([got[p] for p in params])
    engine.remove()
    return params, per_sample, norm_sq.sqrt()


@pytest.mark.parametrize("calls", [1, 2])
@pytest.mark.parametrize("name", sorted(CONV_CASES))
def test_conv2d_per_sample_gradients_equal_autograd(name, calls):
    kwargs, layout = CONV_CASES[name]
    build = seeded(lambda: PerSample(nn.Sequential(nn.Conv2d(**kwargs)), calls=calls))
    assert _conv_layout(build().net[0]) == layout
    x = torch.randn(5, kwargs["in_channels"], 7, 6, generator=torch.Generator().manual_seed(9))
    params, want = per_sample_grads(build(), x, SEED)
    got_params, got, norms = _bk_per_sample(build(), x)
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


def test_text_transformer_by_masked_tokens_matches_reference():
    """Token + position Embeddings, attention on (B, T, D), per-token head: BK == per-sample autograd."""
    from fedssl.data.text import encode

    texts = ["hello world", "a", "bank transfer fees", "%%%", "intent: card lost", "zz top"]
    x = torch.tensor([encode(t, 12) for t in texts])

    def build():
        encoder = build_encoder("transformer", (12,), width=16, depth=1, seed=0)
        torch.manual_seed(1)
        return get_pretext("masked_tokens").build_model(encoder)

    clipped, kept = check_exact(build, x)
    assert clipped > 0 and kept > 0


# Lengths 2 to 16 of 16: from mostly padding to none at all.
PADDED_TEXTS = ["a", "hello world", "sixteen bytes!!!", "%%%", "intent: card lost", "zz top"]


def _padded_transformer(pooled: bool):
    def build():
        encoder = build_encoder("transformer", (16,), width=16, depth=2, seed=0)
        torch.manual_seed(1)
        if pooled:  # the forward readout: the mean over non-pad tokens
            return PerSample(encoder)
        return get_pretext("masked_tokens").build_model(encoder)

    return build


@pytest.mark.parametrize("pooled", [True, False], ids=["pooled", "masked_tokens"])
def test_text_transformer_with_padded_inputs_matches_reference(pooled):
    """Attention with a key-padding mask: BK == per-sample autograd (the mask is per sample, so it
    couples no samples), and no sample's gradient reaches the PAD embedding or its own pad positions."""
    from fedssl.data.text import PAD, encode

    x = torch.tensor([encode(t, 16) for t in PADDED_TEXTS])
    lengths = (x != PAD).sum(1)
    assert lengths.min() == 2 and lengths.max() == 16
    clipped, kept = check_exact(_padded_transformer(pooled), x)
    assert clipped > 0 and kept > 0
    model = _padded_transformer(pooled)()
    params, got, _ = _bk_per_sample(model, x)
    _, want = per_sample_grads(_padded_transformer(pooled)(), x, SEED)
    encoder = model.net if pooled else model.encoder
    index = {id(p): j for j, p in enumerate(params)}
    token_row, position_rows = index[id(encoder.token_embedding.weight)], index[id(encoder.position_embedding.weight)]
    for i in range(len(x)):
        scale = max(float(w.abs().max()) for w in want[i])
        assert all(float((g - w).abs().max()) <= 1e-4 * scale for g, w in zip(got[i], want[i]))
        assert float(got[i][token_row][PAD].abs().sum()) <= 1e-7 * scale
        assert float(got[i][position_rows][lengths[i] :].abs().sum()) <= 1e-7 * scale  # empty for the full text
