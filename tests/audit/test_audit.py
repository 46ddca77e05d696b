"""`fedssl audit`: independent re-accounting, claim checks, server cross-check, CLI contract."""

from __future__ import annotations

import itertools
import json
import shutil
from functools import lru_cache
from pathlib import Path

import pytest
from opacus.accountants import create_accountant

from fedssl.audit.ledgers import (
    EPSILON_MISMATCH,
    OVER_BUDGET,
    SERVER_MISMATCH,
    EventAudit,
    SiteAudit,
    audit_path,
    DEFAULT_TOLERANCE,
    compare_claims,
    recompute,
)
from fedssl.cli import main as cli_main
from fedssl.layout import SERVER_LEDGER_FILE, RunDir
from fedssl.privacy import chain
from fedssl.privacy import ledger as L
from fedssl.privacy.independent import epsilon_pld, epsilon_rdp, pld_trajectory, rdp_trajectory
from fedssl.privacy.keys import init_site_key
from fedssl.privacy.ledger import Ledger, ServerLedger
from fedssl.privacy.statement import privacy_statement
from ledger_files import dp_event

Event = tuple[float, float, int]
TOL = DEFAULT_TOLERANCE


def opacus_epsilon(history: list[Event], delta: float, accountant: str = "rdp") -> float:
    """What the site's Opacus accountant claims; fixtures ask for the same histories again and again."""
    return _opacus_epsilon(tuple(history), delta, accountant)


@lru_cache(maxsize=None)
def _opacus_epsilon(history: tuple[Event, ...], delta: float, accountant: str) -> float:
    acc = create_accountant(accountant)
    acc.history = list(history)
    return float(acc.get_epsilon(delta))


def write_site(state_dir: Path, key_path: Path, history: list[Event], *, delta: float = 1e-5, target: float = 8.0,
               accountant: str = "rdp", claim_scale: float = 1.0, server: ServerLedger | None = None, site_number: int = 0) -> Ledger:
    """A site that charges each event with the ε its Opacus accountant reports (times ``claim_scale``)."""
    ledger = Ledger.open(state_dir, key_path=key_path, site_id=state_dir.name)
    sigma, q, _ = history[0]
    ledger.append("budget", {"target_epsilon": target, "delta": delta, "noise_multiplier": sigma, "planned_steps": 100,
                             "sample_rate": q, "max_grad_norm": 1.0, "accountant": accountant})
    for round_, event in enumerate(history, start=1):
        claimed = claim_scale * opacus_epsilon(history[:round_], delta, accountant)
        record = ledger.append("dp_event", dp_event(round_, event, delta, claimed, target, accountant))
        if server is not None:
            server.append("round_report", {"round": round_, "node_id": 1000 + site_number, "site_id": site_number,
                                           "epsilon": claimed, "ledger_seq": record["seq"], "status": "trained",
                                           "aggregation": "fedavg"})
    return ledger


HISTORY: list[Event] = [(1.1, 0.05, 10)] * 4


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A two-site run with registered keys and the server's record: what a clean demo leaves behind."""
    run = tmp_path / "run"
    server = ServerLedger.open(RunDir(run).server_ledger, tmp_path / "coordinator")
    for k in range(2):
        key = init_site_key(tmp_path / "keys", f"site-{k:03d}")
        write_site(run / "sites" / f"site-{k:03d}", key, HISTORY, server=server, site_number=k)
    return run


def keys_dir(run: Path) -> Path:
    return run.parent / "keys"


# ---------------------------------------------------------------- independent accounting


GRID = list(itertools.product([0.8, 1.1, 2.0], [0.01, 0.1, 0.5], [1, 10, 100], [1e-5, 1e-3]))


@pytest.mark.parametrize("sigma,q,steps,delta", GRID)
def test_rdp_matches_opacus(sigma: float, q: float, steps: int, delta: float) -> None:
    ours = rdp_trajectory([(sigma, q, steps)], [delta])[0]
    theirs = opacus_epsilon([(sigma, q, steps)], delta)
    if ours.orders_dropped:
        # dp-accounting gave up on some orders: still an upper bound, never below Opacus beyond float noise
        # (above it by up to 21%, at σ=0.8, q=0.5, 100 steps)
        assert ours.epsilon >= theirs * (1 - 1e-6)
    else:
        # Same bound; the order grids differ only by dp-accounting's extra orders 128-1024: measured max 0.81%.
        assert ours.epsilon == pytest.approx(theirs, rel=0.01)


def test_pinned_numbers() -> None:
    assert epsilon_rdp([(1.1, 0.01, 100)], 1e-5) == pytest.approx(0.9561, abs=1e-4)
    assert opacus_epsilon([(1.1, 0.01, 100)], 1e-5) == pytest.approx(0.9561, abs=1e-4)
    assert epsilon_pld([(1.1, 0.01, 100)], 1e-5) == pytest.approx(0.5498, abs=1e-3)
    assert epsilon_rdp([(2.0, 0.1, 100)], 1e-5) == pytest.approx(2.5806, abs=1e-4)
    assert epsilon_pld([(2.0, 0.1, 100)], 1e-5) == pytest.approx(2.3374, abs=1e-3)
    assert epsilon_rdp([], 1e-5) == 0.0 == epsilon_pld([], 1e-5)


def test_events_compose_like_one_long_event() -> None:
    split = [(1.1, 0.01, 30), (1.1, 0.01, 70)]
    assert epsilon_rdp(split, 1e-5) == pytest.approx(epsilon_rdp([(1.1, 0.01, 100)], 1e-5), rel=1e-12)
    assert epsilon_pld(split, 1e-5) == pytest.approx(epsilon_pld([(1.1, 0.01, 100)], 1e-5), rel=1e-3)


MULTI_ROUND = [(1.1, 0.01, 10)] * 5 + [(2.0, 0.1, 20)] * 3 + [(1.5, 0.05, 7), (1.1, 0.0, 10), (1.3, 0.02, 0)]


def test_multi_round_trajectory_matches_opacus_prefixes_and_pld_is_tighter() -> None:
    deltas = [1e-5] * len(MULTI_ROUND)
    rdp = rdp_trajectory(MULTI_ROUND, deltas)
    pld = pld_trajectory(MULTI_ROUND, deltas)
    for i in range(len(MULTI_ROUND)):
        theirs = opacus_epsilon([e for e in MULTI_ROUND[: i + 1] if e[1] > 0 and e[2] > 0], 1e-5)
        assert rdp[i].epsilon == pytest.approx(theirs, rel=0.01)
        assert pld[i] < rdp[i].epsilon
    assert rdp[-1].epsilon == rdp[-3].epsilon  # q = 0 and steps = 0 release nothing
    assert [r.epsilon for r in rdp] == sorted(r.epsilon for r in rdp)


def _accepts_opacus_claim(history: list[Event], delta: float, accountant: str = "rdp") -> SiteAudit:
    site = SiteAudit(site_id="s", ledger_path=Path("ledger.jsonl"))
    for i, event in enumerate(history):
        claimed = opacus_epsilon(history[: i + 1], delta, accountant)
        body = dp_event(i + 1, event, delta, claimed, target=1e9, accountant=accountant)
        site.events.append(EventAudit.from_record({"seq": i + 2, "body": body}))
    recompute(site)
    compare_claims(site, TOL)
    return site


@pytest.mark.parametrize("history,delta", [
    ([(1.1, 0.01, 100)], 1e-5),
    ([(2.0, 0.1, 10)], 1e-3),
    (MULTI_ROUND[:9], 1e-5),
    ([(1.0, 0.1, 30), (2.0, 0.01, 100)], 1e-5),
])
def test_audit_accepts_what_opacus_claims(history: list[Event], delta: float) -> None:
    site = _accepts_opacus_claim(history, delta)
    assert site.ok, site.findings


@pytest.mark.slow
def test_audit_accepts_opacus_over_the_whole_grid() -> None:
    for sigma, q, steps, delta in GRID:
        site = _accepts_opacus_claim([(sigma, q, steps)], delta)
        assert site.ok, (sigma, q, steps, delta, site.findings)


def test_where_dp_accounting_drops_orders_a_claim_above_pld_is_accepted_with_a_note() -> None:
    # Pinned: dp-accounting RDP 62.95 vs Opacus 51.98 (orders < 1.8 dropped), PLD 47.44.
    site = _accepts_opacus_claim([(0.8, 0.5, 100)], 1e-3)
    event = site.events[0]
    assert event.rdp_orders_dropped
    assert event.epsilon_rdp == pytest.approx(62.946, abs=1e-2)
    assert event.epsilon_claimed == pytest.approx(51.976, abs=1e-2)
    assert event.epsilon_pld == pytest.approx(47.44, abs=0.05)
    assert site.ok
    assert any("PLD" in note for note in site.notes)


def test_prv_claims_are_checked_against_pld() -> None:
    site = _accepts_opacus_claim([(1.1, 0.05, 50)], 1e-5, accountant="prv")
    assert site.ok and site.events[0].reference_kind == "pld"


def test_gdp_under_reports_and_is_flagged() -> None:
    # Opacus's GDP accountant is a CLT approximation: 1.56 here, where PLD gives 2.18.
    site = _accepts_opacus_claim([(1.1, 0.05, 50)], 1e-5, accountant="gdp")
    assert {f.kind for f in site.findings} == {EPSILON_MISMATCH}


# ---------------------------------------------------------------- audit of ledgers on disk


def test_clean_run_audits_ok(run_dir: Path) -> None:
    report = audit_path(run_dir, trusted_keys_dir=keys_dir(run_dir))
    assert report.ok, [(s.site_id, s.findings) for s in report.sites]
    assert [s.site_id for s in report.sites] == ["site-000", "site-001"]
    assert all(s.trust == chain.TRUSTED_KEY for s in report.sites)
    site = report.sites[0]
    assert len(site.events) == 4 and site.events[-1].epsilon_claimed == pytest.approx(site.events[-1].epsilon_rdp, rel=1e-3)


def test_audit_cli_exit_codes(run_dir: Path, tmp_path: Path, capsys) -> None:
    assert cli_main(["audit", str(run_dir), "--trusted-keys", str(keys_dir(run_dir))]) == 0
    out = capsys.readouterr().out
    assert "PASSED" in out and "ε recomputed (RDP)" in out and "site-001" in out and "Privacy statement" in out

    assert cli_main(["audit", str(tmp_path / "nope")]) == 2
    assert cli_main(["audit", str(run_dir), "--tolerance", "1.5"]) == 2
    assert cli_main(["audit", str(run_dir), "--trusted-keys", str(tmp_path / "no-keys")]) == 2
    (tmp_path / "empty").mkdir()
    assert cli_main(["audit", str(tmp_path / "empty")]) == 2
    assert cli_main(["audit"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "nothing to audit" in err

    ledger = run_dir / "sites" / "site-001" / L.LEDGER_FILE
    ledger.write_bytes(ledger.read_bytes().replace(b'"steps":10', b'"steps":1', 1))
    assert cli_main(["audit", str(run_dir)]) == 1
    assert "bad_hash" in capsys.readouterr().out


def test_an_option_of_the_other_mode_is_a_one_line_usage_error(run_dir: Path, capsys) -> None:
    assert cli_main(["audit", "--empirical", "configs/experiments/digits-demo.yaml", "--trusted-keys", "x"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--trusted-keys" in lines[0] and "--empirical" in lines[0], lines
    assert cli_main(["audit", str(run_dir), "--canaries", "10", "--with-baseline"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--canaries, --with-baseline" in lines[0], lines
    assert not (run_dir / "audit.md").exists()  # nothing was audited


def test_audit_help_covers_both_modes(capsys) -> None:
    assert cli_main(["audit", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--empirical" in out and "--trusted-keys" in out and "--with-baseline" in out


def test_json_output_lets_anyone_re_account(run_dir: Path, tmp_path: Path, capsys) -> None:
    assert cli_main(["audit", str(run_dir), "--json", "--out", str(tmp_path / "out")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is True and data["tolerance"] == TOL
    events = data["sites"][0]["events"]
    assert [(e["noise_multiplier"], e["sample_rate"], e["steps"], e["delta"]) for e in events] == [(1.1, 0.05, 10, 1e-5)] * 4
    # re-account from the JSON alone and land on the claimed ε
    history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in events]
    assert epsilon_rdp(history, events[-1]["delta"]) == pytest.approx(events[-1]["epsilon_claimed"], rel=1e-3)
    assert sorted(Path(p).name for p in data["report_files"]) == ["audit.md", "audit_epsilon.png"]
    markdown = (tmp_path / "out" / "audit.md").read_text()
    assert "| site | rounds | steps | σ | q | δ |" in markdown and "![ε per site" in markdown
    assert (tmp_path / "out" / "audit_epsilon.png").read_bytes()[:4] == b"\x89PNG"


def test_under_claimed_epsilon_is_a_mismatch(tmp_path: Path) -> None:
    key = init_site_key(tmp_path / "keys", "site-000")
    write_site(tmp_path / "site-000", key, HISTORY, claim_scale=0.9)  # signed correctly, but 10% low
    assert cli_main(["audit", str(tmp_path / "site-000")]) == 1
    report = audit_path(tmp_path / "site-000")
    assert {f.kind for f in report.sites[0].findings} == {EPSILON_MISMATCH}
    # over-claiming is conservative and fine
    write_site(tmp_path / "site-001", init_site_key(tmp_path / "keys", "site-001"), HISTORY, claim_scale=1.5)
    assert audit_path(tmp_path / "site-001").ok


def test_over_budget_is_flagged(tmp_path: Path) -> None:
    key = init_site_key(tmp_path / "keys", "site-000")
    final = opacus_epsilon(HISTORY, 1e-5)
    write_site(tmp_path / "site-000", key, HISTORY, target=final * 0.9)
    report = audit_path(tmp_path / "site-000")
    assert {f.kind for f in report.sites[0].findings} == {OVER_BUDGET}


def test_refusals_are_reported_not_failures(tmp_path: Path, capsys) -> None:
    key = init_site_key(tmp_path / "keys", "site-000")
    ledger = write_site(tmp_path / "site-000", key, HISTORY)
    ledger.append("refusal", {"run_id": "demo", "round": 5, "reason": "budget exhausted", "epsilon_spent": 2.0, "target_epsilon": 8.0})
    assert cli_main(["audit", str(tmp_path / "site-000"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sites"][0]["refusals"][0]["round"] == 5


def test_rollback_of_ledger_and_head_is_caught_by_the_server_record(run_dir: Path, tmp_path: Path) -> None:
    state = run_dir / "sites" / "site-000"
    ledger = Ledger.open(state, key_path=keys_dir(run_dir) / "site-000.ed25519")
    backup = tmp_path / "backup"
    backup.mkdir()
    for path in (ledger.path, ledger.head_path):
        shutil.copy(path, backup)
    event = (1.1, 0.05, 10)
    record = ledger.append("dp_event", dp_event(5, event, 1e-5, opacus_epsilon(HISTORY + [event], 1e-5), 8.0))
    ServerLedger.open(RunDir(run_dir).server_ledger, run_dir.parent / "coordinator").append("round_report", {"round": 5, "node_id": 1000, "site_id": 0, "epsilon": record["body"]["epsilon_after"],
                                                  "ledger_seq": record["seq"], "status": "trained", "aggregation": "fedavg"})
    # roll both files back to the earlier, validly signed state: locally consistent
    for path in (ledger.path, ledger.head_path):
        shutil.copy(backup / path.name, path)
    assert ledger.verify().ok

    report = audit_path(run_dir)
    assert {f.kind for f in report.sites[0].findings} == {chain.TRUNCATED}
    assert report.sites[1].ok
    # auditing the single site against the server's record finds it too
    assert cli_main(["audit", str(state), "--server-ledger", str(run_dir / SERVER_LEDGER_FILE)]) == 1


def test_server_and_site_disagreeing_on_epsilon_is_a_mismatch(run_dir: Path) -> None:
    server = ServerLedger.open(RunDir(run_dir).server_ledger, run_dir.parent / "coordinator")
    server.append("round_report", {"round": 2, "node_id": 1000, "site_id": 0, "epsilon": 0.1, "ledger_seq": 3,
                                   "status": "trained", "aggregation": "fedavg"})
    report = audit_path(run_dir)
    assert {f.kind for f in report.sites[0].findings} == {SERVER_MISMATCH}


def test_deleted_site_ledger_is_missing(run_dir: Path) -> None:
    shutil.rmtree(run_dir / "sites" / "site-001")
    report = audit_path(run_dir)
    assert not report.ok
    assert [f.kind for s in report.sites for f in s.findings] == [chain.MISSING_LEDGER]


def test_forged_whole_ledger_caught_only_with_trusted_keys(run_dir: Path, tmp_path: Path) -> None:
    state = run_dir / "sites" / "site-000"
    for name in (L.LEDGER_FILE, "ledger.head"):
        (state / name).unlink()
    forger = init_site_key(tmp_path / "forger", "site-000")
    write_site(state, forger, HISTORY)  # same claims, a key nobody registered
    assert audit_path(run_dir).ok
    report = audit_path(run_dir, trusted_keys_dir=keys_dir(run_dir))
    assert chain.UNTRUSTED_KEY in {f.kind for f in report.sites[0].findings}


def test_torn_write_fails_the_audit_but_keeps_the_table(run_dir: Path, capsys) -> None:
    with open(run_dir / "sites" / "site-000" / L.LEDGER_FILE, "ab") as handle:
        handle.write(b'{"seq":6,"prev')
    assert cli_main(["audit", str(run_dir)]) == 1
    out = capsys.readouterr().out
    assert "torn_write" in out
    site_row = next(line for line in out.splitlines() if line.startswith("site-000"))
    assert " 4 " in site_row and "40" in site_row  # the four charged rounds are still audited


def test_site_budget_charges_audit_clean(tmp_path: Path) -> None:
    """The training loop's own charging path (write-ahead SiteBudget) produces an auditable ledger."""
    from fedssl.config import PrivacyConfig
    from fedssl.privacy.budget import SiteBudget

    state = tmp_path / "sites" / "site-000"
    spec = PrivacyConfig(target_epsilon=4.0, delta=1e-5, max_grad_norm=1.0)
    for round_ in range(1, 4):
        budget = SiteBudget.open(state, spec)  # reopened every round, as a fresh ClientApp process would
        budget.calibrate(sample_rate=0.05, planned_steps=60)
        budget.charge(run_id="demo", server_round=round_, sample_rate=0.05, steps=20)
    report = audit_path(state)
    assert report.ok, report.sites[0].findings
    assert len(report.sites[0].events) == 3
    assert report.sites[0].events[-1].epsilon_claimed <= 4.0 * (1 + 1e-9)


# ---------------------------------------------------------------- statement


def test_privacy_statement_says_what_is_and_is_not_covered() -> None:
    text = privacy_statement(
        sample_level=[{"site_id": "site-000", "epsilon": 2.5, "delta": 1e-5, "accountant": "rdp"},
                      {"site_id": "site-001", "epsilon": None, "delta": None, "accountant": None}],
        site_level=None, secure_aggregation=True, public_pretraining="ImageNet-1k",
    )
    for phrase in ("sample-level", "site-000: ε = 2.500, δ = 1e-05 (rdp accountant)", "site-001: no DP training recorded",
                   "weakest protection of any site is ε = 2.500", "Poisson", "torchcsprng", "secure_mode",
                   "no site-level", "several sites", "Labels", "not protected by differential privacy",
                   "Timing", "number of examples", "not an additional differential-privacy guarantee", "ImageNet-1k"):
        assert phrase in text, phrase
    with_site_level = privacy_statement(sample_level=[], site_level={"epsilon": 3.0, "delta": 1e-3, "mechanism": "DP-FedAvg"})
    assert "site-level guarantee of ε = 3.000" in with_site_level


def test_privacy_statement_names_exactly_what_a_dp_site_releases() -> None:
    """Every scalar the egress guard lets out under DP is named, and what it keeps back is said to stay."""
    from fedssl.fl import keys
    from fedssl.privacy.statement import RELEASED_UNDER_DP

    assert set(RELEASED_UNDER_DP) == keys.DP_RELEASED_METRICS
    text = privacy_statement(sample_level=[{"site_id": "site-000", "epsilon": 2.5, "delta": 1e-5, "accountant": "rdp"}])
    for phrase in (*RELEASED_UNDER_DP.values(), "pretext loss, its training time and its exact number of examples never leave",
                   "operating system's entropy", "1 / ⌈n / b⌉"):
        assert phrase in text, phrase
    assert "Side channels" not in text and "loss, step count" not in text
