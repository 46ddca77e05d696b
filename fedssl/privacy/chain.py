"""Hash-chained, signed logs: the pure part (canonical form, hashing, signatures, verification).

A ledger file holds one JSON record per line::

    {"seq", "prev_hash", "time", "kind", "body", "hash", "signer", "sig"}

``hash`` is SHA-256 over the canonical JSON (sorted keys, no spaces) of
``{seq, prev_hash, time, kind, body}``; ``prev_hash`` is the previous record's hash
(64 zeros for the first); ``sig`` is Ed25519 over the hash, by the key whose fingerprint
is ``signer``. :func:`verify_chain` checks a file's bytes and reports every problem;
fedssl.privacy.ledger owns the files (appending, locking, heads).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedssl.privacy.keys import public_key_b64, public_key_fingerprint, public_key_from_b64
from fedssl.privacy.records import OPT_STR, Schema

GENESIS_HASH = "0" * 64

# Domain separation: a record signature can never be replayed as a head signature.
RECORD_CONTEXT = b"fedssl-ledger-record-v1\x00"
HEAD_CONTEXT = b"fedssl-ledger-head-v1\x00"
_HASHED_FIELDS = ("seq", "prev_hash", "time", "kind", "body")

# Problem kinds reported by verification.
MISSING_LEDGER = "missing_ledger"
CORRUPT_LINE = "corrupt_line"
TORN_WRITE = "torn_write"
BAD_RECORD = "bad_record"
MISSING_INIT = "missing_init"
BAD_HASH = "bad_hash"
BROKEN_CHAIN = "broken_chain"
BAD_SIGNATURE = "bad_signature"
FOREIGN_SIGNER = "foreign_signer"
UNTRUSTED_KEY = "untrusted_key"
SEQ_GAP = "seq_gap"
SEQ_REORDER = "seq_reorder"
TRUNCATED = "truncated"
HEAD_MISMATCH = "head_mismatch"
BAD_HEAD = "bad_head"
HEAD_MISSING = "head_missing"

# Trust levels of a verification.
TRUSTED_KEY = "trusted-key"
TRUST_ON_FIRST_USE = "trust-on-first-use"
UNSIGNED = "unsigned"


def body_problem(kind: str, body: Any, schema: Schema) -> str | None:
    """Why ``body`` is not a valid ``kind`` record, or None."""
    if kind not in schema:
        return f"unknown record kind {kind!r} (expected one of {', '.join(schema)})"
    if not isinstance(body, dict):
        return f"{kind} body must be an object"
    for name, types in schema[kind].items():
        if name not in body:
            return f"{kind} body lacks {name!r}"
        value = body[name]
        # bool is an int subclass; a True where a step count belongs is a bug, not a number.
        if isinstance(value, bool) or not isinstance(value, types):
            return f"{kind}.{name} has type {type(value).__name__}"
    return _non_finite(body, kind)


def _non_finite(value: Any, where: str) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where} is {value}; JSON cannot hold it (use null for 'no value')"
    if isinstance(value, dict):
        return next((p for k, v in value.items() if (p := _non_finite(v, f"{where}.{k}"))), None)
    if isinstance(value, list):
        return next((p for i, v in enumerate(value) if (p := _non_finite(v, f"{where}[{i}]"))), None)
    return None



def canonical_json(obj: Any) -> str:
    """The byte-exact form that is hashed: floats as Python's shortest round-trip repr."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def record_hash(record: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json({k: record[k] for k in _HASHED_FIELDS}).encode()).hexdigest()


def head_message(seq: int, digest: str) -> bytes:
    return HEAD_CONTEXT + f"{seq}:{digest}".encode()


def verify_sig(key: Ed25519PublicKey, sig_b64: Any, message: bytes) -> bool:
    if not isinstance(sig_b64, str):
        return False
    try:
        key.verify(base64.b64decode(sig_b64, validate=True), message)
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


# ---------------------------------------------------------------- verification (pure)

@dataclass(frozen=True)
class Problem:
    kind: str
    line: int  # 1-based line in the file; 0 for the head file
    detail: str
    seq: int | None = None

    def __str__(self) -> str:
        where = "head" if self.line == 0 else f"line {self.line}"
        return f"{where}: {self.kind}: {self.detail}"


@dataclass
class VerifyReport:
    path: Path | None
    records: list[dict[str, Any]] = field(default_factory=list)  # every parseable record, file order
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    trust: str = TRUST_ON_FIRST_USE
    fingerprint: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def kinds(self) -> set[str]:
        return {p.kind for p in self.problems}

    def add(self, kind: str, line: int, detail: str, seq: int | None = None) -> None:
        self.problems.append(Problem(kind, line, detail, seq))


_RECORD_FIELDS: dict[str, tuple[type, ...]] = {
    "seq": (int,),
    "prev_hash": (str,),
    "time": (str,),
    "kind": (str,),
    "body": (dict,),
    "hash": (str,),
    "signer": OPT_STR,
    "sig": OPT_STR,
}


def _has_type(record: Mapping[str, Any], name: str, types: tuple[type, ...]) -> bool:
    value = record.get(name, _MISSING)
    return value is not _MISSING and not isinstance(value, bool) and isinstance(value, types)


_MISSING = object()


def parse_line(raw: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(raw)
    except ValueError:  # includes UnicodeDecodeError
        return None
    return value if isinstance(value, dict) else None


def split_lines(data: bytes) -> tuple[list[bytes], bool]:
    """The file's lines and whether the last one is newline-terminated."""
    parts = data.split(b"\n")
    if parts[-1] == b"":
        return parts[:-1], True
    return parts, False


def verify_chain(
    data: bytes,
    *,
    schema: Schema,
    init_kind: str,
    head: Mapping[str, Any] | None,
    trusted_key: Ed25519PublicKey | None = None,
    path: Path | None = None,
) -> VerifyReport:
    """Check every line of a ledger file's bytes; collect all problems, never stop at the first."""
    report = VerifyReport(path=path)
    lines, terminated = split_lines(data)
    parsed = [(number, raw, parse_line(raw)) for number, raw in enumerate(lines, start=1)]
    acknowledged = {
        r["body"].get("torn_sha256")
        for _, _, r in parsed
        if r is not None and r.get("kind") == "recovery" and isinstance(r.get("body"), dict)
    }
    valid: list[tuple[int, dict[str, Any]]] = []
    for number, raw, record in parsed:
        if record is None:
            if number == len(lines) and not terminated:
                report.add(TORN_WRITE, number, f"{len(raw)} bytes of an unfinished record (crash mid-write); earlier records are intact")
            elif hashlib.sha256(raw).hexdigest() in acknowledged:
                report.notes.append(f"line {number}: torn write sealed off by a later recovery record")
            else:
                report.add(CORRUPT_LINE, number, "not a JSON record")
            continue
        report.records.append(record)
        wrong = next((k for k, types in _RECORD_FIELDS.items() if not _has_type(record, k, types)), None)
        if wrong is not None:
            report.add(BAD_RECORD, number, f"field {wrong!r} missing or mistyped")
            continue
        valid.append((number, record))

    expected_key = _establish_key(valid, init_kind, trusted_key, report)
    _check_records(valid, schema, init_kind, expected_key, report)
    _check_head(valid, head, expected_key, report)
    return report


def _establish_key(
    valid: list[tuple[int, dict[str, Any]]], init_kind: str, trusted_key: Ed25519PublicKey | None, report: VerifyReport
) -> Ed25519PublicKey | None:
    """The key every record must be signed with: the trusted one, else the one the ledger declares."""
    declared: Ed25519PublicKey | None = None
    if not valid or valid[0][1]["kind"] != init_kind:
        report.add(MISSING_INIT, valid[0][0] if valid else 1, f"the first record is not {init_kind}; the ledger's key is unknown")
    else:
        number, init = valid[0]
        declared_b64 = init["body"].get("public_key")
        if isinstance(declared_b64, str):
            try:
                declared = public_key_from_b64(declared_b64)
            except (binascii.Error, ValueError):
                report.add(BAD_RECORD, number, f"{init_kind}.public_key is not a base64 Ed25519 key")
            if declared is not None and init["body"].get("fingerprint") != public_key_fingerprint(declared):
                report.add(BAD_RECORD, number, f"{init_kind}.fingerprint does not match its public key")
    if trusted_key is not None:
        report.trust = TRUSTED_KEY
        report.fingerprint = public_key_fingerprint(trusted_key)
        if declared is None or public_key_b64(declared) != public_key_b64(trusted_key):
            found = public_key_fingerprint(declared) if declared is not None else "none"
            report.add(UNTRUSTED_KEY, valid[0][0] if valid else 1, f"ledger declares key {found}, the trusted key is {report.fingerprint}")
        return trusted_key
    if declared is None:
        report.trust = UNSIGNED
        return None
    report.trust = TRUST_ON_FIRST_USE
    report.fingerprint = public_key_fingerprint(declared)
    return declared


def _check_records(
    valid: list[tuple[int, dict[str, Any]]],
    schema: Schema,
    init_kind: str,
    key: Ed25519PublicKey | None,
    report: VerifyReport,
) -> None:
    fingerprint = public_key_fingerprint(key) if key is not None else None
    expected_seq, prev_hash = 0, GENESIS_HASH
    for index, (number, rec) in enumerate(valid):
        seq = rec["seq"]
        if record_hash(rec) != rec["hash"]:
            report.add(BAD_HASH, number, "content does not match its hash (record edited)", seq)
        if key is not None:
            if rec["signer"] != fingerprint:
                report.add(FOREIGN_SIGNER, number, f"signed by {rec['signer']}, expected {fingerprint}", seq)
            elif not verify_sig(key, rec["sig"], RECORD_CONTEXT + rec["hash"].encode()):
                report.add(BAD_SIGNATURE, number, "signature does not verify", seq)
        if seq > expected_seq:
            report.add(SEQ_GAP, number, f"seq {seq} follows seq {expected_seq - 1}: records missing", seq)
        elif seq < expected_seq:
            report.add(SEQ_REORDER, number, f"seq {seq} after seq {expected_seq - 1}: records out of order or duplicated", seq)
        if rec["prev_hash"] != prev_hash:
            report.add(BROKEN_CHAIN, number, "prev_hash does not match the preceding record", seq)
        if index > 0 and rec["kind"] == init_kind:
            report.add(BAD_RECORD, number, f"a second {init_kind} record", seq)
        elif (problem := body_problem(rec["kind"], rec["body"], schema)) is not None:
            report.add(BAD_RECORD, number, problem, seq)
        expected_seq, prev_hash = seq + 1, rec["hash"]


def _check_head(
    valid: list[tuple[int, dict[str, Any]]],
    head: Mapping[str, Any] | None,
    key: Ed25519PublicKey | None,
    report: VerifyReport,
) -> None:
    if head is None:
        # Only a crash between writing the first record and its head leaves no head.
        if len(valid) > 1:
            report.add(HEAD_MISSING, 0, "the head file is gone: truncation at the end cannot be ruled out")
        return
    seq, digest = head.get("seq"), head.get("hash")
    if not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(digest, str):
        report.add(BAD_HEAD, 0, "head file is malformed")
        return
    if key is not None and not verify_sig(key, head.get("sig"), head_message(seq, digest)):
        report.add(BAD_HEAD, 0, "head signature does not verify")
    last_seq = max((rec["seq"] for _, rec in valid), default=-1)
    by_seq = {rec["seq"]: rec for _, rec in valid}
    if seq > last_seq:
        report.add(TRUNCATED, 0, f"head records seq {seq} but the ledger ends at seq {last_seq}: records were cut off the end", seq)
    elif seq not in by_seq or by_seq[seq]["hash"] != digest:
        report.add(HEAD_MISMATCH, 0, f"record seq {seq} differs from the one the head was signed over", seq)
    elif seq < last_seq:
        report.notes.append(f"head lags the ledger by {last_seq - seq} record(s) (crash between append and head update; harmless)")
