"""Warm-start checkpoints: written by the coordinator, loaded by the ServerApp and the evaluation.

A run's ``warm_start.pt`` holds the initial encoder's weights and their provenance (what public
data, how pretrained, the weights' sha256); ``warm_start.json`` holds the provenance alone, for the
privacy statement. Pretraining itself is fedssl.warmstart.pretrain's (coordinator only): this
module imports no data or training code, so the ServerApp may use it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedssl.config import ExperimentConfig
from fedssl.errors import ConfigError
from fedssl.layout import RunDir

FORMAT = "fedssl-warm-start/1"


def weights_sha256(state: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_warm_start(directory: Path, state: Mapping[str, torch.Tensor], provenance: Mapping[str, Any]) -> Path:
    """Write ``warm_start.pt`` (weights + provenance) and ``warm_start.json`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    info = {
        "format": FORMAT,
        **provenance,
        "weights_sha256": weights_sha256(state),
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    layout = RunDir(directory)
    torch.save({"format": FORMAT, "encoder": {k: v.detach().cpu() for k, v in state.items()}, "provenance": info}, layout.warm_start)
    layout.warm_start_info.write_text(json.dumps(info, indent=1))
    return layout.warm_start


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, provenance) of a warm-start checkpoint, or of a plain encoder state_dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"warm start checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise ConfigError(f"cannot read warm start checkpoint {path} ({type(err).__name__}: {err})") from None
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        return dict(payload["encoder"]), dict(payload.get("provenance", {}))
    if isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        return dict(payload), {}
    raise ConfigError(f"{path} is neither a fedssl warm start nor an encoder state_dict")


def check_fits(state: Mapping[str, torch.Tensor], encoder: nn.Module, where: str) -> None:
    """``state`` has exactly ``encoder``'s keys and shapes, else one line naming the first mismatch."""
    expected = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if set(got) != set(expected):
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        raise ConfigError(f"{where} does not fit model.* (missing {missing[:3]}, unexpected {extra[:3]})")
    wrong = [k for k in expected if expected[k] != got[k]]
    if wrong:
        raise ConfigError(f"{where} does not fit model.*: {wrong[0]} is shaped {got[wrong[0]]}, the encoder expects {expected[wrong[0]]}")


def load_warm_start(path: Path, encoder: nn.Module) -> dict[str, torch.Tensor]:
    """Load the checkpoint at ``path`` into ``encoder`` (strict: same keys and shapes); return the weights.

    The ServerApp calls this on the encoder it built from the config, so a checkpoint for a
    different architecture fails here, with the mismatch named, before any site trains.
    """
    state, provenance = read_checkpoint(path)
    check_fits(state, encoder, f"warm start {path}")
    recorded = provenance.get("weights_sha256")
    if recorded and recorded != weights_sha256(state):
        raise ConfigError(f"warm start {path}: weights do not match their recorded sha256; regenerate the warm start")
    encoder.load_state_dict(state, strict=True)
    return state


def run_warm_start(config: ExperimentConfig, run_dir: Path, encoder: nn.Module) -> dict[str, torch.Tensor] | None:
    """The weights a finished run's federation started from, loaded into ``encoder``; None without a warm start.

    ``config`` is the run's ExperimentConfig; the run directory's ``warm_start.pt`` (written by
    :func:`prepare_warm_start`, loaded by the ServerApp) is checked against ``encoder`` and its
    recorded sha256 exactly as the server checked it.
    """
    if not config.warm_start.enabled:
        return None
    path = RunDir(run_dir).warm_start
    if not path.is_file():
        raise ConfigError(
            f"{path} missing, but the run's config has warm_start.source={config.warm_start.source}: "
            "the warm start the federation began from is needed to score it; rerun `fedssl simulate`"
        )
    return load_warm_start(path, encoder)


def public_pretraining_description(info: Path) -> str | None:
    """What a warm start (its ``warm_start.json``) was trained on, for the privacy statement; None without one."""
    info = Path(info)
    if not info.is_file():
        return None
    try:
        return str(json.loads(info.read_text()).get("description") or "public data, not described")
    except (OSError, ValueError):
        return "public data (warm_start.json unreadable)"
