"""The reference that book-keeping clipping is tested against: the definition, one autograd pass per sample.

Shared by tests/training/test_bookkeeping.py (each layer and pretext) and test_private_optimizer.py (the
noised step and train_round with each clipping engine).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedssl.models import build_encoder
from fedssl.pretext import get_pretext

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
