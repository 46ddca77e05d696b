"""The ServerApp's two end-of-run records in a run dir: their one writer and their one reader.

SERVER_DONE says every planned round finished and the final encoder is saved; the driver starts on the
results the moment its name appears (fedssl.run.flower_runtime), so it is written atomically. SERVER_FAILED
is the ServerApp stopping the run itself, with the one line that says why (every site failed in a round).

Standard library only: the ServerApp writes them, the driver, `fedssl evaluate` and the benchmarks read them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from fedssl.errors import DataError
from fedssl.layout import RunDir


@dataclass(frozen=True)
class ServerDone:
    """SERVER_DONE: the run's rounds finished."""

    run_id: str  # the id the sites saw in every plan (a resumed run keeps its first one: fedssl.run.checkpoint)
    rounds: int  # the rounds the run planned, all of them done
    resumed_after: int | None  # the checkpoint's round when this run resumed; None when it ran from the start
    seconds: float  # the ServerApp's own time, from its start to the last round's end


def write_done(layout: RunDir, done: ServerDone) -> None:
    _write_atomically(layout.server_done, asdict(done))


def read_done(layout: RunDir) -> ServerDone:
    """The run's SERVER_DONE record; one DataError line naming the file when it is missing or not one."""
    path = layout.server_done
    try:
        body = json.loads(path.read_text())
        if not isinstance(body["run_id"], str):
            raise TypeError(f"run_id {body['run_id']!r} is not the string the sites saw")
        done = ServerDone(run_id=body["run_id"], rounds=int(body["rounds"]),
                          resumed_after=None if body["resumed_after"] is None else int(body["resumed_after"]),
                          seconds=float(body["seconds"]))
    except FileNotFoundError:
        raise DataError(f"{path}: missing; the federated run did not finish its rounds") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: not a server-done record ({type(err).__name__}: {err}); the ServerApp writes it, "
                        "so the run dir was changed after the run") from None
    return done


def write_failed(layout: RunDir, run_id: str, reason: str) -> None:
    _write_atomically(layout.server_failed, {"run_id": run_id, "reason": reason})


def stop_reason(layout: RunDir) -> str | None:
    """The line the ServerApp left when it stopped the run itself; None when it left no SERVER_FAILED."""
    path = layout.server_failed
    if not path.is_file():
        return None
    try:
        return str(json.loads(path.read_text())["reason"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"the server stopped the run; see {path}"


def _write_atomically(path: Path, body: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(body))
    tmp.replace(path)
