"""One round of local self-supervised training at a site: plain or private.

:func:`train_round` is the single entry both Flower paths (plain and SecAgg+) reach through
fedssl.site_round. Without DP it runs :func:`train_plain_round`; with DP,
:func:`train_private_round` charges the round to the site's persistent budget *before* the first
step, then trains with Poisson sampling, exact per-sample clipping and Gaussian noise. Clipping is
book-keeping (fedssl.training.bookkeeping, the default: one backward pass, no ordinary weight
gradients) or Opacus' hooks mode (``privacy.clipping``); noise and accounting are Opacus' in both.
"""

from __future__ import annotations

import gc
import itertools
import logging
import math
import os
import secrets
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch.utils.data import DataLoader, TensorDataset

from fedssl.privacy.feasibility import poisson_sample_rate  # one rule for the sites and the preflight
from fedssl.privacy.settings import CLIPPING_ENGINES, PrivacyConfig
from fedssl.data.dataset import SiteDataset
from fedssl.data.pixels import unit_float
from fedssl.errors import DataError, RefusedError
from fedssl.fl.keys import STATUS_REFUSED, STATUS_TRAINED
from fedssl.fl.plan import TrainPlan
from fedssl.fl.records import RoundResult
from fedssl.models import build_encoder
from fedssl.phases import mark
from fedssl.pretext import PretextModel, get_pretext, require_dp_compatible
from fedssl.privacy.budget import SiteBudget
from fedssl.privacy.policy import RoundRequest
from fedssl.training.device import resolve_device

log = logging.getLogger(__name__)

OPACUS_PREFIX = "_module."
ENCODER_PREFIX = "encoder."
SITE_PARTS_FILE = "pretext_head.pt"  # in the site's state dir: the head never leaves the site


class CanaryLoss(Protocol):
    def wrap(self, model: torch.nn.Module) -> torch.nn.Module: ...


@dataclass(frozen=True)
class SiteSettings:
    """Who and where a site is, and its own privacy settings (from its config, never from the server)."""

    site_id: int
    state_dir: Path
    privacy: PrivacyConfig
    device: str = "auto"
    key_path: Path | None = None
    # The signed high-water mark (fedssl.privacy.highwater); None: beside the ledger key.
    highwater_path: Path | None = None


@dataclass
class _Round:
    """What both kinds of round start from: the site's model on its device, and the loop's parts."""

    model: PretextModel
    trained: torch.nn.Module  # the model, or the empirical audit's canary wrapper around it
    optimizer: torch.optim.Optimizer
    device: torch.device


def build_pretext_model(
    plan: TrainPlan, input_shape: tuple[int, ...], encoder_state: Mapping[str, torch.Tensor],
    feature_blocks: tuple[int, ...] = (),
) -> PretextModel:
    """Encoder with the global weights loaded *before* the head is built: BYOL copies the
    encoder into its target network at build time. ``feature_blocks``: the site's table layout
    (SiteDataset.feature_blocks)."""
    task = get_pretext(plan.pretext, plan.pretext_params)
    encoder = build_encoder(plan.encoder, input_shape, width=plan.width, depth=plan.depth, readout=plan.readout)
    encoder.load_state_dict(dict(encoder_state), strict=True)
    return task.build_model(encoder, feature_blocks)


def train_round(
    dataset: SiteDataset,
    global_encoder: Mapping[str, torch.Tensor],
    plan: TrainPlan,
    site: SiteSettings,
    *,
    canaries: CanaryLoss | None = None,
) -> RoundResult:
    """Train the global encoder on this site's data for one round; return new encoder weights.

    ``canaries`` is for the empirical privacy audit only (fedssl.audit.canaries): it
    replaces the loss of its canary rows, adding no parameters. DP's guarantee holds for any
    per-sample loss, so the audited mechanism is the one sites run.
    """
    if len(dataset) == 0:
        raise DataError(f"site {site.site_id}: no samples to train on; check site.data_dir")
    # The round's model, optimizer and DP engine (hooks, per-sample state, activations at the batch size) sit
    # in reference cycles that only the cyclic collector frees, and it counts objects, not bytes: a process
    # training round after round (a site runner, a simulation worker, a benchmark) grew by ~0.5 GB per round
    # at batch 256 and was killed for memory at 24 GiB. So each round ends with a collection; the objects
    # that existed before the round (torch, Flower, the host's own) are frozen meanwhile, so it scans only
    # what the round made: a full collection cost ~0.3 s a round, a third of a small site's round (2026-12-07).
    # A host that froze objects itself keeps them frozen, and pays the full collection.
    scoped = gc.get_freeze_count() == 0
    if scoped:
        gc.freeze()
    try:
        return _train_round(dataset, global_encoder, plan, site, canaries)
    finally:
        gc.collect()
        if scoped:
            gc.unfreeze()


def _train_round(dataset: SiteDataset, global_encoder: Mapping[str, torch.Tensor], plan: TrainPlan, site: SiteSettings,
                 canaries: CanaryLoss | None) -> RoundResult:
    """train_round's work; its model, optimizer and engine are unreachable once it returns."""
    torch.manual_seed(plan.round_seed(site.site_id))
    if site.privacy.enabled:
        require_dp_compatible(get_pretext(plan.pretext, plan.pretext_params))
    device = resolve_device(site.device)
    model = build_pretext_model(plan, dataset.input_shape, global_encoder, dataset.feature_blocks)
    restore_site_parts(model, site.state_dir)
    if site.privacy.enabled:
        # The plan's seed may fix the head's initial weights (public, data-independent: DP-SGD holds
        # for any initial model), but not the augmentations (views, rotations, masks): they are drawn
        # per batch position, so a server that knew them would know how removing one record shifts
        # every later record's augmentation, and one record's influence would no longer be one clipped
        # gradient. Drawn from OS entropy, each record's augmentation is independent of the others'.
        torch.manual_seed(secrets.randbits(63))
    model.to(device)
    trained = canaries.wrap(model) if canaries is not None else model
    parts = _Round(model, trained, _make_optimizer(plan, model), device)
    if site.privacy.enabled:
        result = train_private_round(dataset, plan, site, parts)
    else:
        result = train_plain_round(dataset, plan, parts)
    if result.status == STATUS_TRAINED:
        save_site_parts(model, site.state_dir)
    return result


def train_plain_round(dataset: SiteDataset, plan: TrainPlan, parts: _Round) -> RoundResult:
    """A round without differential privacy: shuffled batches, ordinary gradients."""
    loader = DataLoader(TensorDataset(dataset.inputs), batch_size=plan.batch_size, shuffle=True)
    result = RoundResult(status=STATUS_TRAINED, encoder_state=None, num_examples=len(dataset))
    return _run_steps(parts.trained, parts.model, parts.optimizer, loader, plan, parts.device, result)


def train_private_round(dataset: SiteDataset, plan: TrainPlan, site: SiteSettings, parts: _Round) -> RoundResult:
    """A DP-SGD round, charged to the site's budget before the first step; refused if it does not fit."""
    budget = SiteBudget.open(site.state_dir, site.privacy, key_path=site.key_path, mark_path=site.highwater_path)
    mark("budget_opened")  # the budget lock is held from here through the charge
    request = RoundRequest(
        run_id=plan.run_id,
        server_round=plan.server_round,
        planned_rounds=plan.planned_rounds,
        sample_rate=poisson_sample_rate(len(dataset), plan.batch_size),
        steps=plan.local_steps,
    )
    try:
        charge = budget.admit(request)
    except RefusedError as err:  # the site's policy or its budget: a refused reply, never a weaker update
        return _refused(budget, site, len(dataset), err)
    mark("round_charged")  # written ahead to the ledger: from here a crash still counts this round
    mechanism = charge.mechanism

    from opacus import PrivacyEngine

    # The engine's own accountant is throwaway: the persistent SiteBudget already charged
    # this round. We only cross-check it against the charge below.
    with warnings.catch_warnings():
        # OS-entropy generators below stand in for Opacus' secure mode; its warning does not apply.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=mechanism.accountant)
        private_model, private_optimizer, private_loader = _make_private(
            site.privacy.clipping,
            engine,
            module=parts.trained,
            optimizer=parts.optimizer,
            # Poisson sampling and noise from OS entropy, not from the plan's seed: the server knows
            # the seed, the round and the site id, and could otherwise regenerate the noise and
            # subtract it from the update (Opacus' secure_mode would need torchcsprng).
            data_loader=DataLoader(TensorDataset(dataset.inputs), batch_size=plan.batch_size, generator=_entropy_generator("cpu")),
            noise_generator=_entropy_generator(parts.device),
            noise_multiplier=charge.noise_multiplier,
            max_grad_norm=mechanism.max_grad_norm,
        )
    result = _run_steps(private_model, parts.model, private_optimizer, private_loader, plan, parts.device, RoundResult(
        status=STATUS_TRAINED,
        encoder_state=None,
        num_examples=len(dataset),
        epsilon=charge.epsilon_after,
        target_epsilon=mechanism.target_epsilon,
        delta=mechanism.delta,
        ledger_seq=charge.ledger_seq,
    ))
    taken = [(s, q, n) for s, q, n in engine.accountant.history]
    expected = [(charge.noise_multiplier, charge.sample_rate, charge.steps)]
    if [(round(s, 9), round(q, 9), n) for s, q, n in taken] != [(round(s, 9), round(q, 9), n) for s, q, n in expected]:
        raise RuntimeError(f"DP steps taken {taken} differ from the steps charged {expected}; refusing to release the update")
    return result


def _refused(budget: SiteBudget, site: SiteSettings, num_examples: int, err: RefusedError) -> RoundResult:
    log.error("site %s: %s", site.site_id, err)
    return RoundResult(
        status=STATUS_REFUSED,
        encoder_state=None,
        num_examples=num_examples,
        epsilon=budget.epsilon_spent,
        target_epsilon=budget.state.mechanism.target_epsilon if budget.state is not None else site.privacy.target_epsilon,
        delta=site.privacy.delta,
        reason=str(err),
    )


def _make_private(clipping: str, engine, **kwargs) -> tuple[torch.nn.Module, torch.optim.Optimizer, DataLoader]:
    """Poisson loader, exact per-sample clipping, Opacus' noise and ``engine.accountant`` steps."""
    if clipping == "bookkeeping":
        from fedssl.training.bookkeeping import make_private_bookkeeping

        return make_private_bookkeeping(engine, **kwargs)
    if clipping == "opacus":
        return engine.make_private(**kwargs, poisson_sampling=True)
    raise ValueError(f"privacy.clipping: valid choices: {', '.join(CLIPPING_ENGINES)}, got {clipping!r}")


def _site_parts_path(state_dir: Path) -> Path:
    return Path(state_dir) / SITE_PARTS_FILE


def save_site_parts(model: PretextModel, state_dir: Path) -> None:
    """Keep the pretext head (and predictor / EMA target) on the site between rounds.

    They never leave the site; under DP they are post-processing of noised updates, so
    keeping them costs no privacy — and re-initialising them every round wastes the
    round's first steps on re-learning the head.
    """
    parts = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith(ENCODER_PREFIX)}
    path = _site_parts_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(parts, tmp)
    os.replace(tmp, path)


def restore_site_parts(model: PretextModel, state_dir: Path) -> bool:
    """Load the site's saved head if it fits this model (a changed pretext starts fresh)."""
    path = _site_parts_path(state_dir)
    if not path.exists():
        return False
    saved = torch.load(path, weights_only=True)
    current = {k: v for k, v in model.state_dict().items() if not k.startswith(ENCODER_PREFIX)}
    if set(saved) != set(current) or any(saved[k].shape != current[k].shape for k in current):
        log.warning("%s: saved pretext head does not fit the current pretext; starting a fresh head", path)
        return False
    model.load_state_dict({**model.state_dict(), **saved})
    return True


def _entropy_generator(device: torch.device | str) -> torch.Generator:
    """A generator seeded from the OS's entropy pool, unknown to anyone outside this process."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


def _make_optimizer(plan: TrainPlan, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if plan.optimizer == "adam":
        return torch.optim.Adam(params, lr=plan.lr)
    return torch.optim.SGD(params, lr=plan.lr, momentum=plan.momentum)


def _cycle(loader: DataLoader) -> Iterator[tuple[torch.Tensor, ...]]:
    while True:
        yield from loader


def _run_steps(
    trained: torch.nn.Module,
    model: PretextModel,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    plan: TrainPlan,
    device: torch.device,
    result: RoundResult,
) -> RoundResult:
    trained.train()
    started = time.perf_counter()
    loss_sum, loss_count = 0.0, 0
    for (batch,) in itertools.islice(_cycle(loader), plan.local_steps):
        # uint8 pixels travel and are sampled as uint8; only this batch becomes float (float data: unchanged).
        batch = unit_float(batch.to(device))
        optimizer.zero_grad(set_to_none=True)
        per_sample = trained(batch)
        # An empty Poisson batch still takes a (noise-only) step; mean() of nothing is NaN.
        loss = per_sample.mean() if per_sample.numel() else per_sample.sum()
        loss.backward()
        optimizer.step()
        model.after_optimizer_step()
        mark("train_step")
        loss_sum += float(per_sample.detach().sum())
        loss_count += int(per_sample.numel())
    result.train_seconds = time.perf_counter() - started
    result.steps = plan.local_steps
    result.pretext_loss = loss_sum / loss_count if loss_count else math.nan
    result.encoder_state = encoder_state_dict(model)
    return result


def encoder_state_dict(model: PretextModel) -> dict[str, torch.Tensor]:
    """The encoder's weights only, detached on CPU, without Opacus' ``_module.`` prefix."""
    state = model.encoder.state_dict()
    return {k.removeprefix(OPACUS_PREFIX): v.detach().cpu().clone() for k, v in state.items()}
