"""Name -> pretext task registry, and the DP gate that refuses methods coupling samples."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from fedssl.errors import ConfigError, PrivacyError
from fedssl.pretext.base import REGISTERED_TASKS, PretextTask

if TYPE_CHECKING:
    from fedssl.config import ExperimentConfig

PRETEXT_TASKS = REGISTERED_TASKS

T = TypeVar("T", bound=type[PretextTask])


def register_pretext(cls: T) -> T:
    """Class decorator adding a task under ``cls.name``."""
    if cls.name in PRETEXT_TASKS:
        earlier = PRETEXT_TASKS[cls.name].__name__
        raise ValueError(f"pretext {cls.name!r} is registered twice ({earlier}, {cls.__name__})")
    if not cls.dp_compatible and not cls.coupling:
        # The refusal message is the user's only explanation; a coupled method must give one.
        raise ValueError(f"pretext {cls.name!r} sets dp_compatible=False but does not say how it couples samples")
    PRETEXT_TASKS[cls.name] = cls
    return cls


def get_pretext(name: str, params: dict[str, Any] | None = None) -> PretextTask:
    """Instantiate a registered task with validated parameters."""
    if name not in PRETEXT_TASKS:
        raise ConfigError(f"pretext.name: unknown pretext {name!r}; valid choices: {', '.join(sorted(PRETEXT_TASKS))}")
    return PRETEXT_TASKS[name](**(params or {}))


def require_dp_compatible(task: PretextTask) -> None:
    """Raise PrivacyError if ``task``'s loss couples samples, which voids DP-SGD's guarantee."""
    if task.dp_compatible:
        return
    per_sample = ", ".join(sorted(name for name, cls in PRETEXT_TASKS.items() if cls.dp_compatible))
    raise PrivacyError(
        f"pretext {task.name!r} {task.coupling}: one sample's presence changes every other sample's loss, "
        "so per-sample clipping no longer bounds its influence and DP-SGD's guarantee is void; "
        f"choose a per-sample pretext ({per_sample}) or set privacy.enabled=false"
    )


def check_config(config: ExperimentConfig) -> None:
    """What only the registry can check of an experiment: the pretext's name and parameters, that it
    is per-sample when DP is on, and the synthetic warm start's pretext. One line naming the key."""
    task = get_pretext(config.pretext.name, config.pretext.params)  # raises naming pretext.name / pretext.params.<key>
    if config.privacy.enabled:
        try:
            require_dp_compatible(task)
        except PrivacyError as err:  # surface it as the config problem it is
            raise ConfigError(f"pretext.name: {err}") from None
    if config.warm_start.source == "synthetic":
        try:
            get_pretext(config.warm_start.pretext)
        except ConfigError as err:
            raise ConfigError(f"warm_start.pretext: {err}") from None
