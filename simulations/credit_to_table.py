"""Turn modeldata's credit_data (Debian: apt-get install r-cran-modeldata) into a CSV source and its labels.

    pip install '.[convert]'                      # rdata: reads R's serialization (conversion only)
    python simulations/credit_to_table.py data/credit    # credit_data: 4,454 loan applicants

Writes ``OUT/credit.csv`` (``id``, the numeric and the categorical columns; no label column: sites
train on it) and ``OUT/labels.csv`` (``id,label``: 1 where the loan went bad, 0 where it was repaid),
for the consented evaluation only. Categorical columns are written as their R levels, empty where R
has NA; ``configs/experiments/credit-vime.yaml`` declares their values (the public schema), so the
sites' encoding names no value seen only in private rows.

Numeric columns are written as log(1 + x): amounts span 0 to 300,000 and an MLP trained under DP
clipping learns little from raw ones. The transform is fixed and per value, so it needs no statistics
of anyone's rows (standardising with the data's mean would be a release). Empty stays empty: the
loader imputes it and counts it.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import lzma
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

MODELDATA = Path("/usr/lib/R/site-library/modeldata/data")
CREDIT = {"name": "credit_data", "label": "Status", "positive": "bad"}


def _cell(value: object, numeric: bool) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if numeric:
        return f"{math.log1p(float(value)):.6g}"
    return str(value)


def write_table(columns: Mapping[str, Sequence[object]], numeric: Iterable[str], out: Path, label: str,
                positive: str, stem: str = "credit") -> int:
    """``columns`` (name -> values, the label column among them) as ``OUT/<stem>.csv`` + ``OUT/labels.csv``."""
    numeric = set(numeric)
    features = [name for name in columns if name != label]
    count = len(columns[label])
    out.mkdir(parents=True, exist_ok=True)
    with (out / f"{stem}.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", *features])
        for i in range(count):
            writer.writerow([f"row-{i}", *(_cell(columns[name][i], name in numeric) for name in features)])
    with (out / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "label"])
        writer.writerows((f"row-{i}", int(str(columns[label][i]) == positive)) for i in range(count))
    return count


def read_lazyload(db: Path, name: str) -> tuple[dict[str, list[object]], list[str]]:
    """(columns, numeric column names) of data frame ``name`` in R's lazy-load database ``db`` (.rdx/.rdb).

    Debian ships an R package's data sets this way: the .rdx (gzip) indexes each object's offset and
    length in the .rdb, where each object is a 4-byte length, a compression type ('Z': raw LZMA2,
    R's serialize.c) and R's serialization, which the rdata package parses."""
    try:
        import pandas
        import rdata
    except ImportError:
        raise SystemExit("the conversion needs the rdata package: pip install '.[convert]'") from None
    index_file, data_file = db.with_suffix(".rdx"), db.with_suffix(".rdb")
    if not index_file.is_file() or not data_file.is_file():
        raise SystemExit(f"{index_file} does not exist; apt-get install -y r-cran-modeldata")
    index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress(index_file.read_bytes())))
    offset, length = (int(v) for v in index["variables"][name])
    with data_file.open("rb") as handle:
        handle.seek(offset)
        blob = handle.read(length)
    if blob[4:5] != b"Z":
        raise SystemExit(f"{data_file}: {name} is stored with compression {blob[4:5]!r}, not R's xz; convert it in R")
    raw = lzma.decompress(blob[5:], format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "dict_size": 64 << 20}])
    frame = rdata.conversion.convert(rdata.parser.parse_data(raw))
    numeric = [c for c in frame.columns if frame[c].dtype.kind in "biuf" or str(frame[c].dtype).startswith("Int")]
    columns = {c: [None if pandas.isna(v) else v for v in frame[c].tolist()] for c in frame.columns}
    return columns, numeric


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--db", type=Path, default=MODELDATA / "Rdata", help="R lazy-load database (.rdx/.rdb) without suffix")
    args = parser.parse_args()
    columns, numeric = read_lazyload(args.db, CREDIT["name"])
    count = write_table(columns, numeric, args.out, CREDIT["label"], CREDIT["positive"])
    print(f"{count} rows -> {args.out / 'credit.csv'}, labels -> {args.out / 'labels.csv'}")


if __name__ == "__main__":
    main()
