"""The dashboard on a real tiny federation: its snapshot, and its page in a real headless browser (Debian's
chromium) served by the real `fedssl dashboard`. One module, so pytest-xdist's --dist loadfile runs the
session's simulation once."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fedssl.audit.ledgers import audit_path
from fedssl.dashboard.snapshot import RUN, build_snapshot, signature
from fedssl.evaluation.results import SCORED_ON_VALIDATION
from fedssl.privacy.ledger import Ledger
from fedssl.privacy.records import dp_events
from fedssl.runlog import KIND_ROUND, KIND_SITE_ROUND, RunLog, read_metrics

pytestmark = pytest.mark.slow

FEDSSL = str(Path(sys.executable).parent / "fedssl")
ROOT = Path(__file__).resolve().parents[2]


def _ledger_epsilon(state_dir) -> float:
    return dp_events(Ledger(state_dir).records())[-1].epsilon_after


def _tamper(ledger_path) -> None:
    """Lower the ε of the last dp_event by hand, as someone hiding spend would (hash and signature now stale)."""
    lines = ledger_path.read_text().splitlines()
    last = max(i for i, line in enumerate(lines) if json.loads(line)["kind"] == "dp_event")
    record = json.loads(lines[last])
    record["body"]["epsilon_after"] = record["body"]["epsilon_after"] / 8
    lines[last] = json.dumps(record)
    ledger_path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------- the snapshot

def test_snapshot_of_a_finished_run_matches_metrics_ledgers_and_audit(tiny_run):
    snapshot = build_snapshot(tiny_run)
    site_rounds, rounds = read_metrics(tiny_run / "metrics.jsonl")
    assert snapshot["kind"] == RUN and snapshot["state"] == "finished"
    assert snapshot["rounds"]["done"] == len(rounds) == 2 and snapshot["rounds"]["planned"] == 2
    assert [s["name"] for s in snapshot["sites"]] == ["site-000", "site-001"]
    report = audit_path(tiny_run)
    assert snapshot["audit"]["ok"] is report.ok is True
    for site in snapshot["sites"]:
        state_dir = tiny_run / "sites" / site["name"]
        assert site["epsilon"] == _ledger_epsilon(state_dir)
        assert site["target_epsilon"] == 8.0 and site["counts"] == {"trained": 2, "refused": 0, "failed": 0}
        assert site["ledger"] == {**site["ledger"], "ok": True, "status": "verified", "findings": []}
        # The plan was calibrated to spend the whole budget in 2 rounds: a third does not fit.
        assert site["projection"]["refuses_round"] == 3
    assert json.loads(json.dumps(snapshot, allow_nan=False)) == snapshot  # plain JSON, no NaN
    assert snapshot["evaluation"]["rows"] and "label_efficiency.png" in snapshot["plots"]
    titles = [row[0] for row in snapshot["evaluation"]["rows"]]
    assert titles[:2] == ["raw_input (pixels)", "handcrafted_probe (gabor bank)"]  # the features each baseline probed
    assert "handcrafted_probe" in snapshot["evaluation"]["series"]
    assert "What is guaranteed" in snapshot["statement"] and report.statement.endswith(snapshot["statement"])


def test_the_quick_snapshot_leaves_only_the_audit_pending(tiny_run):
    quick, full = build_snapshot(tiny_run, audit=False), build_snapshot(tiny_run)
    assert quick["audit"] == {"ok": None, "pending": True, "server": None} and full["audit"]["pending"] is False
    for fast, audited in zip(quick["sites"], full["sites"], strict=True):
        assert fast["name"] == audited["name"] and fast["ledger"]["status"] == "verifying…"
        assert fast["epsilon"] == audited["epsilon"]  # the server's record of the ledger's claim
        assert fast["rounds"] == audited["rounds"] and fast["counts"] == audited["counts"]
    assert quick["rounds"] == full["rounds"] and quick["statement"] == ""


def test_a_new_round_and_a_failed_site_land_in_the_next_snapshot(run_copy):
    before = signature(run_copy)
    log = RunLog(run_copy)
    log.append(KIND_SITE_ROUND, round=3, site_id=1, node_id=7, status="failed", reason="reply rejected: weights not finite")
    log.append(KIND_ROUND, round=3, num_sites=2, num_trained=0, mean_pretext_loss=float("nan"), max_epsilon=float("nan"), seconds=1.5)
    assert signature(run_copy) != before
    snapshot = build_snapshot(run_copy)
    assert snapshot["rounds"]["done"] == 3
    site = next(s for s in snapshot["sites"] if s["name"] == "site-001")
    assert (site["status"], site["reason"], site["counts"]["failed"]) == ("failed", "reply rejected: weights not finite", 1)


def test_a_tampered_ledger_fails_verification_in_the_snapshot(run_copy):
    _tamper(run_copy / "sites" / "site-001" / "ledger.jsonl")
    snapshot = build_snapshot(run_copy)
    by_name = {s["name"]: s for s in snapshot["sites"]}
    assert by_name["site-000"]["ledger"]["ok"] is True
    bad = by_name["site-001"]["ledger"]
    assert bad["ok"] is False and bad["status"].startswith("FAIL") and bad["findings"]
    assert snapshot["audit"]["ok"] is False


def test_export_is_one_self_contained_file(tiny_run, tmp_path):
    out = tmp_path / "report.html"
    done = subprocess.run([FEDSSL, "dashboard", str(tiny_run), "--export", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    html = out.read_text()
    assert "<script src" not in html and "<link" not in html and "<img src=\"http" not in html  # nothing to fetch
    assert '"live": false' in html and "site-001" in html


# ---------------------------------------------------------------- the page

RED = "rgb(207, 34, 46)"  # --bad in dashboard.css
GREEN = "rgb(26, 127, 55)"  # --ok


def _site_row(page, name: str):
    return page.locator(f'#sites tbody tr[data-site="{name}"]')


def _wait_for_sites(page, count: int) -> None:
    """Until the page shows ``count`` sites from an audited snapshot (the quick one leaves the ledgers pending)."""
    page.wait_for_function(f"document.querySelectorAll('#sites tbody tr').length === {count} "
                           "&& document.body.dataset.audited === 'true'", timeout=60_000)


def test_page_shows_every_site_with_its_ledger_epsilon(tiny_run, start_dashboard, page):
    dashboard = start_dashboard(tiny_run)
    assert dashboard.banner.startswith("fedssl: dashboard of") and "127.0.0.1" in dashboard.banner
    page.goto(dashboard.url())
    _wait_for_sites(page, 2)
    for name in ("site-000", "site-001"):
        row = _site_row(page, name)
        expected = _ledger_epsilon(tiny_run / "sites" / name)
        assert row.locator(".eps").inner_text() == f"{expected:.3f}"
        assert row.locator(".target").inner_text() == "8.000"
        assert "verified" in row.locator("td.ledger").inner_text()
        assert row.locator("td.ledger").evaluate("e => getComputedStyle(e).color") == GREEN
        assert "round 3" in row.locator(".projection").inner_text()
    assert page.locator("#rounds-done").inner_text() == "2 / 2"
    assert page.locator("#participation tbody tr").count() == 2
    assert page.locator("#chart-epsilon canvas").count() == 1  # uPlot drew the ε chart
    assert page.locator("#evaluation tbody tr").count() >= 2 and "What is guaranteed" in page.locator("#statement").inner_text()
    assert page.locator("#evaluation-labels").inner_text().startswith("Test accuracy, mean ± std over seeds.")
    assert page.errors == []


def _scored_on_validation(run_dir: Path) -> None:
    """The run's evaluation.json as `evaluation.score_on: validation` writes it (the plan records the setting)."""
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    evaluation["plan"]["score_on"] = "validation"
    (run_dir / "evaluation.json").write_text(json.dumps(evaluation))


def test_a_run_scored_on_validation_says_so_in_the_snapshot_and_on_the_page(run_copy, start_dashboard, page):
    _scored_on_validation(run_copy)
    evaluation = build_snapshot(run_copy, audit=False)["evaluation"]
    assert evaluation["scored_on"] == "validation" and evaluation["labels"].endswith(" validation")
    assert SCORED_ON_VALIDATION in evaluation["notes"]
    page.goto(start_dashboard(run_copy).url())
    page.wait_for_function("document.getElementById('evaluation-labels').textContent.length > 0")
    assert page.locator("#evaluation-labels").inner_text().startswith("Validation accuracy, mean ± std over seeds.")
    assert SCORED_ON_VALIDATION in page.locator("#evaluation-notes").inner_text()
    assert page.errors == []


def test_page_updates_when_a_new_round_lands(run_copy, start_dashboard, page):
    dashboard = start_dashboard(run_copy)
    page.goto(dashboard.url())
    _wait_for_sites(page, 2)  # settled: the audited snapshot of the 2 rounds is on screen
    log = RunLog(run_copy)
    landed = time.monotonic()
    log.append(KIND_SITE_ROUND, round=3, site_id=0, node_id=11, status="refused", epsilon=7.9986, target_epsilon=8.0,
               delta=1e-5, pretext_loss=float("nan"), num_examples=0, steps=0, train_seconds=0.0,
               reason="budget exhausted: round 3 would raise epsilon above the site's target 8")
    log.append(KIND_SITE_ROUND, round=3, site_id=1, node_id=12, status="failed", reason="reply rejected: weights not finite")
    log.append(KIND_ROUND, round=3, num_sites=2, num_trained=0, mean_pretext_loss=float("nan"), max_epsilon=7.9986, seconds=1.0)
    page.wait_for_function("document.getElementById('rounds-done').dataset.done === '3'", timeout=15_000)
    latency = time.monotonic() - landed
    print(f"\ndashboard refresh latency: {latency:.2f} s from the round record's append to the page showing it")
    assert latency < 10
    assert "refused" in _site_row(page, "site-000").inner_text() and "budget exhausted" in _site_row(page, "site-000").inner_text()
    assert "reply rejected" in _site_row(page, "site-001").inner_text()
    assert page.locator('#participation tr[data-site="site-001"] td.st-failed').count() == 1


def test_a_tampered_ledger_shows_red(run_copy, start_dashboard, page):
    _tamper(run_copy / "sites" / "site-001" / "ledger.jsonl")
    dashboard = start_dashboard(run_copy)
    page.goto(dashboard.url())
    _wait_for_sites(page, 2)
    cell = _site_row(page, "site-001").locator("td.ledger")
    assert "FAIL" in cell.inner_text()
    assert cell.evaluate("e => getComputedStyle(e).color") == RED
    assert _site_row(page, "site-000").locator("td.ledger").evaluate("e => getComputedStyle(e).color") == GREEN
    assert page.locator("#audit-status").inner_text() == "verification FAILED"


def test_exported_report_renders_offline_and_fetches_nothing(tiny_run, tmp_path, page):
    out = tmp_path / "report.html"
    subprocess.run([FEDSSL, "dashboard", str(tiny_run), "--export", str(out)], check=True, capture_output=True)
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(out.as_uri())
    _wait_for_sites(page, 2)
    assert requested == [out.as_uri()]  # no script, style, font or data from anywhere else
    assert page.locator("#live-text").inner_text() == "exported report"
    assert page.locator("#plots img").count() == 3 and page.errors == []


def _status(url: str, method: str = "GET") -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_exposed_dashboard_requires_its_token(tiny_run, start_dashboard, page):
    """The attack: reach an exposed dashboard without the token, from a browser and from a script."""
    dashboard = start_dashboard(tiny_run, "--host", "0.0.0.0", "--expose", "--token", "s3cret-token", token="s3cret-token")
    assert "s3cret-token" not in dashboard.banner  # a token the user chose is not echoed
    response = page.goto(dashboard.url())
    assert response.status == 401 and "token" in page.content()
    for path in ("/", "/events", "/snapshot.json"):
        assert _status(dashboard.url(path)) == 401
        assert _status(dashboard.url(path, token="wrong")) == 401
    assert _status(dashboard.url("/snapshot.json", token="s3cret-token")) == 200
    assert _status(dashboard.url("/", token="s3cret-token"), method="POST") == 405  # read-only
    page.goto(dashboard.url(token="s3cret-token"))
    _wait_for_sites(page, 2)  # the page's event stream carried the token too


def test_exposed_without_a_token_generates_one_and_prints_it_once(tiny_run, start_dashboard):
    dashboard = start_dashboard(tiny_run, "--host", "0.0.0.0", "--expose")
    token = dashboard.banner.split("?token=", 1)[1].split()[0]
    assert len(token) >= 24
    assert _status(dashboard.url("/snapshot.json")) == 401
    assert _status(dashboard.url("/snapshot.json", token=token)) == 200
