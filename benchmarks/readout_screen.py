"""Which encoder readout and pretext could reach the flagship's probe target, centrally and without DP.

The flagship (flagship.py, §10 of README.md) misses its target: at eps 8 the federated encoder's linear probe
should beat both the random-init probe and the raw-pixel probe by >= 3 points at 600 labels. This screen asks
the question under the noise: with no DP, no federation and 8x the private run's steps per site, does any
pretext move the probe that far, and how much does the encoder's readout (the adaptive-average-pool grid
before flattening) change the controls themselves?

One configuration per call (the 2-core machine runs two side by side): the CNN is built exactly as fedssl
builds it with ``model.readout`` = ``--readout`` (a pool has no weights, so the state dict is unchanged), and
it is scored by the same standardized logistic-regression probe as the flagship, at 600 labels on two label
seeds, on a validation split carved from the Fashion-MNIST training pool (the test set is never read), at
random init and after half and all of ``--steps`` SGD steps of batch 256. Each call adds its entry to
``results/readout_screen.json``; ``--raw`` adds the raw-pixel probe, ``--gabor 4 7`` the probe of a fixed Gabor
filter bank (no data, no training: the zero-privacy-cost bar) at each pool grid, ``--finetune-labels 100`` the
flagship's fine-tune at the budget of its fine-tune target (encoder and head trained together, at the same points).

    python benchmarks/readout_screen.py --raw
    python benchmarks/readout_screen.py --gabor 4 7 --probe-C 0.01 0.1 1
    python benchmarks/readout_screen.py --readout 4 --pretext rotation --steps 400
    python benchmarks/readout_screen.py --quick --data DIR        # smoke run on tiny IDX files
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, machine_info, quiet_warnings, results_dir, write_result  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import flagship  # noqa: E402
import learning_kit  # noqa: E402

LABELS = 600
DIGITS_LABELS = 100  # 10 per class of the embedded digits' ~1,000-image pool
LABEL_SEEDS = (0, 1)
BATCH = 256
NAME = "readout_screen"


def build(width: int, depth: int, readout: int, side: int):
    from fedssl.models import build_encoder

    return build_encoder("cnn", (1, side, side), width=width, depth=depth, seed=0, readout=readout)


def probe(net, data: learning_kit.Data, labels: int, label_seeds: tuple[int, ...] = LABEL_SEEDS,
          probe_Cs: tuple[float, ...] = (1.0,)) -> float | dict[str, float]:
    """Mean validation accuracy of the linear probe over the label seeds; ``net=None`` probes raw pixels.

    One C gives one number (the flagship's probe, C = 1); several give one per C, so each row's
    regularization can be picked on this validation split rather than fixed for every row.
    """
    from fedssl.data.sampling import stratified_subset
    from fedssl.evaluation.probes import encode, flatten_inputs, linear_probe_accuracy

    if net is None:
        pool, validation = flatten_inputs(data.train_x), flatten_inputs(data.test_x)
    else:
        pool, validation = encode(net, data.train_x, learning_kit.device()), encode(net, data.test_x, learning_kit.device())
    subsets = [stratified_subset(data.train_y, labels, seed) for seed in label_seeds]
    by_C = {f"{C:g}": float(np.mean([linear_probe_accuracy(pool[subset], data.train_y[subset], validation, data.test_y, C)
                                     for subset in subsets])) for C in probe_Cs}
    return next(iter(by_C.values())) if len(by_C) == 1 else by_C


def finetune(net, data: learning_kit.Data, labels: int, label_seeds: tuple[int, ...] = LABEL_SEEDS,
             setup: flagship.Setup = flagship.FLAGSHIP) -> float:
    """Mean validation accuracy of the flagship's fine-tune (encoder + linear head, Adam, its epochs and lr)."""
    from fedssl.data.sampling import stratified_subset
    from fedssl.evaluation.probes import finetune_accuracy

    return float(np.mean([finetune_accuracy(net, data.train_x[subset], data.train_y[subset], data.test_x, data.test_y,
                                            epochs=setup.finetune_epochs, lr=setup.finetune_lr, batch_size=32,
                                            seed=seed, device=learning_kit.device())
                          for seed in label_seeds for subset in [stratified_subset(data.train_y, labels, seed)]]))


def _score(net, args, data: learning_kit.Data, labels: int) -> dict:
    """The probe at ``labels`` and, with --finetune-labels, the fine-tune at that budget."""
    scores = {"probe": probe(net, data, labels, args.label_seeds, args.probe_C)}
    if args.finetune_labels:
        setup = flagship.QUICK if args.quick else flagship.FLAGSHIP
        scores["finetune"] = finetune(net, data, args.finetune_labels, args.label_seeds, setup)
    return scores


def screen(args, data: learning_kit.Data, labels: int) -> dict:
    """Random-init probe, then central SGD on the pretext with probes at half and all of the steps (none for --steps 0)."""
    from fedssl.pretext.registry import get_pretext

    net = build(args.width, args.depth, args.readout, data.train_x.shape[-1])
    entry = {"readout": args.readout, "grid": net.readout, "pretext": args.pretext, "params": args.params,
             "steps": args.steps, "lr": args.lr, "width": args.width, "depth": args.depth,
             "finetune_labels": args.finetune_labels}
    random_scores = _score(net, args, data, labels)
    entry["random_probe"] = random_scores["probe"]
    if "finetune" in random_scores:
        entry["random_finetune"] = random_scores["finetune"]
    if args.steps == 0:
        return entry
    started = time.perf_counter()
    torch.manual_seed(0)
    device = learning_kit.device()
    model = get_pretext(args.pretext, args.params).build_model(net).to(device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=args.lr, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    entry["pretrained_probe"], finetunes = {}, {}
    for step in range(1, args.steps + 1):
        model.train()
        batch = data.train_x[torch.randint(len(data.train_x), (BATCH,), generator=generator)].to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        loss = model(batch).mean()
        loss.backward()
        optimizer.step()
        model.after_optimizer_step()
        if step in (args.steps // 2, args.steps):
            scores = _score(model.encoder, args, data, labels)
            entry["pretrained_probe"][str(step)] = scores["probe"]
            if "finetune" in scores:
                finetunes[str(step)] = scores["finetune"]
    if finetunes:
        entry["pretrained_finetune"] = finetunes
    entry["final_loss"] = float(loss.detach())
    entry["train_seconds"] = time.perf_counter() - started
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=flagship.FASHION, help="the folder of the Fashion-MNIST IDX files")
    parser.add_argument("--raw", action="store_true", help="add the raw-pixel probe instead of an encoder")
    parser.add_argument("--gabor", type=int, nargs="+", metavar="GRID", help="add the probe of the fixed Gabor filter bank "
                        "(fedssl.evaluation.handcrafted) pooled over GRID x GRID cells, for each GRID, instead of an encoder")
    parser.add_argument("--readout", type=int, default=2, help="model.readout: the pool grid side (2: 4 x width features; 0: fedssl's choice for the image)")
    parser.add_argument("--pretext", default="rotation")
    parser.add_argument("--params", type=json.loads, default={}, help='pretext params as JSON, e.g. \'{"tau": 0.996}\'')
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--digits", action="store_true",
                        help=f"the embedded 8x8 digits (make demo's data) instead of Fashion-MNIST, {DIGITS_LABELS} labels")
    parser.add_argument("--label-seeds", type=int, nargs="+", default=list(LABEL_SEEDS))
    parser.add_argument("--probe-C", type=float, nargs="+", default=[1.0],
                        help="the probe's inverse L2 strength; several score each on the validation split")
    parser.add_argument("--finetune-labels", type=int, default=0,
                        help="also score the flagship's fine-tune at this many labels (the target's budget is 100); 0: not")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    learning_kit.add_device_option(parser)
    args = parser.parse_args(argv)
    device = learning_kit.apply_device_option(parser, args)
    if min(args.probe_C) <= 0:
        parser.error(f"--probe-C {min(args.probe_C)}: every C must be > 0")
    if args.finetune_labels < 0:
        parser.error(f"--finetune-labels {args.finetune_labels}: 0 (no fine-tune) or a label budget")
    if args.gabor and min(args.gabor) < 1:
        parser.error(f"--gabor {min(args.gabor)}: every grid must be >= 1 cell per side")
    if args.steps < 0:
        parser.error(f"--steps {args.steps}: 0 (random init only) or more")
    if not args.digits and not (args.data / "train-images-idx3-ubyte.gz").exists():
        print(f"readout_screen: no Fashion-MNIST in {args.data}; apt-get install dataset-fashion-mnist (or --data DIR)")
        return 2
    quiet_warnings()
    torch.set_num_threads(1)
    if args.quick:
        args.steps, args.width, args.depth = min(args.steps, 2), 4, 1
    source = learning_kit.load_data() if args.digits else flagship.load_fashion(args.data, limit=2000 if args.quick else None)
    data = learning_kit.validation_data(source)
    labels = 50 if args.quick else DIGITS_LABELS if args.digits else LABELS
    if args.raw:
        entry = {"raw_probe": probe(None, data, labels, args.label_seeds, args.probe_C)}
    elif args.gabor:
        from fedssl.evaluation.handcrafted import GaborBank

        entry = {"gabor_probe": {str(grid): probe(GaborBank(channels=data.train_x.shape[1], grid=grid), data, labels,
                                                  args.label_seeds, args.probe_C) for grid in args.gabor}}
    else:
        entry = screen(args, data, labels)
    entry.update(data="digits" if args.digits else "fashion-mnist", labels=labels, label_seeds=args.label_seeds,
                 probe_C=args.probe_C, device=str(device),
                 command=command_line())
    previous = results_dir(args.quick) / f"{NAME}.json"
    runs = json.loads(previous.read_text())["runs"] if previous.exists() else []
    path = write_result(NAME, {"machine": machine_info(), "runs": runs + [entry]}, args.quick)
    print(json.dumps(entry))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
