"""DP overhead: one DP-SGD step (Opacus modes and book-keeping) vs one non-private step, same encoder and batch.

For every DP-compatible image pretext task and every per-sample-clipping engine — Opacus'
modes ``hooks``, ``functorch``, ``ew`` (expanded weights), ``ghost`` clipping, and
``bookkeeping`` (fedssl.training.bookkeeping: one backward pass without ordinary weight
gradients, Bu et al., ICML 2023, with Opacus' own DP optimizer for noise and accounting) —
this script

1. checks that the mode clips *exactly* per sample: with noise 0 and lr 1, the update the
   DP optimizer produces must equal sum_i clip_C(grad loss_i) / B, computed independently
   by one autograd pass per sample on the same forward (same rotations / views / masks);
2. checks that an empty Poisson batch (B = 0) still steps;
3. times the step (zero_grad, forward, backward, optimizer step) against the plain step,
   interleaved in one run, and reports the paired median ratio.

The fastest exact mode per task is reported as ``chosen``. Torch runs on one thread, as
in a simulation worker with ``client_cpus = 1``.

    python benchmarks/dp_overhead.py            # full: width 64 (the demo encoder), 40 reps
    python benchmarks/dp_overhead.py --quick    # smoke: width 16, 2 tasks, 4 reps
    python benchmarks/dp_overhead.py --encoder resnet --input 1,28,28 --width 16 --depth 2 --tasks rotation --reps 10
                                                # ResNet-18-GN on Fashion-MNIST-sized images: dp_overhead_resnet_28x28.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved_times, machine_info, median_ms, paired_ratio, quiet_warnings, write_result  # noqa: E402

import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

MODES = ("hooks", "functorch", "ew", "ghost", "bookkeeping")


@dataclass(frozen=True)
class ModelSpec:
    """The encoder under test: the registry name, one sample's shape, width and depth."""

    encoder: str
    shape: tuple[int, ...]
    width: int
    depth: int

    def batch(self, size: int, seed: int) -> torch.Tensor:
        return torch.rand(size, *self.shape, generator=torch.Generator().manual_seed(seed))
OPACUS_PREFIX = "_module."
EXACT_RTOL = 1e-4


class _PerSampleIdentity(torch.nn.Module):
    """Criterion for ghost clipping: the pretext model already returns per-sample losses."""

    reduction = "mean"

    def forward(self, per_sample: torch.Tensor, _target=None) -> torch.Tensor:
        if self.reduction == "none":
            return per_sample
        return per_sample.mean() if self.reduction == "mean" else per_sample.sum()


def image_tasks() -> list[str]:
    from fedssl.pretext import PRETEXT_TASKS
    from fedssl.pretext.base import IMAGE

    return sorted(name for name, cls in PRETEXT_TASKS.items() if cls.dp_compatible and IMAGE in cls.modalities)


def refused_tasks() -> list[str]:
    from fedssl.pretext import PRETEXT_TASKS

    return sorted(name for name, cls in PRETEXT_TASKS.items() if not cls.dp_compatible)


def build_model(task: str, spec: ModelSpec, seed: int = 0):
    from fedssl.models import build_encoder
    from fedssl.pretext import get_pretext

    encoder = build_encoder(spec.encoder, spec.shape, width=spec.width, depth=spec.depth, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        return get_pretext(task).build_model(encoder)


def make_private(model, mode: str, batch: int, noise: float, lr: float, momentum: float, shape: tuple[int, ...]):
    """Wrap like fedssl.training.local does (Poisson, flat clipping C = 1), in ``mode``."""
    from opacus import PrivacyEngine

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=momentum)
    # 4 batches' worth of rows: sample rate 1/4, expected batch size exactly `batch`.
    loader = DataLoader(TensorDataset(torch.zeros(4 * batch, *shape)), batch_size=batch)
    if mode == "bookkeeping":
        from fedssl.training.bookkeeping import make_private_bookkeeping

        private, dp_optimizer, _ = make_private_bookkeeping(
            PrivacyEngine(), module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise, max_grad_norm=1.0,
        )
        return private, dp_optimizer, None
    kwargs = {"criterion": _PerSampleIdentity()} if mode == "ghost" else {}
    out = PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise, max_grad_norm=1.0,
        poisson_sampling=True, grad_sample_mode=mode, **kwargs,
    )
    if mode == "ghost":
        private, dp_optimizer, criterion, _ = out
    else:
        (private, dp_optimizer, _), criterion = out, None
    return private, dp_optimizer, criterion


def empty_batch_step(optimizer) -> None:
    """The guard ``ew`` needs (and local.py would need with it): torch's ExpandedWeights refuse a
    batch of 0, so give every parameter an empty per-sample gradient and take the noise-only step."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()


def step_fn(model, optimizer, criterion=None, guard_empty: bool = False):
    def step(batch: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        if guard_empty and batch.shape[0] == 0:
            empty_batch_step(optimizer)
            return
        per_sample = model(batch)
        if criterion is not None:
            loss = criterion(per_sample, None)
        else:
            loss = per_sample.mean() if per_sample.numel() else per_sample.sum()
        loss.backward()
        optimizer.step()

    return step


def reference_update(model, batch: torch.Tensor, seed: int, clip: float) -> dict[str, torch.Tensor]:
    """sum_i clip(grad of loss_i) / B, one autograd pass per sample on one shared forward."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    torch.manual_seed(seed)
    losses = model(batch)
    total = {n: torch.zeros_like(p) for n, p in named}
    for i in range(len(batch)):
        grads = torch.autograd.grad(losses[i], [p for _, p in named], retain_graph=True, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for (_, p), g in zip(named, grads)]
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        factor = min(1.0, clip / (float(norm) + 1e-6))  # Opacus' flat clipping factor
        for (n, _), g in zip(named, grads):
            total[n] += factor * g
    return {n: t / len(batch) for n, t in total.items()}


def exactness(task: str, mode: str, spec: ModelSpec, batch: int, seed: int = 123) -> dict:
    """Max relative error of the mode's noise-free DP update against the reference."""
    x = spec.batch(batch, seed)
    reference = reference_update(build_model(task, spec), x, seed, clip=1.0)
    model = build_model(task, spec)
    try:
        private, optimizer, criterion = make_private(model, mode, batch, noise=0.0, lr=1.0, momentum=0.0, shape=spec.shape)
        torch.manual_seed(seed)
        step_fn(private, optimizer, criterion)(x)
    except Exception as err:  # noqa: BLE001 - a mode that cannot run this model is a result, not a crash
        return {"runs": False, "exact": False, "error": f"{type(err).__name__}: {str(err)[:200]}"}
    worst, scale = 0.0, 0.0
    for name, param in model.named_parameters():
        key = name.removeprefix(OPACUS_PREFIX)
        if key not in reference:
            continue
        got = param.grad if param.grad is not None else torch.zeros_like(param)
        worst = max(worst, float((got - reference[key]).abs().max()))
        scale = max(scale, float(reference[key].abs().max()))
    rel = worst / scale if scale else math.inf
    empty_ok, empty_err = empty_batch_ok(task, mode, spec, batch)
    guarded_ok = empty_ok or empty_batch_ok(task, mode, spec, batch, guard=True)[0]
    return {
        "empty_batch_ok_with_guard": guarded_ok,
        "runs": True,
        "exact": rel < EXACT_RTOL,
        "max_rel_error": rel,
        "empty_batch_ok": empty_ok,
        **({"empty_batch_error": empty_err} if empty_err else {}),
    }


def empty_batch_ok(task: str, mode: str, spec: ModelSpec, batch: int, guard: bool = False) -> tuple[bool, str]:
    model = build_model(task, spec)
    try:
        private, optimizer, criterion = make_private(model, mode, batch, noise=1.0, lr=0.05, momentum=0.9, shape=spec.shape)
        before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        step_fn(private, optimizer, criterion, guard_empty=guard)(torch.zeros(0, *spec.shape))
        moved = any(not torch.equal(b, p.detach()) for b, p in zip(before, [p for p in model.parameters() if p.requires_grad]))
        if not moved:
            return False, "no noise-only step was taken"
        return True, ""
    except Exception as err:  # noqa: BLE001
        return False, f"{type(err).__name__}: {str(err)[:160]}"


def time_task(task: str, spec: ModelSpec, batch: int, reps: int, modes: list[str], runnable: dict[str, bool]) -> dict:
    x = spec.batch(batch, 7)
    plain = build_model(task, spec)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9)
    variants = {"plain": (lambda s=step_fn(plain, plain_opt): s(x))}
    for mode in modes:
        if not runnable.get(mode):
            continue
        private, optimizer, criterion = make_private(build_model(task, spec), mode, batch, noise=1.0, lr=0.05, momentum=0.9,
                                                     shape=spec.shape)
        variants[mode] = lambda s=step_fn(private, optimizer, criterion): s(x)
    times = interleaved_times(variants, reps=reps, warmup=2)
    out = {"plain_ms": median_ms(times["plain"]), "plain_samples_per_s": batch / (median_ms(times["plain"]) / 1000)}
    for mode in modes:
        if mode in times:
            out[mode] = {"ms": median_ms(times[mode]), "samples_per_s": batch / (median_ms(times[mode]) / 1000),
                         "ratio_vs_plain": paired_ratio(times[mode], times["plain"])}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (checks for crashes, numbers meaningless)")
    parser.add_argument("--encoder", default="cnn", help="registry name (cnn, resnet) or package.module:factory")
    parser.add_argument("--input", default="1,8,8", help="one sample's shape C,H,W (default 1,8,8: digits)")
    parser.add_argument("--tasks", default=None, help="comma-separated pretext tasks (default: every DP image task)")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    quiet_warnings()
    torch.set_num_threads(args.threads)
    spec = ModelSpec(args.encoder, tuple(int(d) for d in args.input.split(",")), args.width or (16 if args.quick else 64), args.depth)
    reps = args.reps or (4 if args.quick else 40)
    batch = 8 if args.quick else args.batch
    tasks = args.tasks.split(",") if args.tasks else image_tasks()[: 2 if args.quick else None]
    started = time.perf_counter()
    machine = machine_info()
    results = {task: measure_task(task, spec, batch, reps) for task in tasks}
    payload = {
        "machine": machine,
        "settings": {"encoder": spec.encoder, "width": spec.width, "depth": spec.depth, "batch": batch, "input": list(spec.shape),
                     "reps": reps, "torch_threads": args.threads, "max_grad_norm": 1.0, "optimizer": "sgd(0.05, momentum 0.9)",
                     "exact_rtol": EXACT_RTOL},
        "target_ratio": 1.3,
        "tasks": results,
        "not_dp_compatible": refused_tasks(),
        "seconds": time.perf_counter() - started,
        "load_avg_end": list(__import__("os").getloadavg()),
    }
    # The digits CNN keeps the historical name (benchmarks/summarize.py reads it); other settings get their own file.
    default = spec.encoder == "cnn" and spec.shape == (1, 8, 8)
    name = "dp_overhead" if default else f"dp_overhead_{spec.encoder.replace(':', '_').replace('.', '_')}_{spec.shape[1]}x{spec.shape[2]}"
    path = write_result(name, payload, args.quick)
    print(f"dp_overhead: wrote {path}")
    return 0


def measure_task(task: str, spec: ModelSpec, batch: int, reps: int) -> dict:
    """Exactness and paired timing of every mode on one task; the fastest exact mode is ``chosen``."""
    modes = list(MODES)
    checks = {mode: exactness(task, mode, spec, min(batch, 8)) for mode in modes}
    timing = time_task(task, spec, batch, reps, modes, {m: c["runs"] for m, c in checks.items()})
    modes_out = {mode: {**checks[mode], **timing.get(mode, {})} for mode in modes}
    # Eligible: exact clipping, and empty Poisson batches work as is or with the
    # one-line guard of empty_batch_step (a change local.py would have to make).
    eligible = [m for m in modes if modes_out[m].get("exact") and modes_out[m].get("empty_batch_ok_with_guard") and "ms" in modes_out[m]]
    chosen = min(eligible, key=lambda m: modes_out[m]["ratio_vs_plain"]["median"]) if eligible else None
    line = "  ".join(
        f"{m}={modes_out[m]['ratio_vs_plain']['median']:.2f}x{'' if modes_out[m].get('exact') else '(INEXACT)'}"
        if "ratio_vs_plain" in modes_out[m] else f"{m}=n/a"
        for m in modes
    )
    print(f"dp_overhead: {task:22s} plain {timing['plain_ms']:.1f} ms ({timing['plain_samples_per_s']:.0f} samples/s)  {line}  -> {chosen}",
          flush=True)
    return {
        "plain_ms": timing["plain_ms"],
        "plain_samples_per_s": timing["plain_samples_per_s"],
        "modes": modes_out,
        "chosen": chosen,
        "chosen_ratio": modes_out[chosen]["ratio_vs_plain"]["median"] if chosen else None,
        "current_hooks_ratio": modes_out["hooks"].get("ratio_vs_plain", {}).get("median"),
    }


if __name__ == "__main__":
    sys.exit(main())
