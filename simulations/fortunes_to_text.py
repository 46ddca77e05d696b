"""Turn Debian's fortunes (apt-get install fortunes fortunes-min) into a text source and its labels.

    python simulations/fortunes_to_text.py OUT_DIR [--categories art computers food ...]

Writes ``OUT_DIR/fortunes.txt`` (one fortune a line, whitespace collapsed: the text source, sample
ids ``row-i`` as fedssl.data.loaders names lines) and ``OUT_DIR/labels.csv`` (``id,label``, the
category). The labels are for the evaluation only and must be read through the consent manifest;
sites train on fortunes.txt alone.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

FORTUNES = Path("/usr/share/games/fortunes")
CATEGORIES = ("art", "computers", "food", "literature", "love", "science", "sports")


def read_fortunes(path: Path) -> list[str]:
    """The ``%``-separated fortunes of one category file, each on one line."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    return [" ".join(chunk.split()) for chunk in text.split("\n%\n") if chunk.strip() and chunk.strip() != "%"]


def convert(source: Path, out: Path, categories: tuple[str, ...] = CATEGORIES) -> int:
    out.mkdir(parents=True, exist_ok=True)
    rows = [(text, name) for name in categories if (source / name).is_file() for text in read_fortunes(source / name)]
    if not rows:
        raise SystemExit(f"no fortunes under {source} for {', '.join(categories)}; apt-get install -y fortunes fortunes-min")
    (out / "fortunes.txt").write_text("".join(text + "\n" for text, _ in rows), encoding="utf-8")
    with (out / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "label"])
        writer.writerows((f"row-{i}", label) for i, (_, label) in enumerate(rows))
    return len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--source", type=Path, default=FORTUNES)
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES))
    args = parser.parse_args()
    print(f"{convert(args.source, args.out, tuple(args.categories))} fortunes -> {args.out}")


if __name__ == "__main__":
    main()
