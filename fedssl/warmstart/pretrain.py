"""Warm start, the coordinator's side: pretrain the initial encoder on public or synthetic data.

Pretraining on data that is public by construction costs no privacy budget, and on small
private data sets it is often worth more than the private federated step itself (see
benchmarks/README.md). The flow keeps the server free of data loading:

1. before the run, the coordinator's pipeline calls :func:`prepare_warm_start`: for
   ``source: synthetic`` it renders synthetic digits (``fedssl.data.synthetic``) and pretrains
   the configured encoder on them without DP; for ``source: path`` it checks and copies a
   checkpoint the operator supplies; either way it writes ``warm_start.pt`` (weights +
   provenance) and ``warm_start.json`` (provenance only) into the run directory;
2. the ServerApp loads ``warm_start.pt`` into the initial encoder it sends to the sites, and the
   central evaluation scores the same file beside the federated encoder
   (fedssl.warmstart.checkpoint, which imports no data or training code);
3. reports and the audit pass its description to the privacy statement, which then says what the
   public data was and that it is not protected.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from fedssl.config import ExperimentConfig, WarmStartConfig
from fedssl.data import synthetic
from fedssl.errors import ConfigError
from fedssl.inputs import AUTO_READOUT
from fedssl.models import build_encoder, encoder_for
from fedssl.pretext import get_pretext
from fedssl.progress import Progress, tick
from fedssl.training.device import resolve_device
from fedssl.warmstart.checkpoint import check_fits, read_checkpoint, save_warm_start



def pretrain_encoder(
    inputs: torch.Tensor,
    *,
    encoder: str,
    width: int,
    depth: int,
    readout: int = AUTO_READOUT,
    pretext: str = "rotation",
    pretext_params: Mapping[str, Any] | None = None,
    steps: int = 2000,
    batch_size: int = 64,
    lr: float = 0.05,
    momentum: float = 0.9,
    seed: int = 0,
    init_state: Mapping[str, torch.Tensor] | None = None,
    progress: Progress | None = None,
    device: torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Non-private self-supervised pretraining of a fresh encoder on ``inputs`` (on ``device``, default the
    CPU; ``inputs`` stay in host memory and go over a batch at a time); returns its weights, on the CPU.

    Only for data that are public: nothing here is differentially private. Deterministic for
    a given ``seed`` (on one thread, on the CPU).
    """
    input_shape = tuple(inputs.shape[1:])
    net = build_encoder(encoder, input_shape, width=width, depth=depth, seed=seed, readout=readout)
    if init_state is not None:
        net.load_state_dict(dict(init_state))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_pretext(pretext, dict(pretext_params or {})).build_model(net).to(device or "cpu")
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=momentum)
        generator = torch.Generator().manual_seed(seed)
        model.train()
        order = torch.randperm(len(inputs), generator=generator)
        cursor = 0
        report_every = max(1, steps // 5)
        for step in range(1, steps + 1):
            if cursor + batch_size > len(order):
                order, cursor = torch.randperm(len(inputs), generator=generator), 0
            batch = inputs[order[cursor : cursor + batch_size]].to(device or "cpu", non_blocking=True)
            cursor += batch_size
            optimizer.zero_grad(set_to_none=True)
            loss = model(batch).mean()
            loss.backward()
            optimizer.step()
            model.after_optimizer_step()
            if progress:
                tick(progress, f"warm start: step {step}/{steps}, pretext loss {float(loss.detach()):.3f}", step, steps,
                     every=report_every)
    return {k: v.detach().cpu().clone() for k, v in model.encoder.state_dict().items()}


def synthetic_warm_start(
    ws: WarmStartConfig, *, encoder: str, width: int, depth: int, input_shape: tuple[int, ...], readout: int = AUTO_READOUT,
    progress: Progress | None = None, device: torch.device | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Render synthetic digits and pretrain on them (on ``device``, default the CPU); returns (weights, provenance)."""
    shape = tuple(input_shape)
    if len(shape) != 3 or shape[0] != 1 or shape[1] != shape[2] or shape[1] not in synthetic.SIDES:
        sides = ", ".join(f"1x{s}x{s}" for s in synthetic.SIDES)
        raise ConfigError(
            f"warm_start.source: synthetic renders {sides} digits, but the data are shaped {shape}; "
            "use warm_start.source=path with an encoder pretrained on public data of this shape, or none"
        )
    side = shape[1]
    started = time.perf_counter()
    images, _labels = synthetic.synthetic_digits(ws.num_samples, seed=ws.seed, side=side)  # labels unused: self-supervised
    if progress:
        progress(f"warm start: rendered {ws.num_samples} synthetic digits in {time.perf_counter() - started:.0f}s; pretraining")
    state = pretrain_encoder(
        torch.from_numpy(images), encoder=encoder, width=width, depth=depth, readout=readout, pretext=ws.pretext, steps=ws.steps,
        batch_size=ws.batch_size, lr=ws.lr, momentum=ws.momentum, seed=ws.seed, progress=progress, device=device,
    )
    provenance = {
        "source": "synthetic",
        "description": synthetic.describe(ws.num_samples, ws.seed, side),
        "public_data_sha256": synthetic.fingerprint(images),
        "fonts": list(synthetic.font_names()),
        "uses_site_data": False,
        "pretraining": {k: v for k, v in asdict(ws).items() if k not in ("source", "path", "description")},
        "seconds": round(time.perf_counter() - started, 1),
        "device": str(device or "cpu"),
    }
    return state, provenance


def prepare_warm_start(config: ExperimentConfig, run_dir: Path, progress: Progress | None = None) -> Path | None:
    """Produce ``run_dir/warm_start.pt`` for ``config.warm_start`` (an ExperimentConfig); None for source none.

    Runs on the coordinator before the federation starts; it never reads site data.
    """
    ws = config.warm_start
    if not ws.enabled:
        return None
    m = config.model
    if not m.input_shape:
        raise ConfigError("model.input_shape: must be known before a warm start (the CLI fills it from the data)")
    if ws.source == "synthetic":
        state, provenance = synthetic_warm_start(
            ws, encoder=m.encoder, width=m.width, depth=m.depth, input_shape=tuple(m.input_shape), readout=m.readout,
            progress=progress, device=resolve_device(config.run.device),
        )
    else:
        state, recorded = read_checkpoint(Path(ws.path))
        check_fits(state, encoder_for(m), f"warm_start.path: {ws.path}")
        provenance = {
            "source": "path",
            "path": str(Path(ws.path).resolve()),
            "description": ws.description.strip(),
            "uses_site_data": False,
            "recorded_provenance": recorded,
        }
    path = save_warm_start(run_dir, state, provenance)
    if progress:
        progress(f"warm start written to {path} ({provenance['description']})")
    return path
