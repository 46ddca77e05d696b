"""Device choice: CUDA when present and asked for (or 'auto'), else CPU."""

from __future__ import annotations

import torch

from fedssl.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"run.device: {name!r} requested but CUDA is not available here; set run.device=auto or cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"run.device: {name!r} is not a device; use auto, cpu, cuda or cuda:<index>") from None
