"""The privacy ledgers' record bodies: each kind defined once, written and parsed here.

A site's ledger holds ``site_init``, ``budget`` (its DP-SGD :class:`Mechanism`), ``dp_event``
(:class:`DPEvent`: one charged round), ``refusal`` and ``recovery`` records; the server's holds
``server_init`` and ``round_report``. The budget writes these bodies, the site's status and the
audit read them back, and the ledger's schema (what verification requires of each body) is
derived from the same dataclasses, so the three cannot disagree about a field.

Standard library only (and fedssl.errors).
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

from fedssl.errors import PrivacyError

# Record kinds.
SITE_INIT = "site_init"
BUDGET = "budget"
DP_EVENT = "dp_event"
REFUSAL = "refusal"
RECOVERY = "recovery"
SERVER_INIT = "server_init"
ROUND_REPORT = "round_report"
REPLY_DROPPED = "reply_dropped"  # a reply the server refused to use (fedssl.fl.validation, server/guard.py)
# A coordinator resumed the run from its checkpoint of ``round``: the ``superseded_records`` records just before
# this one belong to the interrupted round, whose aggregate was never checkpointed (fedssl.run.checkpoint).
RESUMED = "resumed"

NUM = (int, float)
OPT_NUM = (int, float, type(None))
OPT_STR = (str, type(None))
# kind -> required body field -> accepted JSON types; extra fields are allowed (and hashed like the rest).
Schema = Mapping[str, Mapping[str, tuple[type, ...]]]

# (noise_multiplier, sample_rate, steps): Opacus' accountant history entry.
Event = tuple[float, float, int]


@dataclass
class Mechanism:
    """The site's DP-SGD mechanism, fixed when the site first trains (the ``budget`` record's body).

    Only ``target_epsilon`` may change later: it is the operator's to raise or lower."""

    noise_multiplier: float
    max_grad_norm: float
    delta: float
    target_epsilon: float
    accountant: str
    planned_steps: int
    sample_rate: float

    def body(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Mechanism:
        return cls(**_typed(cls, body))


@dataclass(frozen=True)
class DPEvent:
    """One round's DP-SGD steps, charged before training (the ``dp_event`` record's body)."""

    run_id: str
    round: int
    steps: int
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    delta: float
    accountant: str
    epsilon_after: float  # the site's cumulative ε once these steps are taken
    target_epsilon: float
    status: str = "charged"

    def body(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> DPEvent:
        """Raises KeyError, TypeError or ValueError for a body that does not hold one."""
        return cls(**_typed(cls, body))

    @property
    def event(self) -> Event:
        return (self.noise_multiplier, self.sample_rate, self.steps)


def dp_events(records: list[dict[str, Any]]) -> list[DPEvent]:
    """The DP events among a site ledger's records, in ledger order; a body that holds none is a
    one-line PrivacyError naming its seq (never read as a smaller spend)."""
    events = []
    for record in records:
        if record.get("kind") != DP_EVENT:
            continue
        try:
            events.append(DPEvent.from_body(record["body"]))
        except (KeyError, TypeError, ValueError) as err:
            raise PrivacyError(
                f"ledger record seq {record.get('seq')}: unreadable dp_event ({type(err).__name__}: {err}); "
                "run `fedssl audit` on the state dir"
            ) from None
    return events


def bodies(records: list[dict[str, Any]], kind: str, *, with_seq: bool = False) -> list[dict[str, Any]]:
    """The bodies of every ``kind`` record (unverified records may hold anything: non-objects are skipped).

    ``with_seq``: each body is a copy led by its record's ``seq``, for a reader (the audit) that
    reports where in the ledger a body stands."""
    return [
        {"seq": r.get("seq"), **r["body"]} if with_seq else r["body"]
        for r in records
        if r.get("kind") == kind and isinstance(r.get("body"), dict)
    ]


_CASTS = {"str": str, "int": int, "float": float}


def _typed(cls: type, body: Mapping[str, Any]) -> dict[str, Any]:
    """``cls``'s fields from ``body``, cast to their types; a missing required field is a KeyError."""
    hints = typing.get_type_hints(cls)
    return {f.name: _CASTS[hints[f.name].__name__](body[f.name]) for f in fields(cls) if f.name in body or f.default is MISSING}


def _schema_of(cls: type) -> dict[str, tuple[type, ...]]:
    accepted = {str: (str,), int: (int,), float: NUM}
    hints = typing.get_type_hints(cls)
    return {f.name: accepted[hints[f.name]] for f in fields(cls)}


SITE_SCHEMA: Schema = {
    SITE_INIT: {"site_id": (str,), "public_key": (str,), "fingerprint": (str,)},
    BUDGET: _schema_of(Mechanism),
    DP_EVENT: _schema_of(DPEvent),
    REFUSAL: {"run_id": (str,), "round": (int,), "reason": (str,), "epsilon_spent": NUM, "target_epsilon": NUM},
    RECOVERY: {"reason": (str,)},
}
SERVER_SCHEMA: Schema = {
    SERVER_INIT: {"public_key": OPT_STR, "fingerprint": OPT_STR},
    ROUND_REPORT: {
        "round": (int,),
        "node_id": (int, str),
        "site_id": (int, str),
        "epsilon": OPT_NUM,
        "ledger_seq": (int,),
        "status": (str,),
        "aggregation": (str,),
    },
    REPLY_DROPPED: {"round": (int,), "node_id": (int, str), "reason": (str,)},
    RESUMED: {"round": (int,), "run_id": (str,), "superseded_records": (int,)},
}
