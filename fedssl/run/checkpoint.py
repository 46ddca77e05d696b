"""The coordinator's resumable checkpoint: what a killed run needs to continue from its last completed round.

After every completed round the ServerApp replaces ``checkpoint.pt`` (RunDir.checkpoint) durably
(temp file, fsync, rename: fedssl.privacy.durable): a reader sees the previous round's checkpoint or
this one, never half of one. It holds

- the global encoder after ``round`` and ``round`` itself (0: the initial encoder, before any round);
- ``run_id``, the id the sites saw in every plan: a resumed run sends the same one, so each site's
  ledger, per-run policy (rounds, ε cap) and round order keep counting the one run (fedssl.privacy.policy);
- where metrics.jsonl (bytes) and the server ledger (records) stood when the round completed: a kill
  between a round's records and its checkpoint leaves records of a round that will run again.
  :func:`reconcile_logs` cuts metrics.jsonl (a plain log, derived) back to the checkpoint, and leaves
  the signed, hash-chained server ledger whole (its records are the witness of what the sites said)
  with a ``resumed`` record naming how many records before it belong to the interrupted round;
- ``strategy``: the aggregation state. FedAvg, FedMedian and FedTrimmedAvg keep none between rounds
  (each round is a function of the global encoder and the replies); the site-level DP accountant and
  the sites' watermarks already live on disk. The node-to-site bindings (server/guard.py) are not
  kept: node ids are issued per SuperLink, and a restarted one issues new ones.

Loaded with ``torch.load(weights_only=True)``: tensors, numbers and strings only, never a pickle.
Imports torch but no training code: the ServerApp uses it.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from fedssl.errors import FedSSLError
from fedssl.layout import RunDir
from fedssl.privacy.durable import replace_durably
from fedssl.privacy.records import RESUMED

FORMAT = 1


class ResumeError(FedSSLError):
    """A run directory that cannot be resumed: one line naming the problem and the fix."""


@dataclass(frozen=True)
class Checkpoint:
    round: int  # rounds completed
    planned_rounds: int
    run_id: str
    encoder: dict[str, torch.Tensor]
    metrics_bytes: int  # metrics.jsonl's size when the round completed
    ledger_records: int  # the server ledger's record count when the round completed
    strategy: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.round >= self.planned_rounds


class Ledger(Protocol):
    def records(self) -> list[dict[str, Any]]: ...

    def append(self, kind: str, body: dict[str, Any]) -> dict[str, Any]: ...


def save_checkpoint(run_dir: RunDir, checkpoint: Checkpoint) -> None:
    """Replace the run's checkpoint durably (the previous one stays whole until the rename)."""
    buffer = io.BytesIO()
    body = asdict(checkpoint)
    body["encoder"] = {name: t.detach().cpu().clone() for name, t in checkpoint.encoder.items()}
    torch.save({"format": FORMAT, **body}, buffer)
    replace_durably(RunDir(run_dir).checkpoint, buffer.getvalue())


def checkpoint_now(run_dir: RunDir, ledger: Ledger, *, completed: int, planned_rounds: int, run_id: str,
                   encoder: dict[str, torch.Tensor], strategy: dict[str, Any]) -> Checkpoint:
    """The checkpoint of a round that just completed, with where the run's logs stand now; saved."""
    metrics = RunDir(run_dir).metrics
    checkpoint = Checkpoint(round=completed, planned_rounds=planned_rounds, run_id=run_id, encoder=encoder,
                            metrics_bytes=metrics.stat().st_size if metrics.exists() else 0,
                            ledger_records=len(ledger.records()), strategy=strategy)
    save_checkpoint(run_dir, checkpoint)
    return checkpoint


def load_checkpoint(run_dir: RunDir) -> Checkpoint:
    """The run's checkpoint; a :class:`ResumeError` naming the problem if it is missing or unreadable."""
    path = RunDir(run_dir).checkpoint
    if not path.is_file():
        raise ResumeError(f"{run_dir}: no {path.name}: the coordinator stopped before it completed a round, so there is "
                          f"nothing to resume; start the run again: fedssl simulate {RunDir(run_dir).config} --overwrite")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        checkpoint = _from_raw(raw)
    except Exception as err:  # torch raises many kinds for a truncated or foreign file: all mean the same here
        detail = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise ResumeError(f"{path}: unreadable checkpoint (truncated or corrupted: {detail}); it cannot be resumed. "
                          f"Start the run again: fedssl simulate {RunDir(run_dir).config} --overwrite") from None
    return checkpoint


def _from_raw(raw: Any) -> Checkpoint:
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ValueError(f"not a fedssl checkpoint of format {FORMAT}")
    values = {k: raw[k] for k in ("round", "planned_rounds", "run_id", "encoder", "metrics_bytes", "ledger_records", "strategy")}
    checkpoint = Checkpoint(**values)
    ints = (checkpoint.round, checkpoint.planned_rounds, checkpoint.metrics_bytes, checkpoint.ledger_records)
    if not all(isinstance(v, int) and v >= 0 for v in ints) or not isinstance(checkpoint.run_id, str):
        raise ValueError("fields out of range")
    if not isinstance(checkpoint.encoder, dict) or not all(isinstance(t, torch.Tensor) for t in checkpoint.encoder.values()):
        raise ValueError("no encoder state")
    return checkpoint


def check_resumable(run_dir: Path) -> Checkpoint:
    """The checkpoint to resume ``run_dir`` from; a one-line :class:`ResumeError` for a directory that is
    not a run dir, has no readable checkpoint, or whose run already finished. Reads only, deletes nothing."""
    layout = RunDir(Path(run_dir))
    if not layout.path.is_dir() or not layout.config.is_file():
        raise ResumeError(f"{run_dir}: not a run directory (no {layout.config.name}); pass the directory a run "
                          "wrote, e.g. --resume runs/<run.name>")
    if layout.server_done.is_file():
        raise ResumeError(f"{run_dir}: this run already finished ({layout.server_done.name}); nothing to resume. "
                          "Rewrite its report with `fedssl report`, or start a new run under another run.name")
    return load_checkpoint(layout)


def reconcile_logs(run_dir: RunDir, checkpoint: Checkpoint, ledger: Ledger) -> int:
    """Before a resumed run's first round: metrics.jsonl back to the checkpoint, a ``resumed`` record in
    the server ledger. Returns how many server-ledger records belong to the interrupted round."""
    metrics = RunDir(run_dir).metrics
    if metrics.exists() and metrics.stat().st_size > checkpoint.metrics_bytes:
        # Only whole lines of the rounds up to the checkpoint stay; the interrupted round is recorded again.
        replace_durably(metrics, metrics.read_bytes()[: checkpoint.metrics_bytes])
    superseded = max(0, len(ledger.records()) - checkpoint.ledger_records)
    ledger.append(RESUMED, {"round": checkpoint.round, "run_id": checkpoint.run_id, "superseded_records": superseded})
    return superseded
