"""Dropout tolerance: with `simulation.dropout: 0.3` about 30 % of the sampled sites fail each round
(before training, as a crashed site would). The run completes on the others, each site is charged
only for the rounds it trained, and the audit still certifies every ledger."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from fedssl.config import load_config
from fedssl.errors import ConfigError
from fedssl.experiment import drops_out

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "experiments" / "digits-tiny.yaml"
FEDSSL = str(Path(sys.executable).parent / "fedssl")
SITES, ROUNDS, DROPOUT = 5, 3, 0.3


def tiny(*overrides: str):
    return load_config(str(TINY), [f"simulation.dropout={DROPOUT}", f"federation.num_sites={SITES}", *overrides])


def test_dropout_draws_are_reproducible_and_near_the_configured_rate() -> None:
    config = tiny()
    draws = [drops_out(config, site, rnd) for rnd in range(1, 201) for site in range(SITES)]
    assert draws == [drops_out(config, site, rnd) for rnd in range(1, 201) for site in range(SITES)]
    assert 0.25 < sum(draws) / len(draws) < 0.35
    other_seed = dataclasses.replace(config, run=dataclasses.replace(config.run, seed=1))
    assert draws != [drops_out(other_seed, site, rnd) for rnd in range(1, 201) for site in range(SITES)]
    assert not any(drops_out(tiny("simulation.dropout=0"), site, 1) for site in range(SITES))


@pytest.mark.parametrize("value", ["1.0", "-0.1"])
def test_dropout_out_of_range_is_one_line(value: str) -> None:
    with pytest.raises(ConfigError, match=r"simulation\.dropout: must be in \[0, 1\)"):
        tiny(f"simulation.dropout={value}")


@pytest.mark.slow
def test_a_federation_with_30_percent_dropout_completes_and_charges_only_trained_rounds(tmp_path: Path) -> None:
    config = tmp_path / "dropout.yaml"
    config.write_text(yaml.safe_dump({
        "include": [str(TINY)],
        "run": {"name": "dropout", "output_dir": str(tmp_path / "runs")},
        "federation": {"num_sites": SITES, "rounds": ROUNDS, "min_sites": 2},
        "simulation": {"dropout": DROPOUT},
        "evaluation": {"enabled": False},
    }))
    expected = {rnd: {s for s in range(SITES) if drops_out(tiny(), s, rnd)} for rnd in range(1, ROUNDS + 1)}
    # The seeded draw fails some sites in every round here, and never all of them (else the run would stop).
    assert all(0 < len(failing) < SITES for failing in expected.values()), expected

    done = subprocess.run([FEDSSL, "simulate", str(config), "--overwrite"], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    run_dir = tmp_path / "runs" / "dropout"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    site_rounds = [r for r in records if r["kind"] == "site_round"]
    for rnd, failing in expected.items():
        this_round = [r for r in site_rounds if r["round"] == rnd]
        trained = {r["site_id"] for r in this_round if r["status"] == "trained"}
        failed = [r for r in this_round if r["status"] == "failed"]
        assert trained == set(range(SITES)) - failing, (rnd, this_round)
        assert len(failed) == len(failing) and all("simulated dropout" in r["reason"] for r in failed), failed

    # Each site's ledger charged exactly the rounds it trained: a dropped round cost nothing.
    trained_rounds = Counter(r["site_id"] for r in site_rounds if r["status"] == "trained")
    for site in range(SITES):
        ledger = run_dir / "sites" / f"site-{site:03d}" / "ledger.jsonl"
        events = [json.loads(line) for line in ledger.read_text().splitlines() if '"dp_event"' in line]
        assert len(events) == trained_rounds[site], (site, len(events), trained_rounds[site])
    audit = subprocess.run([FEDSSL, "audit", str(run_dir)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert audit.returncode == 0, audit.stdout[-3000:] + audit.stderr[-2000:]
