"""The training plan: what the server may ask of a site for one round.

It travels as a flat Flower ConfigRecord (str/int/float values). It holds no privacy
setting on purpose: budgets, δ and clipping are the site's own decision.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from fedssl.errors import ConfigError
from fedssl.inputs import AUTO_READOUT, readout_problem

# Where a site's local training starts each round: the global encoder (FedAvg), or FedEMA's
# divergence-aware mix of it with the site's own last encoder (fedssl/training/fedema.py).
LOCAL_UPDATE_GLOBAL, LOCAL_UPDATE_FEDEMA = "global", "fedema"
LOCAL_UPDATES = (LOCAL_UPDATE_GLOBAL, LOCAL_UPDATE_FEDEMA)


@dataclass(frozen=True)
class TrainPlan:
    run_id: str
    server_round: int
    planned_rounds: int
    pretext: str
    encoder: str
    width: int
    depth: int
    local_steps: int
    batch_size: int
    lr: float
    readout: int = AUTO_READOUT  # model.readout: the same grid at every site (a default: an older server sends none)
    optimizer: str = "sgd"
    momentum: float = 0.9
    seed: int = 0
    pretext_params: dict[str, Any] = field(default_factory=dict)
    local_update: str = LOCAL_UPDATE_GLOBAL
    fedema_tau: float = 0.7

    def to_wire(self) -> dict[str, str | int | float]:
        flat: dict[str, str | int | float] = {}
        for key, value in asdict(self).items():
            flat[_wire_key(key)] = json.dumps(value, sort_keys=True) if key == "pretext_params" else value
        return flat

    @classmethod
    def from_wire(cls, config: Mapping[str, Any]) -> TrainPlan:
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = _wire_key(f.name)
            if key not in config:
                if f.default is not MISSING or f.default_factory is not MISSING:
                    continue
                raise ConfigError(f"train config: missing {key!r}; server and site run different fedssl versions?")
            value = config[key]
            if f.name == "pretext_params":
                try:
                    value = json.loads(value)
                except (TypeError, ValueError):
                    raise ConfigError(f"train config: {key!r} is not JSON") from None
            values[f.name] = value
        plan = cls(**values)
        plan.validate()
        return plan

    def validate(self) -> None:
        for name, low in (("server_round", 1), ("planned_rounds", 1), ("local_steps", 1), ("batch_size", 1), ("width", 1), ("depth", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"train config: {_wire_key(name)} must be an integer >= {low}, got {value!r}")
        problem = readout_problem(self.encoder, self.readout)
        if problem:
            raise ConfigError(f"train config: readout {problem}, got {self.readout!r}")
        if not self.lr > 0:
            raise ConfigError(f"train config: lr must be > 0, got {self.lr!r}")
        if self.local_update not in LOCAL_UPDATES:
            raise ConfigError(f"train config: local-update must be one of {', '.join(LOCAL_UPDATES)}, got {self.local_update!r}")
        if not (isinstance(self.fedema_tau, (int, float)) and 0 <= self.fedema_tau <= 1):
            raise ConfigError(f"train config: fedema-tau must be in [0, 1], got {self.fedema_tau!r}")

    def round_seed(self, site_id: int) -> int:
        """Distinct, reproducible randomness per (run seed, round, site)."""
        return zlib.crc32(f"{self.seed}/{self.server_round}/{site_id}".encode())

    def with_round(self, server_round: int) -> TrainPlan:
        return TrainPlan(**{**asdict(self), "server_round": server_round})


def plan_from_config(config, run_id: str) -> TrainPlan:
    """The plan the coordinator sends, from an ``ExperimentConfig`` (round 1)."""
    return TrainPlan(
        run_id=run_id,
        server_round=1,
        planned_rounds=config.federation.rounds,
        pretext=config.pretext.name,
        pretext_params=dict(config.pretext.params),
        encoder=config.model.encoder,
        width=config.model.width,
        depth=config.model.depth,
        readout=config.model.readout,
        local_steps=config.training.local_steps,
        batch_size=config.training.batch_size,
        lr=config.training.lr,
        optimizer=config.training.optimizer,
        momentum=config.training.momentum,
        seed=config.run.seed,
        local_update=config.federation.local_update,
        fedema_tau=config.federation.fedema_tau,
    )


def _wire_key(name: str) -> str:
    return name.replace("_", "-")
