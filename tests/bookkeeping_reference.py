"""The reference that book-keeping clipping is tested against: the definition, one autograd pass per sample.

Shared by tests/training/test_bookkeeping.py (each layer and pretext), test_bookkeeping_conv.py (every
convolution layout), test_private_optimizer.py (the noised step and train_round with each clipping engine) and
tests/gpu. ``check_exact`` compares the engine with it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedssl.models import build_encoder
from fedssl.pretext import get_pretext
from fedssl.training.bookkeeping import BookkeepingEngine

RTOL = 1e-4
SEED = 11


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: a second OpenMP thread only spins (100x slower on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def per_sample_grads(model: nn.Module, x: torch.Tensor, seed: int) -> tuple[list[nn.Parameter], list[list[torch.Tensor]]]:
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(seed)
    losses = model(x)
    out = []
    for i in range(len(x)):
        grads = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
        out.append([torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)])
    return params, out


def reference_clipped_sum(model: nn.Module, x: torch.Tensor, clip: float, seed: int = SEED):
    """({param name: sum_i clip_C(g_i)}, per-sample norms), by one autograd pass per sample."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params, grads = per_sample_grads(model, x, seed)
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for sample in grads:
        norm = float(torch.sqrt(sum(g.pow(2).sum() for g in sample)))
        norms.append(norm)
        factor = min(1.0, clip / (norm + 1e-6))
        for t, g in zip(total, sample):
            t += factor * g
    return dict(zip(names, total)), torch.tensor(norms)


def max_rel_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert set(got) == set(want)
    worst = max(float((got[n] - want[n]).abs().max()) for n in want)
    scale = max(float(want[n].abs().max()) for n in want)
    assert scale > 0, "the reference gradient is zero: the test would prove nothing"
    return worst / scale


def pretext_model(task: str, **params):
    small = {"hidden_dim": 16, "projection_dim": 8} if task in ("byol", "simsiam") else {}
    if task == "simsiam":
        small["predictor_hidden_dim"] = 4

    def build():
        encoder = build_encoder("cnn", (1, 8, 8), width=8, depth=2, seed=0)
        torch.manual_seed(1)
        return get_pretext(task, {**small, **params}).build_model(encoder)

    return build


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


def bookkeeping_per_sample(model: nn.Module, x: torch.Tensor) -> tuple[list[nn.Parameter], list[list[torch.Tensor]], torch.Tensor]:
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
