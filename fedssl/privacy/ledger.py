"""Append-only, hash-chained, Ed25519-signed privacy ledgers: the files and who may write them.

A site's ``<state_dir>/ledger.jsonl`` (and ``ledger.head``) records its budget and every DP
training event; the server's ledger records what each site reported per round. The record
format and its verification are fedssl.privacy.chain's; the bodies are fedssl.privacy.records'.
The first record (``site_init``) carries the public key, so a ledger verifies on its own (trust
on first use) or against a key registered elsewhere.

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
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, ClassVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedssl.errors import PrivacyError
from fedssl.privacy.chain import (
    GENESIS_HASH,
    MISSING_LEDGER,
    RECORD_CONTEXT,
    TORN_WRITE,
    VerifyReport,
    body_problem,
    canonical_json,
    head_message,
    parse_line,
    record_hash,
    split_lines,
    verify_chain,
)
from fedssl.privacy.keys import init_site_key, load_signing_key, private_key_path, public_key_b64, public_key_fingerprint
from fedssl.privacy.records import ROUND_REPORT, SERVER_INIT, SERVER_SCHEMA, SITE_INIT, SITE_SCHEMA, Schema, bodies

log = logging.getLogger(__name__)

LEDGER_FILE = "ledger.jsonl"  # in a site's state dir
HEAD_SUFFIX = ".head"
# When a site configures no key path, its key lives in the state dir (simulation). That
# protects against corruption and edits by anyone who cannot read the state dir; for a
# deployment create the key elsewhere with `fedssl keys init-site` and register the .pub.
DEFAULT_SITE_KEY = "site"


class ChainedLog:
    """A hash-chained JSONL file plus its signed head; subclasses fix the schema and the first record."""

    schema: ClassVar[Schema]
    init_kind: ClassVar[str]
    requires_key: ClassVar[bool]

    def __init__(self, path: Path, signing_key: Ed25519PrivateKey | None = None) -> None:
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
        lines, _ = split_lines(self.path.read_bytes())
        return [r for r in map(parse_line, lines) if r is not None]

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
        lines, terminated = split_lines(data)
        torn: bytes | None = None
        if not terminated:
            # A crash mid-append left an unterminated line. Complete it if it is a whole
            # record, else seal it off; either way nothing already written is removed.
            _durable_write(handle, b"\n")
            if parse_line(lines[-1]) is None:
                torn = lines.pop()
        last = next((r for r in map(parse_line, reversed(lines)) if r is not None), None)
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
        record["signer"], record["sig"] = self._sign(RECORD_CONTEXT + record["hash"].encode())
        _durable_write(handle, canonical_json(record).encode() + b"\n")
        self._write_head(record)
        return record

    def _sign(self, message: bytes) -> tuple[str | None, str | None]:
        if self._key is None:
            return None, None
        signature = base64.b64encode(self._key.sign(message)).decode("ascii")
        return public_key_fingerprint(self._key.public_key()), signature

    def _write_head(self, record: Mapping[str, Any]) -> None:
        signer, sig = self._sign(head_message(record["seq"], record["hash"]))
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
    init_kind = SITE_INIT
    requires_key = True

    def __init__(self, state_dir: Path, signing_key: Ed25519PrivateKey | None = None, *, site_id: str | None = None) -> None:
        super().__init__(Path(state_dir) / LEDGER_FILE, signing_key)
        self.state_dir = Path(state_dir)
        self.site_id = site_id or self.state_dir.name

    def _init_body(self) -> dict[str, Any]:
        return {"site_id": self.site_id, **super()._init_body()}

    @property
    def signing_key(self) -> Ed25519PrivateKey:
        """The site's ledger key (Ledger.open always has one): it also signs the high-water mark."""
        assert self._key is not None
        return self._key

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


def site_key_path(state_dir: Path, key_path: Path | None) -> Path:
    """The key that signs the ledger in ``state_dir``: the configured one, else the default in the state dir."""
    return Path(key_path) if key_path is not None else private_key_path(Path(state_dir), DEFAULT_SITE_KEY)


def _site_signing_key(state_dir: Path, key_path: Path | None) -> Ed25519PrivateKey:
    if key_path is not None:
        return load_signing_key(key_path)
    default = site_key_path(state_dir, None)
    if not default.exists():
        init_site_key(state_dir, DEFAULT_SITE_KEY)
        log.info("%s: created a ledger signing key next to the ledger (no key path configured)", default)
    return load_signing_key(default)


SERVER_KEY = "server"  # the coordinator's ledger key: <key_dir>/server.ed25519 (+ .pub for auditors)


class ServerLedger(ChainedLog):
    """The server's record of what each site reported per round (``server_ledger.jsonl`` of a run).

    The ServerApp always signs it (:meth:`open`): its round reports are the external witness of each
    site's ε and ledger seq, and `fedssl audit` fails an unsigned one. Without a key (a reader, or an
    old run) it is chained but unsigned, which still catches accidental damage.
    """

    schema = SERVER_SCHEMA
    init_kind = SERVER_INIT
    requires_key = False

    @classmethod
    def open(cls, path: Path, key_dir: Path) -> ServerLedger:
        """The run's server ledger, signed with ``<key_dir>/server.ed25519``, created on first use.

        ``key_dir`` is the coordinator's state dir in a deployment (one key across runs, its .pub
        handed to auditors for ``--trusted-keys``), the run dir in a simulation.
        """
        key_path = private_key_path(Path(key_dir), SERVER_KEY)
        if not key_path.exists():
            init_site_key(Path(key_dir), SERVER_KEY)
            log.info("%s: created the coordinator's ledger signing key", key_path)
        return cls(path, load_signing_key(key_path))

    def round_reports(self) -> list[dict[str, Any]]:
        """Every ``round_report`` body, unverified (the audit verifies first)."""
        return bodies(self.records(), ROUND_REPORT)
