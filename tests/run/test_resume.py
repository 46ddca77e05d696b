"""`--resume` without Flower: the checkpoint file, the logs' reconciliation, bad run dirs, and the site's rule
for a round re-sent by a resumed coordinator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedssl.cli import main
from fedssl.layout import RunDir
from fedssl.privacy.ledger import ServerLedger
from fedssl.run.checkpoint import Checkpoint, check_resumable, load_checkpoint, reconcile_logs, save_checkpoint
from fedssl.runlog import RunLog

ENCODER = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(3)}


def _run_dir(tmp_path: Path, completed: int = 1, rounds: int = 3) -> RunDir:
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.config.write_text("run:\n  name: run\n")
    save_checkpoint(run, Checkpoint(round=completed, planned_rounds=rounds, run_id="42", encoder=ENCODER,
                                    metrics_bytes=0, ledger_records=0))
    return run


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_checkpoint_round_trips(tmp_path):
    run = _run_dir(tmp_path)
    checkpoint = load_checkpoint(run)
    assert (checkpoint.round, checkpoint.planned_rounds, checkpoint.run_id) == (1, 3, "42")
    assert all(torch.equal(checkpoint.encoder[k], ENCODER[k]) for k in ENCODER)
    assert not checkpoint.finished
    assert [p.name for p in run.path.iterdir() if p.name.endswith(".tmp")] == []  # durable replace left no temp file


def _refused(capsys, run_dir: Path, *words: str) -> None:
    before = _snapshot(run_dir) if run_dir.is_dir() else None
    assert main(["simulate", "--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedssl: error:"), err
    assert "Traceback" not in err[0]
    for word in words:
        assert word in err[0], err[0]
    if before is not None:
        assert _snapshot(run_dir) == before  # nothing deleted or changed


def test_not_a_run_dir(tmp_path, capsys):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    _refused(capsys, tmp_path / "other", "not a run directory", "--resume runs/")
    _refused(capsys, tmp_path / "missing", "not a run directory")


def test_no_checkpoint(tmp_path, capsys):
    run = _run_dir(tmp_path)
    run.checkpoint.unlink()
    _refused(capsys, run.path, "no checkpoint.pt", "--overwrite")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupted_checkpoint(tmp_path, capsys, damage):
    run = _run_dir(tmp_path)
    data = run.checkpoint.read_bytes()
    run.checkpoint.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"not a checkpoint", "empty": b""}[damage])
    _refused(capsys, run.path, "unreadable checkpoint", "cannot be resumed")


def test_foreign_pickle_is_not_a_checkpoint(tmp_path):
    run = _run_dir(tmp_path)
    torch.save({"format": 1, "round": "one"}, run.checkpoint)
    with pytest.raises(Exception, match="unreadable checkpoint"):
        load_checkpoint(run)


def test_finished_run(tmp_path, capsys):
    run = _run_dir(tmp_path)
    run.server_done.write_text("{}")
    _refused(capsys, run.path, "already finished", "nothing to resume")


def test_resume_takes_no_config_or_overrides(tmp_path, capsys):
    run = _run_dir(tmp_path)
    assert main(["simulate", "some.yaml", "--resume", str(run.path), "--set", "a=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "drop CONFIG, --set" in err[0]


def test_check_resumable_returns_the_checkpoint(tmp_path):
    assert check_resumable(_run_dir(tmp_path, completed=2)).round == 2


def test_reconcile_cuts_metrics_back_and_records_the_resume(tmp_path):
    run = _run_dir(tmp_path)
    log, ledger = RunLog(run.path), ServerLedger.open(run.server_ledger, run.path)
    log.append("round", round=1, num_sites=1, num_trained=1, mean_pretext_loss=1.0, max_epsilon=1.0, seconds=1.0)
    ledger.append("reply_dropped", {"round": 1, "node_id": 1, "reason": "x"})
    save_checkpoint(run, Checkpoint(round=1, planned_rounds=3, run_id="42", encoder=ENCODER,
                                    metrics_bytes=run.metrics.stat().st_size, ledger_records=len(ledger.records())))
    kept = run.metrics.read_bytes()
    # Killed after round 2's records, before its checkpoint: they describe a round that runs again.
    log.append("round", round=2, num_sites=1, num_trained=1, mean_pretext_loss=1.0, max_epsilon=1.0, seconds=1.0)
    ledger.append("reply_dropped", {"round": 2, "node_id": 1, "reason": "x"})
    assert reconcile_logs(run, load_checkpoint(run), ledger) == 1
    assert run.metrics.read_bytes() == kept
    records = ledger.records()
    assert records[-1]["kind"] == "resumed" and records[-1]["body"] == {"round": 1, "run_id": "42", "superseded_records": 1}
    assert ledger.verify().ok  # the chain stays whole and signed: nothing of the witness is cut


def test_a_round_the_site_already_charged_is_refused_not_charged_again(tmp_path):
    """A resumed coordinator re-sends the round whose reply was lost: the site refuses it, ε unchanged."""
    from fedssl.privacy.budget import RefusedError, SiteBudget
    from fedssl.privacy.policy import ROUND_ORDER, RoundRequest
    from fedssl.privacy.settings import PrivacyConfig

    spec = PrivacyConfig(target_epsilon=8.0, min_noise_multiplier=0.3)
    state = tmp_path / "site"
    budget = SiteBudget.open(state, spec)
    request = RoundRequest(run_id="42", server_round=2, planned_rounds=3, sample_rate=0.1, steps=3)
    budget.admit(request)
    spent = budget.epsilon_spent
    with pytest.raises(RefusedError) as refused:
        SiteBudget.open(state, spec).admit(request)  # the re-sent round, same run id
    assert refused.value.rule == ROUND_ORDER
    again = SiteBudget.open(state, spec)
    assert again.epsilon_spent == spent and again.steps_taken == 3
    # Another run (a fresh start, not a resume) trains that round anew: a new release, charged again.
    again.admit(RoundRequest(run_id="43", server_round=2, planned_rounds=3, sample_rate=0.1, steps=3))
    assert SiteBudget.open(state, spec).epsilon_spent > spent


def test_check_resumable_changes_nothing(tmp_path):
    run = _run_dir(tmp_path)
    before = json.dumps(_snapshot(run.path), default=str)
    check_resumable(run.path)
    assert json.dumps(_snapshot(run.path), default=str) == before


def _saved_run(tmp_path: Path, *overrides: str) -> RunDir:
    from fedssl.config import load_config, save_config

    tiny = Path(__file__).resolve().parents[2] / "configs" / "experiments" / "digits-tiny.yaml"
    config = load_config(tiny, [f"run.output_dir={tmp_path}", "warm_start.source=none", "model.input_shape=[1,8,8]", *overrides])
    run = RunDir(tmp_path / config.run.name)
    run.path.mkdir(parents=True)
    save_config(config, run.config)
    save_checkpoint(run, Checkpoint(round=1, planned_rounds=config.federation.rounds, run_id="42", encoder=ENCODER,
                                    metrics_bytes=0, ledger_records=0))
    return run


class _Launcher:
    evaluation_optional, results_timeout, simulates_sites = False, 7.0, True

    def __init__(self) -> None:
        self.calls: list = []

    def describe(self, config):
        return "fake"

    def summary_fields(self):
        return {}

    def start(self, config, run_dir, resume=False):
        self.calls.append(("start", resume, config.run.name))
        launcher = self

        class Federation:
            def wait_for_results(self, timeout=None):
                raise KeyboardInterrupt  # stop before evaluation and report: only the start is under test

            def abort(self):
                launcher.calls.append("abort")

        return Federation()


def test_resume_pipeline_starts_the_saved_config_from_its_checkpoint(tmp_path):
    from fedssl.run.pipeline import resume_pipeline

    run = _saved_run(tmp_path)
    run.server_failed.write_text("{}")  # a stale stop marker from before would end the resumed run at once
    launcher, said = _Launcher(), []
    with pytest.raises(KeyboardInterrupt):
        resume_pipeline(run.path, launcher, evaluate=False, echo=said.append)
    assert launcher.calls == [("start", True, "digits-tiny"), "abort"]
    assert not run.server_failed.exists()
    assert "resuming after round 1 of 2 (run id 42)" in said[-1]


def test_resume_pipeline_refuses_a_changed_config_and_secagg(tmp_path):
    from fedssl.run.checkpoint import ResumeError
    from fedssl.run.pipeline import resume_pipeline

    run = _saved_run(tmp_path / "a")
    save_checkpoint(run, Checkpoint(round=1, planned_rounds=5, run_id="42", encoder=ENCODER, metrics_bytes=0, ledger_records=0))
    with pytest.raises(ResumeError, match="plans 2 rounds, its checkpoint 5"):
        resume_pipeline(run.path, _Launcher(), evaluate=False)
    secagg = _saved_run(tmp_path / "b", "secure_aggregation.enabled=true")
    with pytest.raises(ResumeError, match="SecAgg"):
        resume_pipeline(secagg.path, _Launcher(), evaluate=False)
