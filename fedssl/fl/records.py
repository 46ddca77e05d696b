"""What one round produced, on each side of the wire: the site's :class:`RoundResult` and the
server's view of its reply, :class:`SiteReport` (scalars only). No training code imported here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedssl.fl import keys

if TYPE_CHECKING:
    import torch


@dataclass
class RoundResult:
    """A site's round, before anything leaves: ``status`` is keys.STATUS_TRAINED or keys.STATUS_REFUSED."""

    status: str
    encoder_state: dict[str, torch.Tensor] | None
    num_examples: int  # exact; under DP it stays at the site (fl.site_reply.released_num_examples)
    steps: int = 0
    pretext_loss: float = math.nan
    epsilon: float = math.inf
    target_epsilon: float = math.inf
    delta: float = 0.0
    train_seconds: float = 0.0
    ledger_seq: int = -1
    reason: str = ""


@dataclass(frozen=True)
class SiteReport:
    """The server's view of one site's reply (scalars only)."""

    node_id: int
    site_id: int
    status: str
    num_examples: int  # the FedAvg weight: exact without DP, the plan's batch size x steps under DP
    steps: int
    epsilon: float  # math.inf when the site trains without DP
    target_epsilon: float
    delta: float
    pretext_loss: float  # NaN when not released (under DP, or a refused round)
    train_seconds: float  # NaN when not released (under DP)
    ledger_seq: int

    @classmethod
    def from_metrics(cls, node_id: int, metrics: Mapping[str, float | int]) -> SiteReport:
        dp = bool(metrics.get(keys.DP_ENABLED, 1))
        return cls(
            node_id=int(node_id),
            site_id=int(metrics[keys.SITE_ID]),
            status=keys.STATUS_NAMES.get(int(metrics[keys.STATUS]), "unknown"),
            num_examples=int(metrics[keys.NUM_EXAMPLES]),
            # What a site may withhold (fedssl.fl.validation.REQUIRED_METRICS is the rest) has a "not released" default.
            steps=int(metrics.get(keys.STEPS, 0)),
            epsilon=float(metrics[keys.EPSILON]) if dp else math.inf,
            target_epsilon=float(metrics.get(keys.TARGET_EPSILON, math.inf)) if dp else math.inf,
            delta=float(metrics.get(keys.DELTA, 0.0)),
            # A DP site does not release these (keys.DP_RELEASED_METRICS): NaN, as for a refused round.
            pretext_loss=float(metrics.get(keys.PRETEXT_LOSS, math.nan)),
            train_seconds=float(metrics.get(keys.TRAIN_SECONDS, math.nan)),
            ledger_seq=int(metrics[keys.LEDGER_SEQ]),
        )
