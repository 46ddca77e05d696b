"""Opt-in phase timestamps across the processes of a simulated run (stdlib only, cheap to import).

``fedssl simulate`` runs in at least five processes (flwr CLI, SuperLink, flwr-simulation with
the ServerApp, Ray workers with the ClientApp). When ``FEDSSL_PHASE_LOG`` names a file, each
:func:`mark` appends one JSON line ``{"t": wall-clock seconds, "pid": ..., "phase": ...}`` to it;
otherwise it does nothing. benchmarks/federation_overhead.py uses it to say where start-up goes.

When ``FEDSSL_STOP_AT`` names a phase, the process stops itself (SIGSTOP) on reaching that mark, so a
fault test can SIGKILL it exactly there (tests/privacy/test_kill_points.py): the code on the way is
the production path, unchanged.
"""

from __future__ import annotations

import json
import os
import signal
import time

ENV_VAR = "FEDSSL_PHASE_LOG"
STOP_VAR = "FEDSSL_STOP_AT"


def mark(phase: str, **fields: object) -> None:
    if os.environ.get(STOP_VAR) == phase:
        os.kill(os.getpid(), signal.SIGSTOP)
    path = os.environ.get(ENV_VAR)
    if not path:
        return
    line = json.dumps({"t": time.time(), "pid": os.getpid(), "phase": phase, **fields}) + "\n"
    try:
        # One short O_APPEND write per line: concurrent writers do not interleave.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    except OSError:
        pass


def read(path: str | os.PathLike[str]) -> list[dict]:
    try:
        with open(path) as handle:
            return [json.loads(line) for line in handle if line.strip()]
    except FileNotFoundError:
        return []
