"""FedEMA: a divergence-aware start for each round's local training, kept at the site.

Zhuang, Wen, Zhang, "Divergence-aware Federated Self-Supervised Learning", ICLR 2022
(https://arxiv.org/abs/2204.04385). With FedAvg every round starts from the global encoder, which
throws away what the site's own encoder learned about its (non-IID) data. FedEMA starts instead from

    w_start = mu * w_local + (1 - mu) * w_global,   mu = min(lambda * ||w_global - w_local||, 1)

where ``w_local`` is the site's encoder after its last round of this run: the more the global
model moved away from the site, the more of its own encoder the site keeps. ``lambda`` is set at
the site's second participation by the paper's autoscaler, ``lambda = tau / ||w_global - w_local||``,
so that round starts at ``mu = tau`` (``federation.fedema_tau``, 0.7 in the paper).

The server still aggregates with ``federation.strategy`` (FedAvg by default): FedEMA changes only
where a site starts. The state (``fedema.pt`` in the site's state dir: run id, the local encoder,
lambda) never leaves the site. Under DP the local encoder is the output of the site's own DP-SGD
round, so mixing it in is post-processing: no privacy cost, nothing new released.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Mapping
from pathlib import Path

import torch

from fedssl.fl.plan import LOCAL_UPDATE_FEDEMA, TrainPlan
from fedssl.privacy.durable import replace_durably

log = logging.getLogger(__name__)

STATE_FILE = "fedema.pt"


def divergence(global_state: Mapping[str, torch.Tensor], local_state: Mapping[str, torch.Tensor]) -> float:
    """``||w_global - w_local||`` over the floating-point tensors (counters and indices are not weights)."""
    total = 0.0
    for name, value in global_state.items():
        if value.is_floating_point():
            total += float((value - local_state[name]).double().square().sum())
    return math.sqrt(total)


def mix(global_state: Mapping[str, torch.Tensor], local_state: Mapping[str, torch.Tensor], mu: float) -> dict[str, torch.Tensor]:
    return {name: (mu * local_state[name] + (1 - mu) * value) if value.is_floating_point() else value.clone()
            for name, value in global_state.items()}


def _load(state_dir: Path, plan: TrainPlan, global_state: Mapping[str, torch.Tensor]) -> dict | None:
    """This run's saved local state, or None (first participation, another run, a changed encoder, a bad file)."""
    path = state_dir / STATE_FILE
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a damaged file costs the local start, never the round
        log.warning("%s: unreadable (%s); this round starts from the global encoder", path, err)
        return None
    local = saved.get("encoder", {}) if isinstance(saved, dict) else {}
    same_shapes = set(local) == set(global_state) and all(local[k].shape == v.shape for k, v in global_state.items())
    if saved.get("run_id") != plan.run_id or not same_shapes:
        return None
    return saved


def start_weights(global_state: Mapping[str, torch.Tensor], state_dir: Path, plan: TrainPlan) -> tuple[dict[str, torch.Tensor], float | None]:
    """Where this round's training starts, and the lambda to remember (None: FedAvg's start, or first round)."""
    if plan.local_update != LOCAL_UPDATE_FEDEMA:
        return dict(global_state), None
    saved = _load(state_dir, plan, global_state)
    if saved is None:
        return dict(global_state), None
    distance = divergence(global_state, saved["encoder"])
    scale = saved.get("scale") or (plan.fedema_tau / distance if distance > 0 else None)
    mu = min(scale * distance, 1.0) if scale else 0.0
    log.info("fedema: round %d starts at mu=%.3f (divergence %.4g, lambda %s)", plan.server_round, mu, distance, scale)
    return mix(global_state, saved["encoder"], mu), scale


def remember(trained: Mapping[str, torch.Tensor], state_dir: Path, plan: TrainPlan, scale: float | None) -> None:
    """Keep the site's encoder after this round (and lambda) for its next round of the same run."""
    if plan.local_update != LOCAL_UPDATE_FEDEMA:
        return
    buffer = io.BytesIO()
    torch.save({"run_id": plan.run_id, "server_round": plan.server_round, "scale": scale,
                "encoder": {k: v.detach().cpu().clone() for k, v in trained.items()}}, buffer)
    replace_durably(state_dir / STATE_FILE, buffer.getvalue())
