"""Byte-level tokenizer and text source reader (torch-free).

Why bytes: a vocabulary (BPE, WordPiece) trained on private text is itself a release -- its merges
and entries reveal frequent strings of the corpus (names, account formats) and would leave the
site outside any DP accounting. UTF-8 bytes need no training, no download and reveal nothing.

Ids: ``PAD=0``, ``MASK=1``, ``CLS=2`` (prepended, the sequence's start), then byte ``b`` is
``b + 3``; :data:`VOCAB_SIZE` = 259. Length rule: ``[CLS] + bytes`` truncated to ``max_length``
ids (bytes past the limit dropped, even mid-character), then padded with PAD to ``max_length``.

A text source is a ``.txt`` file (one sample per non-empty line) or a folder of ``.txt`` files
(one document per file, sorted by name).
"""

from __future__ import annotations

from pathlib import Path

from fedssl.inputs import CLS, MASK, PAD, SPECIALS, VOCAB_SIZE  # noqa: F401 - re-exported; the models share the ids

def encode(text: str, max_length: int) -> list[int]:
    """Token ids of ``text``: CLS + UTF-8 bytes, truncated then padded to ``max_length``."""
    if max_length < 2:
        raise ValueError(f"data.max_length must be at least 2 (CLS and one byte), got {max_length}")
    ids = [CLS] + [b + SPECIALS for b in text.encode("utf-8")]
    ids = ids[:max_length]
    return ids + [PAD] * (max_length - len(ids))


def decode(ids: list[int]) -> str:
    """The text of ``ids`` (special tokens dropped; a truncated character becomes U+FFFD)."""
    return bytes(i - SPECIALS for i in ids if i >= SPECIALS).decode("utf-8", errors="replace")


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start}); a text source holds .txt files of UTF-8 text") from None


def is_text_source(path: Path) -> bool:
    """A ``.txt`` file, or a folder holding ``.txt`` files and no images (a folder of images stays an image folder)."""
    path = Path(path)
    if path.is_file():
        return path.suffix == ".txt"
    if not path.is_dir():
        return False
    suffixes = {p.suffix.lower() for p in path.iterdir() if p.is_file()}
    return ".txt" in suffixes and not suffixes & {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm", ".ppm"}


def read_texts(path: Path) -> list[str]:
    """The samples of a text source: a file's non-empty lines, or a folder's .txt documents."""
    path = Path(path)
    if path.is_dir():
        texts = [_read(p) for p in sorted(path.glob("*.txt"))]
    else:
        texts = [line for line in _read(path).splitlines() if line.strip()]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"{path}: no text samples (empty file or folder); give one sample per line or one .txt per document")
    return texts


def encode_all(texts: list[str], max_length: int) -> list[list[int]]:
    return [encode(t, max_length) for t in texts]
