"""GPU: the DP and the plain step on the ResNet-GN at large batches — samples/s and peak memory.

The one prepared GPU check (issue 13). It runs whenever a GPU is lent to a session and records
the machine with the numbers; CI never needs it. On a machine without CUDA it says so and exits 2
(``--allow-cpu`` runs the same measurement on the CPU, for a smoke check of the script itself).

For each batch size (default 256 and 1024) and each engine — the plain step, fedssl's
book-keeping engine (``privacy.clipping: bookkeeping``, the default) and Opacus' ``hooks`` mode
(``privacy.clipping: opacus``) — it times ``reps`` steps (zero_grad, forward, backward, optimizer
step, then ``torch.cuda.synchronize``), interleaved, and reports the median step, samples/s, the
paired ratio to the plain step and ``torch.cuda.max_memory_allocated`` for that engine alone. An
engine that fails (out of memory, an unsupported kernel) is recorded with its error, not fatal.

    python benchmarks/gpu.py                          # ResNet-GN width 64, depth 4 (ResNet-18), 3x32x32, B = 256, 1024
    python benchmarks/gpu.py --input 1,28,28 --batches 256,1024,4096
    python benchmarks/gpu.py --allow-cpu --quick      # smoke on the CPU: numbers meaningless
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, median_ms, paired_ratio, quiet_warnings, write_result  # noqa: E402
from dp_overhead import ModelSpec, build_model, make_private, step_fn  # noqa: E402

import torch  # noqa: E402

ENGINES = ("plain", "bookkeeping", "hooks")


def gpu_facts(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"device": "cpu"}
    props = torch.cuda.get_device_properties(device)
    return {"device": torch.cuda.get_device_name(device), "total_memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda, "capability": f"{props.major}.{props.minor}"}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_step(engine: str, spec: ModelSpec, batch: int, device: torch.device):
    """One engine's step on ``device``: the plain model with SGD, or the model made private the way training does."""
    model = build_model("rotation", spec).to(device)
    if engine == "plain":
        return step_fn(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    private, optimizer, criterion = make_private(model, engine, batch, noise=1.0, lr=0.05, momentum=0.9, shape=spec.shape)
    return step_fn(private, optimizer, criterion)


def peak_memory(engine: str, spec: ModelSpec, batch: int, device: torch.device) -> dict:
    """Peak memory of a few steps of ``engine`` alone, from a clean allocator state."""
    if device.type != "cuda":
        return {}
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    step = build_step(engine, spec, batch, device)
    x = spec.batch(batch, 7).to(device)
    for _ in range(3):
        step(x)
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del step, x
    torch.cuda.empty_cache()
    return {"peak_memory_gib": round(peak / 2**30, 3)}


def time_engines(spec: ModelSpec, batch: int, reps: int, device: torch.device) -> dict:
    """Interleaved steps of every engine that builds and runs; failures are recorded per engine."""
    x = spec.batch(batch, 7).pin_memory() if device.type == "cuda" else spec.batch(batch, 7)
    steps, out = {}, {}
    for engine in ENGINES:
        try:
            steps[engine] = build_step(engine, spec, batch, device)
            for _ in range(2):  # warm-up: cuDNN autotuning, allocator growth
                steps[engine](x.to(device, non_blocking=True))
            synchronize(device)
        except Exception as err:  # noqa: BLE001 - an engine that cannot run is a result, not a crash
            steps.pop(engine, None)
            out[engine] = {"error": f"{type(err).__name__}: {str(err)[:200]}"}
            if device.type == "cuda":
                torch.cuda.empty_cache()
    times: dict[str, list[float]] = {engine: [] for engine in steps}
    for _ in range(reps):
        for engine, step in steps.items():
            synchronize(device)
            started = time.perf_counter()
            step(x.to(device, non_blocking=True))  # the copy a training step pays, from pinned memory
            synchronize(device)
            times[engine].append(time.perf_counter() - started)
    for engine, values in times.items():
        ms = median_ms(values)
        out[engine] = {"ms": ms, "samples_per_s": batch / (ms / 1000)}
        if engine != "plain" and "plain" in times:
            out[engine]["ratio_vs_plain"] = paired_ratio(values, times["plain"])
    del steps
    for engine in times:
        try:
            out[engine].update(peak_memory(engine, spec, batch, device))
        except Exception as err:  # noqa: BLE001
            out[engine]["peak_memory_error"] = f"{type(err).__name__}: {str(err)[:200]}"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default="3,32,32", help="one sample's shape C,H,W")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=4, help="ResNet stages (4 = ResNet-18)")
    parser.add_argument("--batches", default="256,1024")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--allow-cpu", action="store_true", help="measure on the CPU when there is no CUDA (smoke only)")
    parser.add_argument("--quick", action="store_true", help="3x16x16, width 8, depth 2, batch 16, 2 reps: checks the script runs")
    args = parser.parse_args(argv)
    quiet_warnings()
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu: no CUDA device here (torch.cuda.is_available() is False); run on a GPU machine, or pass --allow-cpu for a smoke run")
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    shape = (3, 16, 16) if args.quick else tuple(int(d) for d in args.input.split(","))
    spec = ModelSpec("resnet", shape, 8 if args.quick else args.width, 2 if args.quick else args.depth)
    batches = [16] if args.quick else [int(b) for b in args.batches.split(",")]
    reps = 2 if args.quick else args.reps
    results = {}
    for batch in batches:
        results[str(batch)] = time_engines(spec, batch, reps, device)
        line = "  ".join(f"{e}={r['samples_per_s']:.0f}/s" if "samples_per_s" in r else f"{e}=failed" for e, r in results[str(batch)].items())
        print(f"gpu: batch {batch}: {line}", flush=True)
    payload = {"machine": {**machine_info(), **gpu_facts(device)},
               "settings": {"encoder": "resnet", "width": spec.width, "depth": spec.depth, "input": list(shape), "reps": reps,
                            "pretext": "rotation", "noise_multiplier": 1.0, "max_grad_norm": 1.0},
               "batches": results}
    path = write_result(f"gpu_{device.type}_{'x'.join(map(str, shape))}", payload, args.quick)  # one file per input size
    print(f"gpu: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
