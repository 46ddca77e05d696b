"""One flagship table from runs that split the ε grid between them (run side by side, one core each).

Each table run (flagship.py) recomputes the control rows (raw pixels, random init, the public warm start)
for its seeds; they are deterministic, so runs of one setup agree on them exactly, and the merge refuses
runs that do not (a different setup, code or data would show there first). The merged file holds every
row once, its summary, paired gains and targets recomputed from the per-seed results, and the table and
the ε plot rendered as for a single run.

    python benchmarks/flagship_merge.py results/flagship_table_readout4.json \\
        results/flagship_table_readout4_eps12.json results/flagship_table_readout4_eps4.json --suffix _readout4_curve
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, write_result  # noqa: E402

import flagship  # noqa: E402
from learning_kit import Setup, row_epsilon, summarise  # noqa: E402

# What may differ between runs that split one table: the ε grid they were given.
SPLIT_FIELDS = ("epsilons", "rand_epsilons")
SAME_RECORD_FIELDS = ("quick", "budgets", "pool", "readout_grid", "start")


class MergeError(ValueError):
    """Runs that are not parts of one table; the message names the file and the field."""


def merge_records(records: dict[Path, dict]) -> dict:
    """The merged record: the first run's setup with the union of the ε grids, every row once."""
    first_path, first = next(iter(records.items()))
    same_setup = {k: v for k, v in first["setup"].items() if k not in SPLIT_FIELDS}
    per_seed: dict[str, dict[str, dict]] = {}
    owner: dict[str, Path] = {}
    for path, record in records.items():
        for field in SAME_RECORD_FIELDS:
            if record.get(field) != first.get(field):
                raise MergeError(f"{path}: {field} is {record.get(field)!r}, {first_path.name} has {first.get(field)!r}; "
                                 "merge runs of one setup only")
        for field, value in same_setup.items():
            if record["setup"].get(field) != value:
                raise MergeError(f"{path}: setup.{field} is {record['setup'].get(field)!r}, {first_path.name} has "
                                 f"{value!r}; merge runs of one setup only")
        for row, seeds in record["per_seed"].items():
            if row in per_seed and per_seed[row] != seeds:
                raise MergeError(f"{path}: row {row!r} differs from the one in {owner[row].name} (the control rows of one "
                                 "setup are deterministic: different code, data or seeds?); rerun one of them")
            per_seed.setdefault(row, seeds)
            owner.setdefault(row, path)
    # the controls first, then the federations by ε, as a single run of the whole grid orders them
    per_seed = dict(sorted(per_seed.items(), key=lambda item: (item[0].startswith("fed-"),
                                                              row_epsilon(item[0]) if item[0].startswith("fed-") else 0)))
    epsilons = sorted({row_epsilon(r) for r in per_seed if r.startswith("fed-")})
    setup = {**first["setup"], "epsilons": epsilons}
    budgets = tuple(first["budgets"])
    # the targets' label fractions, as the table run computed them from its budgets and pool
    scored = Setup(**{k: v for k, v in setup.items() if k in {f.name for f in dataclasses.fields(Setup)}})
    scored = flagship.with_budgets(scored, first["pool"], budgets)
    start = first.get("start", "random")
    return {
        "quick": bool(first.get("quick")), "setup": setup, "budgets": list(budgets),
        "readout_grid": first.get("readout_grid"), "pool": first["pool"], "start": start,
        "per_seed": per_seed, "summary": summarise(per_seed),
        "targets": flagship.targets(per_seed, scored, budgets, flagship.STARTS[start]),
        "federation_seconds": {k: v for r in records.values() for k, v in r.get("federation_seconds", {}).items()},
        "seconds": sum(r.get("seconds", 0.0) for r in records.values()),
        "seeds_done": min(r.get("seeds_done", 0) for r in records.values()),
        "merged_from": [{"file": p.name, "command": r.get("command"), "seconds": r.get("seconds"),
                         "git_commit": r.get("machine", {}).get("git_commit"),
                         "date_utc": r.get("machine", {}).get("date_utc")} for p, r in records.items()],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+", help="flagship_table*.json files of one setup")
    parser.add_argument("--suffix", required=True, help="the merged file is flagship_table<suffix>.json")
    args = parser.parse_args(argv)
    if not all(c.isalnum() or c in "_-" for c in args.suffix):
        parser.error(f"--suffix {args.suffix!r}: letters, digits, _ and - only (it becomes part of a file name)")
    if len(set(args.results)) < 2:
        parser.error("give two or more different result files")
    try:
        merged = merge_records({path: flagship.load_table(path) for path in args.results})
    except (flagship.TableFileError, MergeError) as err:
        print(f"flagship_merge: {err}")
        return 2
    # seconds summed over runs that ran side by side: the compute, not the wall time (merged_from has each)
    record = {"machine": machine_info(), **merged}
    path = write_result(f"flagship_table{args.suffix}", record, quick=merged["quick"])
    print(flagship.write_renderings(record, path))
    print(f"flagship_merge: wrote {path} from {len(args.results)} runs; ε grid "
          + ", ".join("∞" if math.isinf(e) else f"{e:g}" for e in merged["setup"]["epsilons"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
