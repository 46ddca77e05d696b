"""Kill points at a DP site: SIGKILL a real site process at four points of a round, restart it, and
replay the round as a coordinator does after losing the reply, then go on to the next round.

The points, in the order a round passes them (each a ``fedssl.phases.mark``; FEDSSL_STOP_AT stops the
process exactly there):
- ``budget_opened``: before training, holding the budget lock, nothing charged yet;
- ``round_charged``: right after the write-ahead charge reached the ledger;
- ``train_step``: mid-training, after the first of several DP steps;
- ``site_reply_ready``: trained and checked, the reply not yet sent (a crash while sending loses it).

After each: the lock is free, the ledger verifies, ε never under-counts (the ledger holds every charge
and each reported ε is the accountant's over all of them), a charged round is never trained or charged
twice (the replay is refused with its reason), and the next round trains.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.site_layout import write_site_yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CHILD = """
import json, sys
from fedssl.fl.plan import TrainPlan
from fedssl.fl import keys
from fedssl.models import build_encoder
from fedssl.site_round import run_site_round

site_yaml, rounds = sys.argv[1], [int(r) for r in sys.argv[2].split(",")]
state = build_encoder("cnn", (1, 8, 8), width=4, depth=1, seed=0).state_dict()
for server_round in rounds:
    plan = TrainPlan(run_id="kill-run", server_round=server_round, planned_rounds=3, pretext="rotation",
                     encoder="cnn", width=4, depth=1, local_steps=4, batch_size=8, lr=0.05)
    reply = run_site_round({keys.NODE_SITE_CONFIG: site_yaml}, {}, plan.to_wire(), state)
    r = reply.result
    print(json.dumps({"round": server_round, "status": r.status, "epsilon": r.epsilon, "reason": r.reason}), flush=True)
"""


def _site(tmp_path: Path) -> Path:
    from fedssl.data.loaders import load_digits_labeled

    rows = load_digits_labeled()[0].subset(list(range(64))).inputs.numpy()
    np.save(tmp_path / "data.npy", rows)
    site_yaml = write_site_yaml(tmp_path, target_epsilon=8.0)
    config = yaml.safe_load(site_yaml.read_text())
    config["privacy"]["min_noise_multiplier"] = 0.3  # 3 rounds x 4 steps at ε 8 calibrate below the default floor
    site_yaml.write_text(yaml.safe_dump(config))
    return site_yaml


def _child(site_yaml: Path, rounds: str, stop_at: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("FEDSSL_STOP_AT", None)
    if stop_at:
        env["FEDSSL_STOP_AT"] = stop_at
    return subprocess.Popen([sys.executable, "-c", CHILD, str(site_yaml), rounds], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _stopped(pid: int) -> bool:
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state == "T"


def _kill_when_stopped(proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not _stopped(proc.pid):
        assert proc.poll() is None, f"the site exited before the kill point: {proc.communicate()}"
        assert time.monotonic() < deadline, "the site never reached the kill point"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _dp_events(state_dir: Path) -> list[dict]:
    lines = (state_dir / "ledger.jsonl").read_text().splitlines() if (state_dir / "ledger.jsonl").exists() else []
    return [record for record in map(json.loads, lines) if record.get("kind") == "dp_event"]


@pytest.mark.parametrize("point", ["budget_opened", "round_charged", "train_step", "site_reply_ready"])
def test_a_site_killed_at_each_point_restarts_without_undercounting_or_double_training(point: str, tmp_path: Path) -> None:
    from fedssl.deploy.site.config import load_site_config
    from fedssl.privacy.analysis import epsilon_of
    from fedssl.privacy.ledger import Ledger

    site_yaml = _site(tmp_path)
    state_dir = load_site_config(site_yaml).state_path
    killed = _child(site_yaml, "1", stop_at=point)
    _kill_when_stopped(killed)
    charged_at_kill = [e["body"]["round"] for e in _dp_events(state_dir)]
    assert charged_at_kill == ([] if point == "budget_opened" else [1]), charged_at_kill

    # The restarted site gets round 1 again (the coordinator never saw a reply), then round 2.
    restarted = _child(site_yaml, "1,2")
    out, err = restarted.communicate(timeout=300)
    assert restarted.returncode == 0, err[-3000:]
    first, second = (json.loads(line) for line in out.splitlines() if line.startswith("{"))
    if point == "budget_opened":  # nothing was charged: round 1 trains now, once
        assert first["status"] == "trained", first
    else:  # charged before the crash: the replay is refused, never trained or charged a second time
        assert first["status"] == "refused" and "already trained round 1" in first["reason"], first
    assert second["status"] == "trained", second

    events = _dp_events(state_dir)
    assert [e["body"]["round"] for e in events] == [1, 2]  # each round charged exactly once
    assert Ledger(state_dir).verify().ok
    # The accountant's state agrees with the ledger after the kill: ε is the accountant's over both charges.
    state = json.loads((state_dir / "accountant.json").read_text())
    history = [tuple(step) for step in state["history"]]
    assert len(history) == 2
    assert second["epsilon"] == pytest.approx(epsilon_of(history, state["mechanism"]["delta"], state["mechanism"]["accountant"]))
    assert first["epsilon"] <= second["epsilon"]
