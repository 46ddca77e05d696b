"""The dashboard's data model on a real DP site's files, no Flower (fast); on a real federation: test_live_run.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedssl.dashboard.page import render_page
from fedssl.dashboard.projection import project
from fedssl.dashboard.snapshot import SITE, NotARunError, build_snapshot, kind_of
from fedssl.privacy.ledger import Ledger
from fedssl.privacy.records import dp_events

ROOT = Path(__file__).resolve().parents[2]
FEDSSL = str(Path(sys.executable).parent / "fedssl")


def _ledger_epsilon(state_dir) -> float:
    return dp_events(Ledger(state_dir).records())[-1].epsilon_after


# ---------------------------------------------------------------- a real DP site, no Flower (fast)

def test_a_site_state_dir_is_shown_from_its_ledger_and_projection_matches_the_real_refusal(
        trained_site, state_copy, digits_site, make_plan, make_site):
    from fedssl.training.local import train_round

    state = state_copy(trained_site.after_round2)
    snapshot = build_snapshot(state)
    assert snapshot["kind"] == SITE and len(snapshot["sites"]) == 1
    site = snapshot["sites"][0]
    assert site["epsilon"] == _ledger_epsilon(state) and site["counts"]["trained"] == 2
    assert site["projection"]["refuses_round"] == 3
    # The site, asked for round 3, really refuses it: the projection named the right round.
    result = train_round(digits_site, trained_site.round2.encoder_state, make_plan(server_round=3), make_site(state))
    assert result.status == "refused"
    after = build_snapshot(state)["sites"][0]
    assert after["status"] == "refused" and "budget" in after["reason"]


def test_projection_with_room_left_names_a_later_round(trained_site):
    events = dp_events(Ledger(trained_site.after_round1).records())
    assert project(events[:1], planned_rounds=2).refuses_round == 3  # calibrated for exactly 2 rounds
    assert project([], planned_rounds=2) is None


def test_paths_that_are_not_runs_are_one_line_errors(tmp_path):
    with pytest.raises(NotARunError, match="no such directory"):
        kind_of(tmp_path / "missing")
    with pytest.raises(NotARunError, match="neither a run directory"):
        kind_of(tmp_path)
    done = subprocess.run([FEDSSL, "dashboard", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_ledger_text_cannot_close_the_script_element():
    page = render_page(live=False, snapshot={"reason": "</script><script>alert(1)</script>"})
    assert "</script><script>alert(1)" not in page


def test_the_dashboard_imports_neither_torch_nor_flower():
    code = ("import sys, fedssl.cli, fedssl.dashboard.app, fedssl.dashboard.snapshot, fedssl.dashboard.page; "
            "print(sorted(m for m in ('torch', 'flwr', 'opacus', 'matplotlib') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
