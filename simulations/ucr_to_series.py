"""Turn a UCR/UEA classification set shipped inside the aeon wheel into a time-series source and its labels.

    pip install --no-deps 'aeon>=1.0'        # or: pip install -e '.[bench]'; only the data files are read
    python simulations/ucr_to_series.py OUT_DIR [--dataset JapaneseVowels]

aeon's wheel ships a few archive sets as ``.ts`` files (``aeon/datasets/data/<NAME>/<NAME>_TRAIN.ts``
and ``_TEST.ts``). They are parsed here, without importing aeon (whose numba stack fedssl must not
need), and written as:

* ``OUT_DIR/<NAME>.npy``: ``N x C x L`` float32, TRAIN then TEST (fedssl makes its own split),
  shorter series NaN-padded at the end (the archive's convention, which ``data.kind: timeseries``
  reads as a shorter series), each channel standardised to zero mean and unit variance over the
  whole (public) set so the augmentations' strengths mean the same on every channel;
* ``OUT_DIR/labels.csv``: ``id,label`` with ``row-i`` ids (as fedssl.data.loaders names array rows)
  and the archive's class label, for the consented evaluation only (sites train on the .npy alone).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
from pathlib import Path

import numpy as np

DEFAULT_DATASET = "JapaneseVowels"


def aeon_data_dir() -> Path:
    """aeon's bundled data folder, found without importing aeon (find_spec does not run its __init__)."""
    spec = importlib.util.find_spec("aeon")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("aeon is not installed; pip install --no-deps aeon (only its data files are read)")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"


def read_ts(path: Path) -> tuple[list[list[list[float]]], list[str]]:
    """A .ts file's series (per case: channels of values, '?' or NaN missing) and class labels."""
    cases, labels, in_data = [], [], False
    for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not in_data:
            in_data = line.lower() == "@data"
            continue
        *channels, label = line.split(":")
        cases.append([[float("nan") if v in ("?", "NaN", "nan") else float(v) for v in c.split(",")] for c in channels])
        labels.append(label.strip())
    if not cases:
        raise SystemExit(f"{path}: no @data cases; is it a .ts classification file?")
    return cases, labels


def to_array(cases: list[list[list[float]]]) -> np.ndarray:
    """N x C x L_max, NaN after each channel's end; per-channel standardised over the finite values."""
    channels = {len(case) for case in cases}
    if len(channels) != 1:
        raise SystemExit(f"cases have different channel counts {sorted(channels)}; not a classification set")
    length = max(len(c) for case in cases for c in case)
    array = np.full((len(cases), channels.pop(), length), np.nan, dtype=np.float64)
    for i, case in enumerate(cases):
        for j, values in enumerate(case):
            array[i, j, : len(values)] = values
    mean = np.nanmean(array, axis=(0, 2), keepdims=True)
    std = np.nanstd(array, axis=(0, 2), keepdims=True)
    return ((array - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)


def convert(data_dir: Path, out: Path, dataset: str = DEFAULT_DATASET) -> tuple[int, tuple[int, ...]]:
    folder = data_dir / dataset
    splits = [folder / f"{dataset}_{split}.ts" for split in ("TRAIN", "TEST")]
    if not all(p.is_file() for p in splits):
        shipped = sorted(p.name for p in data_dir.iterdir() if (p / f"{p.name}_TRAIN.ts").is_file()) if data_dir.is_dir() else []
        raise SystemExit(f"no {dataset}_TRAIN.ts / _TEST.ts under {folder}; shipped sets: {', '.join(shipped) or 'none'}")
    cases, labels = [], []
    for path in splits:
        split_cases, split_labels = read_ts(path)
        cases += split_cases
        labels += split_labels
    array = to_array(cases)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / f"{dataset}.npy", array)
    with (out / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "label"])
        writer.writerows((f"row-{i}", label) for i, label in enumerate(labels))
    return len(labels), array.shape[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--dataset", default=DEFAULT_DATASET)
    parser.add_argument("--data-dir", type=Path, default=None, help="a folder of <NAME>/<NAME>_TRAIN.ts (default: aeon's)")
    args = parser.parse_args()
    count, shape = convert(args.data_dir or aeon_data_dir(), args.out, args.dataset)
    print(f"{count} series shaped {list(shape)} (channels, longest length) -> {args.out / (args.dataset + '.npy')}, "
          f"{args.out / 'labels.csv'}")


if __name__ == "__main__":
    main()
