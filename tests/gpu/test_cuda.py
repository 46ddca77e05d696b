"""The CUDA path, on a GPU: skipped where there is none (CI), run on a lent GPU machine by
benchmarks/gpu_check.sh.

- A DP round trains on the GPU and is charged exactly as on the CPU (the accountant does not care where), and its
  reply's weights come back to the host.
- The book-keeping engine's clipped gradient sum on the GPU equals the definition computed there (one autograd pass
  per sample), for the ResNet-GN (strided convolutions, GroupNorm) the GPU benchmark times.
- The coordinator's side runs there too: frozen features equal the CPU's, fine-tuning leaves the caller's encoder
  where it was, and a warm start's weights come back to the host.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from bookkeeping_reference import max_rel_error, reference_clipped_sum
from fedssl.models import build_encoder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def full_fp32():
    """TF32 convolutions and matmuls would differ from the CPU in the 4th digit: compare in full float32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_a_dp_round_trains_on_the_gpu_and_is_charged_as_on_the_cpu(tmp_path, digits_site, global_encoder, make_plan, make_site):
    from fedssl.training.local import train_round

    cpu = train_round(digits_site, global_encoder, make_plan(), make_site(tmp_path / "cpu"))
    gpu = train_round(digits_site, global_encoder, make_plan(), dataclasses.replace(make_site(tmp_path / "gpu"), device="cuda"))
    assert gpu.status == cpu.status == "trained"
    assert gpu.epsilon == pytest.approx(cpu.epsilon, rel=1e-12) and gpu.steps == cpu.steps
    assert set(gpu.encoder_state) == set(cpu.encoder_state)
    assert all(t.device.type == "cpu" for t in gpu.encoder_state.values())
    moved = sum(float((gpu.encoder_state[k].float() - global_encoder[k].float()).abs().max()) for k in global_encoder)
    assert moved > 0  # it trained (and was noised), not only copied


class _SquaredFeatures(torch.nn.Module):
    """A per-sample loss with no randomness in it, so the reference and the engine see the same forward."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x).pow(2).sum(dim=1)


def test_bookkeeping_on_the_gpu_equals_the_per_sample_definition_for_the_resnet_gn():
    from fedssl.training.bookkeeping import BookkeepingEngine

    def build():
        return _SquaredFeatures(build_encoder("resnet", (3, 16, 16), width=8, depth=2, seed=0)).to(CUDA)

    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(3)).to(CUDA)
    _, norms = reference_clipped_sum(build(), x, clip=1.0)
    clip = float(torch.quantile(norms, 0.5))
    want, _ = reference_clipped_sum(build(), x, clip=clip)
    model = build()
    engine = BookkeepingEngine(model, loss_reduction="sum")
    model(x).sum().backward()
    got_norms = engine.write_clipped_sum(clip)
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    engine.remove()
    assert all(g.device.type == "cuda" for g in got.values())
    assert torch.allclose(got_norms.cpu(), norms.cpu(), rtol=1e-4)
    assert max_rel_error(got, want) < 1e-4


def test_the_coordinators_evaluation_and_warm_start_run_on_the_gpu_and_return_to_the_host():
    from fedssl.evaluation.probes import encode, finetune_accuracy
    from fedssl.warmstart.pretrain import pretrain_encoder

    encoder = build_encoder("cnn", (1, 8, 8), width=8, depth=2, seed=0)
    x = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    y = np.arange(40) % 4
    np.testing.assert_allclose(encode(encoder, x, CUDA), encode(encoder, x), rtol=1e-4, atol=1e-5)
    assert next(encoder.parameters()).device.type == "cpu"  # encode puts it back where it was
    accuracy = finetune_accuracy(encoder, x, y, x, y, epochs=3, lr=0.01, batch_size=8, seed=0, device=CUDA)
    assert 0.0 <= accuracy <= 1.0 and next(encoder.parameters()).device.type == "cpu"
    state = pretrain_encoder(x, encoder="cnn", width=8, depth=2, steps=3, batch_size=8, seed=0, device=CUDA)
    assert all(t.device.type == "cpu" for t in state.values())
