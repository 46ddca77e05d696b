"""Reading a site's state dir as a test (and an auditor) sees it: ledger records, accountant history.

Plain readers of the files fedssl writes (fedssl.privacy.ledger, fedssl.privacy.accountant), kept
apart from the code under test so a test compares the files against an independent reading.
"""

from __future__ import annotations

import json
from pathlib import Path

from opacus.accountants import create_accountant


def ledger_records(state_dir: Path, kind: str | None = None) -> list[dict]:
    """Every record of the site's ledger.jsonl (of one ``kind`` if given); [] if there is none yet."""
    path = Path(state_dir) / "ledger.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if kind is None or r["kind"] == kind]


def dp_events(state_dir: Path) -> list[dict]:
    """The bodies of the ledger's dp_event records, in order."""
    return [r["body"] for r in ledger_records(state_dir, "dp_event")]


def accountant_history(state_dir: Path) -> list[list]:
    """The accountant's (σ, q, steps) history as stored in accountant.json."""
    return json.loads((Path(state_dir) / "accountant.json").read_text())["history"]


def opacus_epsilon(history, delta: float, accountant: str = "rdp") -> float:
    """The ε Opacus' own accountant gives for a (σ, q, steps) history: the reference the tests pin to."""
    acc = create_accountant(accountant)
    acc.history = [tuple(e) for e in history]
    return float(acc.get_epsilon(delta=delta))


def dp_event(round_: int, event: tuple[float, float, int], delta: float, epsilon_after: float, target: float,
             accountant: str = "rdp") -> dict:
    """The body of a dp_event ledger record for one (σ, q, steps) event, as a site writes it."""
    sigma, q, steps = event
    return {"run_id": "demo", "round": round_, "steps": steps, "sample_rate": q, "noise_multiplier": sigma,
            "max_grad_norm": 1.0, "delta": delta, "accountant": accountant, "epsilon_after": epsilon_after,
            "target_epsilon": target, "status": "charged"}
