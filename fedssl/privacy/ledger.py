"""Append-only, hash-chained, Ed25519-signed privacy ledgers.

A site's ``<state_dir>/ledger.jsonl`` holds one JSON record per line::

    {"seq", "prev_hash", "time", "kind", "body", "hash", "signer", "sig"}

``hash`` is SHA-256 over the canonical JSON (sorted keys, no spaces) of
``{seq, prev_hash, time, kind, body}``; ``prev_hash`` is the previous record's hash
(64 zeros for the first); ``sig`` is Ed25519 over the hash, by the key whose fingerprint
is ``signer``. The first record (``site_init``) carries the public key, so a ledger
verifies on its own (trust on first use) or against a key registered elsewhere.

What each check catches:
- an edited record: its hash (or, if the hash was recomputed, its signature) fails;
- a deleted or reordered record: the ``seq`` run and the hash chain break;
- a record added by someone else: foreign signer / bad signature;
- a whole ledger re-signed by another key: only against a trusted key (``--trusted-keys``);
- records cut off the end: ``ledger.head`` (signed seq + hash of the last record) says
  more records existed. A rollback of *both* files to an older consistent state is
  invisible locally; it shows up only against an external record — the server's
  ``server_ledger.jsonl`` carries each site's reported ε and ledger ``seq`` per round.
- a crash mid-write leaves a partial last line, reported as a "torn write" without
  hiding the records before it. The next append seals it off with a ``recovery`` record.

Records are durable before ``append`` returns (flush + fsync), which is what makes the
ledger write-ahead: a site records the DP steps it is about to take *before* training
and sending, so a crash can only over-count ε.

The pure part (canonical form, hashing, :func:`verify_chain`) is separate from the
classes that own files (:class:`Ledger` for a site, :class:`ServerLedger` for the server).
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, ClassVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedssl.errors import PrivacyError
from fedssl.privacy.keys import (
    init_site_key,
    load_signing_key,
    private_key_path,
    public_key_b64,
    public_key_fingerprint,
    public_key_from_b64,
)

log = logging.getLogger(__name__)

LEDGER_FILE = "ledger.jsonl"
SERVER_LEDGER_FILE = "server_ledger.jsonl"
HEAD_SUFFIX = ".head"
GENESIS_HASH = "0" * 64
# When a site configures no key path, its key lives in the state dir (simulation). That
# protects against corruption and edits by anyone who cannot read the state dir; for a
# deployment create the key elsewhere with `fedssl keys init-site` and register the .pub.
DEFAULT_SITE_KEY = "site"

# Domain separation: a record signature can never be replayed as a head signature.
_RECORD_CONTEXT = b"fedssl-ledger-record-v1\x00"
_HEAD_CONTEXT = b"fedssl-ledger-head-v1\x00"
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

# ---------------------------------------------------------------- record schemas

_NUM = (int, float)
_OPT_NUM = (int, float, type(None))
_OPT_STR = (str, type(None))
Schema = Mapping[str, Mapping[str, tuple[type, ...]]]

# Required body fields per kind; extra fields are allowed (and hashed like the rest).
SITE_SCHEMA: Schema = {
    "site_init": {"site_id": (str,), "public_key": (str,), "fingerprint": (str,)},
    "budget": {
        "target_epsilon": _NUM,
        "delta": _NUM,
        "noise_multiplier": _NUM,
        "planned_steps": (int,),
        "sample_rate": _NUM,
        "max_grad_norm": _NUM,
        "accountant": (str,),
    },
    "dp_event": {
        "run_id": (str,),
        "round": (int,),
        "steps": (int,),
        "sample_rate": _NUM,
        "noise_multiplier": _NUM,
        "max_grad_norm": _NUM,
        "delta": _NUM,
        "accountant": (str,),
        "epsilon_after": _NUM,
        "target_epsilon": _NUM,
        "status": (str,),
    },
    "refusal": {"run_id": (str,), "round": (int,), "reason": (str,), "epsilon_spent": _NUM, "target_epsilon": _NUM},
    "recovery": {"reason": (str,)},
}
SERVER_SCHEMA: Schema = {
    "server_init": {"public_key": _OPT_STR, "fingerprint": _OPT_STR},
    "round_report": {
        "round": (int,),
        "node_id": (int, str),
        "site_id": (int, str),
        "epsilon": _OPT_NUM,
        "ledger_seq": (int,),
        "status": (str,),
        "aggregation": (str,),
    },
}


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


# ---------------------------------------------------------------- canonical form, hashing

def canonical_json(obj: Any) -> str:
    """The byte-exact form that is hashed: floats as Python's shortest round-trip repr."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def record_hash(record: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json({k: record[k] for k in _HASHED_FIELDS}).encode()).hexdigest()


def _head_message(seq: int, digest: str) -> bytes:
    return _HEAD_CONTEXT + f"{seq}:{digest}".encode()


def _verify_sig(key: Ed25519PublicKey, sig_b64: Any, message: bytes) -> bool:
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
    "signer": _OPT_STR,
    "sig": _OPT_STR,
}


def _has_type(record: Mapping[str, Any], name: str, types: tuple[type, ...]) -> bool:
    value = record.get(name, _MISSING)
    return value is not _MISSING and not isinstance(value, bool) and isinstance(value, types)


_MISSING = object()


def _parse_line(raw: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(raw)
    except ValueError:  # includes UnicodeDecodeError
        return None
    return value if isinstance(value, dict) else None


def _split_lines(data: bytes) -> tuple[list[bytes], bool]:
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
    lines, terminated = _split_lines(data)
    parsed = [(number, raw, _parse_line(raw)) for number, raw in enumerate(lines, start=1)]
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
            elif not _verify_sig(key, rec["sig"], _RECORD_CONTEXT + rec["hash"].encode()):
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
    if key is not None and not _verify_sig(key, head.get("sig"), _head_message(seq, digest)):
        report.add(BAD_HEAD, 0, "head signature does not verify")
    last_seq = max((rec["seq"] for _, rec in valid), default=-1)
    by_seq = {rec["seq"]: rec for _, rec in valid}
    if seq > last_seq:
        report.add(TRUNCATED, 0, f"head records seq {seq} but the ledger ends at seq {last_seq}: records were cut off the end", seq)
    elif seq not in by_seq or by_seq[seq]["hash"] != digest:
        report.add(HEAD_MISMATCH, 0, f"record seq {seq} differs from the one the head was signed over", seq)
    elif seq < last_seq:
        report.notes.append(f"head lags the ledger by {last_seq - seq} record(s) (crash between append and head update; harmless)")


# ---------------------------------------------------------------- the file-owning classes

class ChainedLog:
    """A hash-chained JSONL file plus its signed head; subclasses fix the schema and the first record."""

    schema: ClassVar[Schema]
    init_kind: ClassVar[str]
    requires_key: ClassVar[bool]

    def __init__(self, path: Path, signing_key: Ed25519PrivateKey | None) -> None:
        self.path = Path(path)
        self.head_path = self.path.with_suffix(HEAD_SUFFIX)
        self._key = signing_key

    def _init_body(self) -> dict[str, Any]:
        key = self._key.public_key() if self._key is not None else None
        return {
            "public_key": public_key_b64(key) if key is not None else None,
            "fingerprint": public_key_fingerprint(key) if key is not None else None,
        }

    # -- reading

    def records(self) -> list[dict[str, Any]]:
        """Every parseable record in file order, unverified: call :meth:`verify` before trusting them."""
        if not self.path.exists():
            return []
        lines, _ = _split_lines(self.path.read_bytes())
        return [r for r in map(_parse_line, lines) if r is not None]

    def read_head(self) -> dict[str, Any] | None:
        try:
            head = json.loads(self.head_path.read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # present but unreadable: verification reports it as malformed
        return head if isinstance(head, dict) else {}

    def verify(self, trusted_public_key: Ed25519PublicKey | None = None) -> VerifyReport:
        if not self.path.exists():
            report = VerifyReport(path=self.path)
            report.add(MISSING_LEDGER, 1, f"{self.path} does not exist")
            return report
        return verify_chain(
            self.path.read_bytes(),
            schema=self.schema,
            init_kind=self.init_kind,
            head=self.read_head(),
            trusted_key=trusted_public_key,
            path=self.path,
        )

    # -- writing

    def append(self, kind: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """Durably append one record (on disk and fsynced when this returns); return it."""
        if self.requires_key and self._key is None:
            raise PrivacyError(f"{self.path}: opened read-only (no signing key); cannot append")
        body = dict(body)
        if kind == self.init_kind:
            raise PrivacyError(f"{self.path}: {kind} is written automatically as the first record")
        if (problem := body_problem(kind, body, self.schema)) is not None:
            raise PrivacyError(f"{self.path}: refusing to write an invalid record: {problem}")
        with self._locked() as handle:
            last = self._ready_tail(handle)
            return self._append_locked(handle, kind, body, last)

    @contextmanager
    def _locked(self) -> Iterator[IO[bytes]]:
        """Exclusive lock: two processes of one site must not interleave records."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        with open(self.path, "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                if created:
                    _fsync_dir(self.path.parent)  # the new file's directory entry must survive a crash too
                yield handle
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _ready_tail(self, handle: IO[bytes]) -> dict[str, Any]:
        """The last record to chain onto, after sealing off a torn line and writing the init record."""
        handle.seek(0)
        data = handle.read()
        lines, terminated = _split_lines(data)
        torn: bytes | None = None
        if not terminated:
            # A crash mid-append left an unterminated line. Complete it if it is a whole
            # record, else seal it off; either way nothing already written is removed.
            _durable_write(handle, b"\n")
            if _parse_line(lines[-1]) is None:
                torn = lines.pop()
        last = next((r for r in map(_parse_line, reversed(lines)) if r is not None), None)
        if last is not None and not (isinstance(last.get("seq"), int) and isinstance(last.get("hash"), str)):
            raise PrivacyError(f"{self.path}: the last record is malformed; run `fedssl audit` on it before writing more")
        head = self.read_head()
        last_seq = last["seq"] if last else -1
        if head and isinstance(head.get("seq"), int) and head["seq"] > last_seq:
            raise PrivacyError(f"{self.path}: {self.head_path.name} says records after seq {last_seq} existed; the ledger was truncated")
        if last is None:
            last = self._append_locked(handle, self.init_kind, self._init_body(), None)
        if torn is not None:
            log.warning("%s: sealed off a torn write of %d bytes", self.path, len(torn))
            body = {
                "reason": "torn write: a crash interrupted an append; the partial line is not a record",
                "torn_sha256": hashlib.sha256(torn).hexdigest(),
                "torn_bytes": len(torn),
            }
            last = self._append_locked(handle, "recovery", body, last)
        return last

    def _append_locked(self, handle: IO[bytes], kind: str, body: dict[str, Any], last: dict[str, Any] | None) -> dict[str, Any]:
        record: dict[str, Any] = {
            "seq": last["seq"] + 1 if last else 0,
            "prev_hash": last["hash"] if last else GENESIS_HASH,
            "time": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
            "kind": kind,
            "body": body,
        }
        record["hash"] = record_hash(record)
        record["signer"], record["sig"] = self._sign(_RECORD_CONTEXT + record["hash"].encode())
        _durable_write(handle, canonical_json(record).encode() + b"\n")
        self._write_head(record)
        return record

    def _sign(self, message: bytes) -> tuple[str | None, str | None]:
        if self._key is None:
            return None, None
        signature = base64.b64encode(self._key.sign(message)).decode("ascii")
        return public_key_fingerprint(self._key.public_key()), signature

    def _write_head(self, record: Mapping[str, Any]) -> None:
        signer, sig = self._sign(_head_message(record["seq"], record["hash"]))
        head = {"seq": record["seq"], "hash": record["hash"], "signer": signer, "sig": sig}
        tmp = self.head_path.with_name(f".{self.head_path.name}.tmp")
        with open(tmp, "w") as handle:
            handle.write(canonical_json(head))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.head_path)
        _fsync_dir(self.head_path.parent)


def _durable_write(handle: IO[bytes], data: bytes) -> None:
    handle.write(data)
    handle.flush()
    os.fsync(handle.fileno())


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Ledger(ChainedLog):
    """A site's privacy ledger: ``<state_dir>/ledger.jsonl`` and ``ledger.head``."""

    schema = SITE_SCHEMA
    init_kind = "site_init"
    requires_key = True

    def __init__(self, state_dir: Path, signing_key: Ed25519PrivateKey | None = None, *, site_id: str | None = None) -> None:
        super().__init__(Path(state_dir) / LEDGER_FILE, signing_key)
        self.state_dir = Path(state_dir)
        self.site_id = site_id or self.state_dir.name

    def _init_body(self) -> dict[str, Any]:
        return {"site_id": self.site_id, **super()._init_body()}

    @classmethod
    def open(cls, state_dir: Path, *, key_path: Path | None = None, site_id: str | None = None) -> Ledger:
        """Open a site's ledger for writing; refuse if it does not verify against the site's key.

        Without ``key_path`` the key is ``<state_dir>/site.ed25519``, created on first use.
        A torn last line is sealed off with a ``recovery`` record; any other problem
        (edit, gap, foreign signer, truncation) stops the site until someone audits it.
        """
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        key = _site_signing_key(state_dir, key_path)
        ledger = cls(state_dir, key, site_id=site_id)
        if ledger.path.exists() and ledger.path.stat().st_size > 0:  # empty: a crash right after creating it
            report = ledger.verify(trusted_public_key=key.public_key())
            blocking = [p for p in report.problems if p.kind != TORN_WRITE]
            if blocking:
                raise PrivacyError(
                    f"{ledger.path}: {blocking[0]} ({len(blocking)} problem(s)); refusing to train on an untrustworthy "
                    f"privacy record. Run `fedssl audit {state_dir}`"
                )
            recorded_id = report.records[0]["body"]["site_id"] if report.records else None
            if recorded_id is not None and site_id is not None and recorded_id != site_id:
                raise PrivacyError(f"{ledger.path}: this ledger belongs to site {recorded_id!r}, not {site_id!r}; check site.state_dir")
            ledger.site_id = recorded_id or ledger.site_id
        with ledger._locked() as handle:
            last = ledger._ready_tail(handle)
            head = ledger.read_head()
            if not head or head.get("seq", -1) < last["seq"]:
                ledger._write_head(last)  # a crash between append and head update left it behind
        return ledger


def _site_signing_key(state_dir: Path, key_path: Path | None) -> Ed25519PrivateKey:
    if key_path is not None:
        return load_signing_key(key_path)
    default = private_key_path(state_dir, DEFAULT_SITE_KEY)
    if not default.exists():
        init_site_key(state_dir, DEFAULT_SITE_KEY)
        log.info("%s: created a ledger signing key next to the ledger (no key path configured)", default)
    return load_signing_key(default)


class ServerLedger(ChainedLog):
    """The server's record of what each site reported per round: ``<run_dir>/server_ledger.jsonl``.

    Signed when the server has a key; otherwise chained but unsigned, which still catches
    accidental damage and gives the audit each site's reported ε and ledger seq per round.
    """

    schema = SERVER_SCHEMA
    init_kind = "server_init"
    requires_key = False

    def __init__(self, run_dir: Path, signing_key: Ed25519PrivateKey | None = None) -> None:
        super().__init__(Path(run_dir) / SERVER_LEDGER_FILE, signing_key)
