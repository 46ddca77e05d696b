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
    SEED, PerSample, bookkeeping_clipped_sum, bookkeeping_per_sample, check_exact, one_thread, per_sample_grads,
    pretext_model, seeded,
)


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
    params, got, _ = bookkeeping_per_sample(model, x)
    _, want = per_sample_grads(_padded_transformer(pooled)(), x, SEED)
    encoder = model.net if pooled else model.encoder
    index = {id(p): j for j, p in enumerate(params)}
    token_row, position_rows = index[id(encoder.token_embedding.weight)], index[id(encoder.position_embedding.weight)]
    for i in range(len(x)):
        scale = max(float(w.abs().max()) for w in want[i])
        assert all(float((g - w).abs().max()) <= 1e-4 * scale for g, w in zip(got[i], want[i]))
        assert float(got[i][token_row][PAD].abs().sum()) <= 1e-7 * scale
        assert float(got[i][position_rows][lengths[i] :].abs().sum()) <= 1e-7 * scale  # empty for the full text
