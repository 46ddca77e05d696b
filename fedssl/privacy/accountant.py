"""A site's privacy accountant, persisted on the site's own disk.

Opacus keeps its accountant inside a ``PrivacyEngine``; a new engine per round starts
again at ε = 0. Here the composed history lives in ``<state_dir>/accountant.json`` and
is written (atomically, fsynced) *before* an update leaves the site, so ε accumulates
across rounds, restarts and crashes, and a crash can only over-count.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedssl.errors import PrivacyError
from fedssl.privacy.analysis import epsilon_of
from fedssl.privacy.durable import replace_durably
from fedssl.privacy.records import Event, Mechanism

ACCOUNTANT_FILE = "accountant.json"
STATE_VERSION = 1


@dataclass
class AccountantState:
    mechanism: Mechanism
    history: list[Event] = field(default_factory=list)

    def epsilon(self, extra: list[Event] | None = None) -> float:
        return epsilon_of(self.history + (extra or []), self.mechanism.delta, self.mechanism.accountant)

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "mechanism": self.mechanism.body(), "history": [list(e) for e in self.history]}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> AccountantState:
        if state.get("version") != STATE_VERSION:
            raise PrivacyError(f"{ACCOUNTANT_FILE}: unsupported version {state.get('version')!r}")
        mech = Mechanism(**state["mechanism"])
        history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]
        return cls(mechanism=mech, history=history)


def accountant_path(state_dir: Path) -> Path:
    return Path(state_dir) / ACCOUNTANT_FILE


def load_accountant(state_dir: Path) -> AccountantState | None:
    """The saved state, or None if the site never trained. Unreadable state raises."""
    path = accountant_path(state_dir)
    if not path.exists():
        return None
    try:
        return AccountantState.from_state_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as err:
        raise PrivacyError(
            f"{path}: privacy state is unreadable ({err}); refusing to train. "
            f"Restore it from backup, or move it aside: the site then rebuilds it from its signed ledger ({path.parent / 'ledger.jsonl'})"
        ) from None


def save_accountant(state_dir: Path, state: AccountantState) -> None:
    """Write atomically and durably: a torn file must never read as a smaller ε."""
    replace_durably(accountant_path(state_dir), json.dumps(state.state_dict(), indent=1))
