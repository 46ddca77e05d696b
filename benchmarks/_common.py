"""Shared helpers for the benchmark scripts: machine facts, paired timing, result files.

The machine these run on is shared and noisy (2 cores, other jobs running), so every
benchmark reports *ratios measured in one run*, with the two sides interleaved, rather
than absolute times compared across runs. Absolute times are recorded too, for context.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
QUICK_DIR = RESULTS_DIR / "quick"  # --quick output: smoke runs, never the published numbers

if str(PROJECT_ROOT) not in sys.path:  # `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(PROJECT_ROOT))

# The benchmarks measure cost and utility at a given ε, whatever σ and sample rate their plans calibrate
# to; a real site's policy (privacy.min_noise_multiplier, privacy.max_sample_rate) would refuse some of
# those plans, which is a deployment decision, not part of the measurement.
BENCH_SITE_POLICY = {"min_noise_multiplier": 1e-3, "max_sample_rate": 1.0}
BENCH_POLICY_OVERRIDES = [f"privacy.{key}={value}" for key, value in BENCH_SITE_POLICY.items()]  # the same, as --set items


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return float("nan")


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on; the load average shows how noisy the machine was."""
    import numpy
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    for name in ("opacus", "flwr", "sklearn"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is just not reported
            pass
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host_cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "mem_gib": _mem_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "load_avg_1_5_15": list(os.getloadavg()),
        "git_commit": _git_commit(),
        "versions": versions,
        "torch_threads": torch.get_num_threads(),
    }


def command_line() -> str:
    rel = Path(sys.argv[0]).resolve()
    try:
        rel = rel.relative_to(PROJECT_ROOT)
    except ValueError:
        pass
    return " ".join(["python", str(rel), *sys.argv[1:]])


OUT_ENV = "FEDSSL_BENCH_OUT"  # redirects every result file (the smoke test writes into a temp dir)


def require_every_sampled_site_trained(run: str, trained_per_round: list[int], sampled: int, rounds: int) -> None:
    """Stop in one line unless each of ``rounds`` rounds trained all ``sampled`` sites: a benchmark that times a
    federation's rounds measures nothing when replies were refused or dropped (scale.py's 1,000 sites, 2026-12-07)."""
    if len(trained_per_round) != rounds or min(trained_per_round, default=0) < sampled:
        raise SystemExit(f"{run}: sites trained per round {trained_per_round}, not {sampled} in each of {rounds} rounds: "
                         "not a measurement of training rounds; nothing written")


def results_dir(quick: bool) -> Path:
    override = os.environ.get(OUT_ENV)
    if override:
        return Path(override)
    return QUICK_DIR if quick else RESULTS_DIR


def fedssl_simulate(config: Path, sets: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """``fedssl simulate CONFIG --quiet --overwrite --set ...`` from the checkout, as a user runs it: the finished
    process (output captured) and its wall seconds."""
    cmd = [str(Path(sys.executable).parent / "fedssl"), "simulate", str(config), "--quiet", "--overwrite"]
    cmd += [arg for item in sets for arg in ("--set", item)]
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True)
    return done, time.perf_counter() - started


def write_result(name: str, payload: Mapping[str, Any], quick: bool) -> Path:
    """``benchmarks/results/<name>.json`` (or ``results/quick/`` for --quick smoke runs)."""
    out_dir = results_dir(quick)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": name, "quick": quick, "command": command_line(), **payload}
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=_json_default))
    tmp.replace(path)
    return path


def _json_default(value: Any) -> Any:
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:
        pass
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def interleaved_times(variants: Mapping[str, Callable[[], Any]], reps: int, warmup: int = 2, seed: int = 0) -> dict[str, list[float]]:
    """Time each variant ``reps`` times, interleaved in a shuffled order every repetition.

    Interleaving spreads the machine's load bursts over all variants, so their ratio is
    meaningful even when the absolute times are not.
    """
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    rng = random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for _ in range(reps):
        rng.shuffle(names)
        for name in names:
            started = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - started)
    return times


def paired_ratio(numer: list[float], denom: list[float]) -> dict[str, float]:
    """Median and quartiles of the per-repetition ratio numer[i] / denom[i]."""
    ratios = sorted(n / d for n, d in zip(numer, denom))
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
    return {"median": statistics.median(ratios), "q1": q[0], "q3": q[2], "n": len(ratios)}


def median_ms(values: list[float]) -> float:
    return 1e3 * statistics.median(values)


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def quiet_warnings() -> None:
    import warnings

    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    warnings.filterwarnings("ignore", message=".*Optimal order is the largest alpha.*")
    warnings.filterwarnings("ignore", message=".*full_backward_hook.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="opacus")
    warnings.filterwarnings("ignore", category=FutureWarning)
