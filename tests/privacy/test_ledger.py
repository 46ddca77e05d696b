"""The site ledger: durable, hash-chained, signed; every kind of tampering is detected."""

from __future__ import annotations

import base64
import hashlib
import json
import multiprocessing
import os
import shutil
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from opacus.accountants import RDPAccountant

from fedssl.errors import ConfigError, PrivacyError
from fedssl.privacy import chain
from fedssl.privacy import ledger as L
from fedssl.privacy.independent import epsilon_rdp
from fedssl.privacy.keys import (
    init_site_key,
    load_signing_key,
    load_verify_key,
    public_key_fingerprint,
    public_key_path,
)
from fedssl.privacy.ledger import Ledger, ServerLedger, canonical_json, record_hash

SIGMA, Q, STEPS, DELTA, TARGET = 1.1, 0.05, 10, 1e-5, 8.0


def opacus_epsilon(history: list[tuple[float, float, int]], delta: float = DELTA) -> float:
    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta))


def dp_event(round_: int, epsilon_after: float, steps: int = STEPS) -> dict:
    return {
        "run_id": "run-a",
        "round": round_,
        "steps": steps,
        "sample_rate": Q,
        "noise_multiplier": SIGMA,
        "max_grad_norm": 1.0,
        "delta": DELTA,
        "accountant": "rdp",
        "epsilon_after": epsilon_after,
        "target_epsilon": TARGET,
        "status": "charged",
    }


def budget_body() -> dict:
    return {"target_epsilon": TARGET, "delta": DELTA, "noise_multiplier": SIGMA, "planned_steps": 50,
            "sample_rate": Q, "max_grad_norm": 1.0, "accountant": "rdp"}


@pytest.fixture
def site(tmp_path: Path) -> tuple[Ledger, Path]:
    """A site with a registered key outside its state dir, a budget and three charged rounds."""
    key_path = init_site_key(tmp_path / "keys", "site-000")
    ledger = Ledger.open(tmp_path / "state", key_path=key_path, site_id="site-000")
    ledger.append("budget", budget_body())
    for r in range(1, 4):
        ledger.append("dp_event", dp_event(r, opacus_epsilon([(SIGMA, Q, STEPS * r)])))
    return ledger, key_path


def lines(ledger: Ledger) -> list[bytes]:
    return ledger.path.read_bytes().splitlines(keepends=True)


def rewrite(ledger: Ledger, new_lines: list[bytes]) -> None:
    ledger.path.write_bytes(b"".join(new_lines))


def trusted(key_path: Path):
    return load_verify_key(public_key_path(key_path.parent, "site-000"))


# ---------------------------------------------------------------- keys


def test_init_site_key_writes_private_0600_and_refuses_overwrite(tmp_path: Path) -> None:
    path = init_site_key(tmp_path, "site-3")
    assert path == tmp_path / "site-3.ed25519"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    private = load_signing_key(path)
    public = load_verify_key(tmp_path / "site-3.ed25519.pub")
    assert public_key_fingerprint(public) == public_key_fingerprint(private.public_key())
    assert len(public_key_fingerprint(public)) == 16
    with pytest.raises(ConfigError, match="already exists"):
        init_site_key(tmp_path, "site-3")
    assert load_signing_key(path).private_bytes_raw() == private.private_bytes_raw()  # untouched
    init_site_key(tmp_path, "site-3", overwrite=True)
    assert load_signing_key(path).private_bytes_raw() != private.private_bytes_raw()


def test_site_name_cannot_escape_the_key_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="site name"):
        init_site_key(tmp_path, "../evil")


def test_keys_init_site_message_names_files_and_fingerprint(tmp_path: Path, capsys) -> None:
    from fedssl.cli import main

    assert main(["keys", "init-site", "hospital-a", "--out", str(tmp_path)]) == 0
    message = capsys.readouterr().out
    fingerprint = public_key_fingerprint(load_verify_key(tmp_path / "hospital-a.ed25519.pub"))
    assert fingerprint in message and "hospital-a.ed25519.pub" in message


def test_base64_public_key_file_is_accepted(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes_raw()
    (tmp_path / "k.pub").write_text(base64.b64encode(raw).decode() + "\n")
    assert load_verify_key(tmp_path / "k.pub").public_bytes_raw() == raw


# ---------------------------------------------------------------- format and clean verification


def test_clean_ledger_verifies_and_has_the_documented_format(site) -> None:
    ledger, key_path = site
    records = ledger.records()
    assert [r["kind"] for r in records] == ["site_init", "budget", "dp_event", "dp_event", "dp_event"]
    assert [r["seq"] for r in records] == [0, 1, 2, 3, 4]
    assert records[0]["prev_hash"] == "0" * 64
    for previous, record in zip(records, records[1:]):
        assert record["prev_hash"] == previous["hash"]
    for raw, record in zip(lines(ledger), records):
        assert raw == canonical_json(record).encode() + b"\n"  # one canonical JSON object per line
        hashed = {k: record[k] for k in ("seq", "prev_hash", "time", "kind", "body")}
        assert record["hash"] == hashlib.sha256(json.dumps(hashed, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    init = records[0]["body"]
    assert init["site_id"] == "site-000"
    assert init["fingerprint"] == public_key_fingerprint(trusted(key_path)) == records[3]["signer"]

    report = ledger.verify()
    assert report.ok and report.trust == chain.TRUST_ON_FIRST_USE
    report = ledger.verify(trusted_public_key=trusted(key_path))
    assert report.ok and report.trust == chain.TRUSTED_KEY
    head = json.loads(ledger.head_path.read_text())
    assert (head["seq"], head["hash"]) == (4, records[-1]["hash"])


def test_append_rejects_invalid_bodies_without_touching_the_file(site) -> None:
    ledger, _ = site
    before = ledger.path.read_bytes()
    body = dp_event(4, 3.0)
    del body["epsilon_after"]
    with pytest.raises(PrivacyError, match="epsilon_after"):
        ledger.append("dp_event", body)
    with pytest.raises(PrivacyError, match="inf"):
        ledger.append("dp_event", dp_event(4, float("inf")))
    with pytest.raises(PrivacyError, match="steps"):
        ledger.append("dp_event", {**dp_event(4, 3.0), "steps": True})
    with pytest.raises(PrivacyError, match="unknown record kind"):
        ledger.append("note", {})
    assert ledger.path.read_bytes() == before


def test_read_only_ledger_cannot_append(site) -> None:
    ledger, _ = site
    with pytest.raises(PrivacyError, match="read-only"):
        Ledger(ledger.state_dir).append("dp_event", dp_event(4, 3.0))


def test_open_without_key_path_creates_a_private_key_in_the_state_dir_and_reuses_it(tmp_path: Path) -> None:
    state = tmp_path / "sites" / "site-007"
    first = Ledger.open(state)
    key_file = state / "site.ed25519"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    first.append("budget", budget_body())
    again = Ledger.open(state)
    again.append("dp_event", dp_event(1, 1.0))
    records = again.records()
    assert records[0]["body"]["site_id"] == "site-007"
    assert {r["signer"] for r in records} == {records[0]["body"]["fingerprint"]}
    assert again.verify().ok


def test_open_refuses_another_sites_ledger(site, tmp_path: Path) -> None:
    ledger, key_path = site
    with pytest.raises(PrivacyError, match="belongs to site 'site-000'"):
        Ledger.open(ledger.state_dir, key_path=key_path, site_id="site-001")
    other_key = init_site_key(tmp_path / "other", "site-000")
    with pytest.raises(PrivacyError, match="untrusted_key"):
        Ledger.open(ledger.state_dir, key_path=other_key)


def test_server_ledger_is_chained_and_unsigned_without_a_key(tmp_path: Path) -> None:
    server = ServerLedger(tmp_path / "server_ledger.jsonl")
    for node in (11, 12):
        server.append("round_report", {"round": 1, "node_id": node, "site_id": node - 11, "epsilon": 1.5,
                                       "ledger_seq": 2, "status": "trained", "aggregation": "fedavg"})
    records = server.records()
    assert [r["kind"] for r in records] == ["server_init", "round_report", "round_report"]
    assert records[1]["sig"] is None
    report = server.verify()
    assert report.ok and report.trust == chain.UNSIGNED
    # still chained: an edit is caught
    raw = server.path.read_bytes().replace(b'"epsilon":1.5', b'"epsilon":0.5', 1)
    server.path.write_bytes(raw)
    assert chain.BAD_HASH in server.verify().kinds


def test_signed_server_ledger_verifies_against_its_key(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    server = ServerLedger(tmp_path / "server_ledger.jsonl", signing_key=key)
    server.append("round_report", {"round": 1, "node_id": 1, "site_id": 0, "epsilon": None,
                                   "ledger_seq": -1, "status": "refused", "aggregation": "fedavg"})
    assert server.verify(trusted_public_key=key.public_key()).ok
    assert chain.UNTRUSTED_KEY in server.verify(trusted_public_key=Ed25519PrivateKey.generate().public_key()).kinds


# ---------------------------------------------------------------- tampering


def test_edited_body_is_a_bad_hash(site) -> None:
    ledger, _ = site
    rows = lines(ledger)
    record = json.loads(rows[3])
    record["body"]["epsilon_after"] = 0.01  # pretend round 2 spent almost nothing
    rows[3] = canonical_json(record).encode() + b"\n"
    rewrite(ledger, rows)
    report = ledger.verify()
    assert report.kinds == {chain.BAD_HASH}
    assert report.problems[0].seq == 3 and report.problems[0].line == 4


def test_edit_with_recomputed_hash_is_a_bad_signature(site) -> None:
    ledger, _ = site
    rows = lines(ledger)
    record = json.loads(rows[3])
    record["body"]["steps"] = 1
    record["hash"] = record_hash(record)
    rows[3] = canonical_json(record).encode() + b"\n"
    rewrite(ledger, rows)
    assert {chain.BAD_SIGNATURE, chain.BROKEN_CHAIN} <= ledger.verify().kinds


def test_deleted_middle_record_is_a_seq_gap(site) -> None:
    ledger, _ = site
    rows = lines(ledger)
    rewrite(ledger, rows[:2] + rows[3:])
    report = ledger.verify()
    assert report.kinds == {chain.SEQ_GAP, chain.BROKEN_CHAIN}
    assert all(p.seq == 3 for p in report.problems)


def test_reordered_records_are_detected(site) -> None:
    ledger, _ = site
    rows = lines(ledger)
    rows[2], rows[3] = rows[3], rows[2]
    rewrite(ledger, rows)
    assert {chain.SEQ_REORDER, chain.SEQ_GAP, chain.BROKEN_CHAIN} <= ledger.verify().kinds


def test_forged_appended_record_is_a_foreign_signer(site) -> None:
    ledger, key_path = site
    forger = Ed25519PrivateKey.generate()
    last = ledger.records()[-1]
    forged = {"seq": last["seq"] + 1, "prev_hash": last["hash"], "time": last["time"], "kind": "refusal",
              "body": {"run_id": "run-a", "round": 4, "reason": "forged", "epsilon_spent": 0.0, "target_epsilon": TARGET}}
    forged["hash"] = record_hash(forged)
    forged["signer"] = public_key_fingerprint(forger.public_key())
    forged["sig"] = base64.b64encode(forger.sign(b"fedssl-ledger-record-v1\x00" + forged["hash"].encode())).decode()
    with open(ledger.path, "ab") as handle:
        handle.write(canonical_json(forged).encode() + b"\n")
    # hash and chain are perfect; only the signature gives it away
    assert ledger.verify().kinds == {chain.FOREIGN_SIGNER}
    assert ledger.verify(trusted_public_key=trusted(key_path)).kinds == {chain.FOREIGN_SIGNER}


def test_truncated_last_record_is_detected_by_the_head(site) -> None:
    ledger, _ = site
    rewrite(ledger, lines(ledger)[:-1])
    report = ledger.verify()
    assert report.kinds == {chain.TRUNCATED}
    assert len(report.records) == 4  # what remains is still reported


def test_deleting_the_head_too_is_reported(site) -> None:
    ledger, _ = site
    rewrite(ledger, lines(ledger)[:-1])
    ledger.head_path.unlink()
    assert ledger.verify().kinds == {chain.HEAD_MISSING}


def test_a_forged_head_is_detected(site) -> None:
    ledger, _ = site
    head = json.loads(ledger.head_path.read_text())
    head["seq"] = 3
    head["hash"] = ledger.records()[3]["hash"]  # consistent, but not signed by the site
    ledger.head_path.write_text(json.dumps(head))
    assert chain.BAD_HEAD in ledger.verify().kinds


def test_consistent_rollback_of_ledger_and_head_is_invisible_locally(site, tmp_path: Path) -> None:
    """The documented limit: only an external record (the server's) can expose this."""
    ledger, key_path = site
    backup = tmp_path / "backup"
    backup.mkdir()
    shutil.copy(ledger.path, backup)
    shutil.copy(ledger.head_path, backup)
    ledger.append("dp_event", dp_event(4, opacus_epsilon([(SIGMA, Q, STEPS * 4)])))
    shutil.copy(backup / L.LEDGER_FILE, ledger.path)
    shutil.copy(backup / "ledger.head", ledger.head_path)
    assert ledger.verify(trusted_public_key=trusted(key_path)).ok  # see test_audit for the server cross-check


def test_whole_ledger_replaced_with_a_foreign_key_needs_the_trusted_key(site, tmp_path: Path) -> None:
    ledger, key_path = site
    for path in (ledger.path, ledger.head_path):
        path.unlink()
    forger_key = init_site_key(tmp_path / "forger", "site-000")
    forged = Ledger.open(ledger.state_dir, key_path=forger_key, site_id="site-000")
    forged.append("budget", budget_body())
    forged.append("dp_event", dp_event(1, 0.001))
    assert forged.verify().ok  # self-consistent: trust on first use cannot tell
    report = forged.verify(trusted_public_key=trusted(key_path))
    assert chain.UNTRUSTED_KEY in report.kinds and chain.FOREIGN_SIGNER in report.kinds


def test_torn_last_line_is_reported_without_hiding_earlier_records(site) -> None:
    ledger, key_path = site
    partial = canonical_json({"seq": 5, "prev_hash": "ab", "kind": "dp_event"}).encode()[:37]
    with open(ledger.path, "ab") as handle:
        handle.write(partial)
    report = ledger.verify()
    assert report.kinds == {chain.TORN_WRITE}
    assert report.problems[0].line == 6
    assert [r["seq"] for r in report.records] == [0, 1, 2, 3, 4]

    # The site recovers on its next open: the torn bytes stay, sealed by a signed recovery record.
    reopened = Ledger.open(ledger.state_dir, key_path=key_path)
    reopened.append("dp_event", dp_event(4, opacus_epsilon([(SIGMA, Q, STEPS * 4)])))
    report = reopened.verify(trusted_public_key=trusted(key_path))
    assert report.ok, report.problems
    assert any("torn write" in note for note in report.notes)
    assert partial in reopened.path.read_bytes()
    recovery = [r for r in report.records if r["kind"] == "recovery"][0]
    assert recovery["body"]["torn_sha256"] == hashlib.sha256(partial).hexdigest()
    assert [r["seq"] for r in report.records] == [0, 1, 2, 3, 4, 5, 6]


def test_unacknowledged_garbage_line_mid_file_is_corrupt(site) -> None:
    ledger, _ = site
    rows = lines(ledger)
    rewrite(ledger, rows[:2] + [b"not json\n"] + rows[2:])
    assert ledger.verify().kinds == {chain.CORRUPT_LINE}


def test_open_refuses_a_tampered_ledger(site) -> None:
    ledger, key_path = site
    rewrite(ledger, lines(ledger)[:-1])
    with pytest.raises(PrivacyError, match="truncated.*fedssl audit"):
        Ledger.open(ledger.state_dir, key_path=key_path)


def test_append_refuses_after_truncation_even_without_verifying(site) -> None:
    ledger, _ = site
    rewrite(ledger, lines(ledger)[:-1])
    with pytest.raises(PrivacyError, match="truncated"):
        ledger.append("dp_event", dp_event(4, 3.0))


# ---------------------------------------------------------------- write-ahead under a crash


def _charge_then_crash(state_dir: str, key_path: str, epsilon_after: float) -> None:
    """A site process: charge round 4 in the ledger, then die before anything is sent."""
    Ledger.open(Path(state_dir), key_path=Path(key_path)).append("dp_event", dp_event(4, epsilon_after))
    os._exit(1)  # no cleanup, no flush: like kill -9 or power loss right after the fsync


@pytest.mark.parametrize("taken_steps", [0, 4, STEPS])  # where in round 4 the crash happened
def test_crash_between_ledger_write_and_send_never_under_counts(site, taken_steps: int) -> None:
    ledger, key_path = site
    charged = opacus_epsilon([(SIGMA, Q, STEPS)] * 4)
    process = multiprocessing.get_context("fork").Process(target=_charge_then_crash, args=(str(ledger.state_dir), str(key_path), charged))
    process.start()
    process.join(timeout=60)
    assert process.exitcode == 1

    report = ledger.verify(trusted_public_key=trusted(key_path))
    assert report.ok
    recorded = [(r["body"]["noise_multiplier"], r["body"]["sample_rate"], r["body"]["steps"]) for r in report.records if r["kind"] == "dp_event"]
    true_spend = [(SIGMA, Q, STEPS)] * 3 + [(SIGMA, Q, taken_steps)]
    assert epsilon_rdp(recorded, DELTA) >= epsilon_rdp(true_spend, DELTA)
    assert report.records[-1]["body"]["epsilon_after"] >= opacus_epsilon([e for e in true_spend if e[2]])
    # and the site can carry on: the charged round stays charged
    Ledger.open(ledger.state_dir, key_path=key_path).append("dp_event", dp_event(5, opacus_epsilon([(SIGMA, Q, STEPS)] * 5)))
    assert ledger.verify().ok
