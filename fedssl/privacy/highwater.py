"""The site's signed high-water mark: how far its ledger and its ε have got, kept outside the state dir.

A ledger (and its ``ledger.head``) only proves it was not edited; a state dir deleted, or restored
from an older copy, reads as a consistent but smaller spend, and the site would spend its budget
again. The mark — (ledger seq, ε, hash of the record at that seq), signed with the ledger key — lives
beside that key (``<ledger key>.highwater``), not in the state dir, so losing or rolling back the
state dir leaves the mark ahead of it. The budget (fedssl.privacy.budget) refuses to open a ledger
behind its mark, and raises the mark after every record it writes. A mark that fails its signature
is refused too: lowering it needs the ledger key.

What it cannot catch: the state dir *and* the mark rolled back together (say, the whole machine
restored from a backup). The coordinator's record of each site's last (seq, ε) is the check for that.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedssl.errors import PrivacyError
from fedssl.layout import HIGHWATER_SUFFIX
from fedssl.privacy.chain import canonical_json, verify_sig
from fedssl.privacy.durable import replace_durably
from fedssl.privacy.keys import public_key_fingerprint

# Domain separation: a ledger record or head signature can never pass as a mark's, nor the reverse.
HIGHWATER_CONTEXT = b"fedssl-highwater-v1\x00"


@dataclass(frozen=True)
class HighWaterMark:
    seq: int  # the ledger's last record seq
    epsilon: float  # the site's cumulative ε at that record
    hash: str  # that record's hash: the mark belongs to this ledger, not to any ledger that long

    def message(self) -> bytes:
        return HIGHWATER_CONTEXT + canonical_json({"seq": self.seq, "epsilon": self.epsilon, "hash": self.hash}).encode()


def highwater_path(key_path: Path) -> Path:
    """Where the mark of the ledger signed by ``key_path`` lives: beside the key."""
    key_path = Path(key_path)
    return key_path.with_name(key_path.name + HIGHWATER_SUFFIX)


def write_mark(path: Path, key: Ed25519PrivateKey, mark: HighWaterMark) -> None:
    """Sign and write the mark atomically and durably (a torn mark must never read as a lower one)."""
    path = Path(path)
    signature = base64.b64encode(key.sign(mark.message())).decode("ascii")
    data = {"seq": mark.seq, "epsilon": mark.epsilon, "hash": mark.hash, "signer": public_key_fingerprint(key.public_key()), "sig": signature}
    replace_durably(path, canonical_json(data))


def read_mark(path: Path, public_key: Ed25519PublicKey) -> HighWaterMark | None:
    """The mark at ``path`` if its signature holds; None if there is none; PrivacyError otherwise."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        mark = HighWaterMark(seq=int(data["seq"]), epsilon=float(data["epsilon"]), hash=str(data["hash"]))
        signature = data.get("sig")
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise PrivacyError(
            f"{path}: the high-water mark is unreadable; refusing to train. Restore it from backup with the state dir it belongs to"
        ) from None
    if not verify_sig(public_key, signature, mark.message()):
        raise PrivacyError(
            f"{path}: the high-water mark fails its signature by this site's ledger key (edited, or written with another key); "
            "refusing to train. Restore the mark and the state dir from the latest backup"
        )
    return mark


def mark_of(records: list[dict[str, Any]], epsilon: float) -> HighWaterMark | None:
    """The mark for a (verified) ledger's records and the ε they add up to; None for an empty ledger."""
    if not records:
        return None
    last = records[-1]
    return HighWaterMark(seq=int(last["seq"]), epsilon=float(epsilon), hash=str(last["hash"]))


def rollback_problem(mark: HighWaterMark, records: list[dict[str, Any]], epsilon: float | None, slack: float) -> str | None:
    """Why a (verified) ledger with ``records`` and spend ``epsilon`` (None: not checked) is behind ``mark``, or None."""
    by_seq = {r.get("seq"): r for r in records}
    last_seq = max((s for s in by_seq if isinstance(s, int)), default=-1)
    if last_seq < 0:
        return f"the ledger is gone, but the high-water mark says it reached seq {mark.seq} at epsilon {mark.epsilon:.3f}"
    if last_seq < mark.seq:
        return f"the ledger ends at seq {last_seq}, but the high-water mark says it reached seq {mark.seq} at epsilon {mark.epsilon:.3f}"
    if by_seq[mark.seq].get("hash") != mark.hash:
        return f"the ledger's record seq {mark.seq} is not the one the high-water mark sealed: this is another ledger"
    if epsilon is not None and epsilon < mark.epsilon * (1 - slack):
        return f"the state dir's epsilon {epsilon:.3f} is below the {mark.epsilon:.3f} the high-water mark recorded"
    return None


def rolled_back_message(state_dir: Path, mark_path: Path, problem: str) -> str:
    """One line: what happened to the state dir, and what the operator may do."""
    return (
        f"{state_dir}: {problem} ({mark_path}): the state dir was deleted, replaced or restored from an older copy, and "
        "training on it would spend budget already spent; refusing to train. Restore the site's latest state dir; if it is "
        "lost for good, this site's data has spent what the mark says: retire it, or tell the coordinator before starting anew"
    )


def missing_mark_message(state_dir: Path, mark_path: Path) -> str:
    return (
        f"{state_dir}: the ledger records DP training but its high-water mark {mark_path} is missing (deleted or moved, "
        "or the state dir was copied here from elsewhere); refusing to train. Put the mark back beside the ledger key, "
        "or restore the key, the mark and the state dir together from one backup. Only for a state dir that predates "
        "high-water marks and is certainly the latest: `fedssl site seal --config site.yaml`, once"
    )


def state_dir_problem(state_dir: Path, key_path: Path | None, mark_path: Path | None, slack: float) -> str | None:
    """Read-only (for preflight): why the budget would refuse this state dir against its mark, or None."""
    from fedssl.privacy.analysis import epsilon_of
    from fedssl.privacy.keys import load_signing_key
    from fedssl.privacy.ledger import LEDGER_FILE, Ledger, site_key_path
    from fedssl.privacy.records import dp_events

    state_dir = Path(state_dir)
    mark_path = Path(mark_path) if mark_path is not None else highwater_path(site_key_path(state_dir, key_path))
    records = Ledger(state_dir).records() if (state_dir / LEDGER_FILE).exists() else []
    events = dp_events(records)
    if not mark_path.exists():
        return missing_mark_message(state_dir, mark_path) if events else None
    if not records:
        return rolled_back_message(state_dir, mark_path, "the ledger is gone, but a high-water mark says this site trained")
    mark = read_mark(mark_path, load_signing_key(site_key_path(state_dir, key_path)).public_key())
    assert mark is not None
    epsilon = epsilon_of([e.event for e in events], events[0].delta, events[0].accountant) if events else 0.0
    problem = rollback_problem(mark, records, epsilon, slack)
    return rolled_back_message(state_dir, mark_path, problem) if problem else None


def seal(state_dir: Path, key_path: Path | None, mark_path: Path | None) -> HighWaterMark:
    """Sign a first mark for a state dir that predates marks (``fedssl site seal``); never replaces one."""
    from fedssl.privacy.analysis import epsilon_of
    from fedssl.privacy.ledger import LEDGER_FILE, Ledger, site_key_path
    from fedssl.privacy.records import dp_events

    state_dir = Path(state_dir)
    mark_path = Path(mark_path) if mark_path is not None else highwater_path(site_key_path(state_dir, key_path))
    if mark_path.exists():
        raise PrivacyError(f"{mark_path}: this site already has a high-water mark; a mark is raised by training, never re-sealed by hand")
    if not (state_dir / LEDGER_FILE).exists():
        raise PrivacyError(f"{state_dir}: no ledger to seal; a site that never trained needs no seal")
    ledger = Ledger.open(state_dir, key_path=key_path)  # refuses a ledger that does not verify against the key
    records = ledger.records()
    events = dp_events(records)
    epsilon = epsilon_of([e.event for e in events], events[0].delta, events[0].accountant) if events else 0.0
    mark = mark_of(records, epsilon)
    assert mark is not None
    write_mark(mark_path, ledger.signing_key, mark)
    return mark
