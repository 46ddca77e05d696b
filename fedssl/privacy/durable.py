"""Durable, atomic replacement of a small privacy-state file.

A torn or lost write of the accountant or the high-water mark must never read as a smaller spend:
write a temp file in the same directory, fsync it, rename it over the old one, fsync the directory.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def replace_durably(path: Path, text: str | bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
