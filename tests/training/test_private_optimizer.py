"""The private step around book-keeping clipping: Opacus' own noise, scaling and accounting, against its hooks
mode, and `privacy.clipping` through the config and train_round with each engine."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedssl.models import build_encoder
from fedssl.training.bookkeeping import make_private_bookkeeping

from bookkeeping_reference import (  # noqa: F401  (one_thread: an autouse fixture, so imported to apply here)
    RTOL, SEED, max_rel_error, one_thread, pretext_model, reference_clipped_sum,
)


# ---------------------------------------------------------------------------------------------
# The private optimizer: Opacus' own noise, scaling and accounting


def _private(model, noise: float, batch: int = 4, seed: int = 5, bookkeeping: bool = True, momentum: float = 0.0):
    from opacus import PrivacyEngine

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0, momentum=momentum)
    loader = DataLoader(TensorDataset(torch.zeros(4 * batch, 1, 8, 8)), batch_size=batch)
    engine = PrivacyEngine(accountant="rdp")
    generator = torch.Generator().manual_seed(seed)
    if bookkeeping:
        out = make_private_bookkeeping(engine, module=model, optimizer=optimizer, data_loader=loader,
                                       noise_multiplier=noise, max_grad_norm=1.0, noise_generator=generator)
    else:
        out = engine.make_private(module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise,
                                  max_grad_norm=1.0, poisson_sampling=True, noise_generator=generator)
    return (*out, engine)


def _step(model, optimizer, x, seed=SEED):
    optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    losses = model(x)
    (losses.mean() if losses.numel() else losses.sum()).backward()
    optimizer.step()


def _weights(model):
    return {n.removeprefix("_module."): p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_noise_and_accounting_match_opacus_hooks_mode():
    """Same noise generator seed: BK and Opacus' own hooks mode take the same noised step."""
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    results = {}
    for bookkeeping in (True, False):
        model = pretext_model("simsiam")()
        private, optimizer, loader, engine = _private(model, noise=1.0, bookkeeping=bookkeeping)
        before = _weights(model)
        _step(private, optimizer, x)
        after = _weights(model)
        results[bookkeeping] = ({n: after[n] - before[n] for n in before}, engine.accountant.history, loader.sample_rate)
    (bk_update, bk_history, bk_rate), (op_update, op_history, op_rate) = results[True], results[False]
    assert bk_history == op_history == [(1.0, 0.25, 1)] and bk_rate == op_rate
    assert max_rel_error(bk_update, op_update) < RTOL


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_noise_is_added_with_the_right_scale():
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    updates = {}
    for noise in (0.0, 2.0):
        model = pretext_model("rotation")()
        private, optimizer, _, _ = _private(model, noise=noise, batch=4)
        before = _weights(model)
        _step(private, optimizer, x)
        updates[noise] = torch.cat([(before[n] - p).flatten() for n, p in _weights(model).items()])
    diff = updates[2.0] - updates[0.0]  # = noise / expected_batch_size, lr 1
    assert diff.numel() > 500
    std = float(diff.std()) * 4
    assert 2.0 * 0.9 < std < 2.0 * 1.1  # sigma * C = 2


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_empty_poisson_batch_takes_a_noise_only_step():
    model = pretext_model("byol")()
    private, optimizer, _, engine = _private(model, noise=1.0, momentum=0.9)
    before = _weights(model)
    _step(private, optimizer, torch.zeros(0, 1, 8, 8))
    after = _weights(model)
    assert all(not torch.equal(before[n], after[n]) for n in before)
    assert engine.accountant.history == [(1.0, 0.25, 1)]

    model = pretext_model("byol")()
    private, optimizer, _, engine = _private(model, noise=0.0)
    before = _weights(model)
    _step(private, optimizer, torch.zeros(0, 1, 8, 8))
    assert all(torch.equal(before[n], p) for n, p in _weights(model).items())


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_poisson_loader_and_steps_through_training_loop():
    """Real Poisson batches of varying size (buffers sized for the largest seen), lr 1, no noise:
    every step's update is the reference clipped sum over the expected batch size."""
    model = pretext_model("masked_reconstruction")()
    reference = copy.deepcopy(model)
    private, optimizer, loader, engine = _private(model, noise=0.0, batch=4)
    data = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(8))
    sizes = set()
    for size in (5, 2, 7, 0, 3):
        x = data[:size]
        sizes.add(size)
        want, _ = reference_clipped_sum(reference, x, clip=1.0) if size else ({}, None)
        before = _weights(model)
        _step(private, optimizer, x)
        for n, p in _weights(model).items():
            expected = -want[n] / 4 if size else torch.zeros_like(p)
            assert torch.allclose(p - before[n], expected, rtol=RTOL, atol=1e-6)
        with torch.no_grad():  # keep the reference's weights in step
            for (n, p) in reference.named_parameters():
                if p.requires_grad:
                    p.copy_(dict(model.named_parameters())[n])
    assert len(engine.accountant.history) == 1 and engine.accountant.history[0][2] == 5


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_optimizer_keeps_the_engine_sum_without_copying_and_leaves_it_untouched():
    """accumulate() takes p.grad as p.summed_grad; add_noise / scale_grad then replace p.grad,
    so the clipped sum itself is never modified in place."""
    model = pretext_model("rotation")()
    private, optimizer, _, _ = _private(model, noise=1.0)
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(13))
    optimizer.zero_grad(set_to_none=True)
    private(x).mean().backward()
    optimizer.engine.write_clipped_sum(optimizer.max_grad_norm)
    written = {p: p.grad for p in optimizer.params}
    snapshot = {p: g.clone() for p, g in written.items()}
    optimizer.accumulate()
    assert all(p.summed_grad is written[p] for p in optimizer.params)
    optimizer.add_noise()
    optimizer.scale_grad()
    assert all(p.grad is not written[p] and torch.equal(written[p], snapshot[p]) for p in optimizer.params)


# ---------------------------------------------------------------------------------------------
# Integration: privacy.clipping in the config and in train_round


def test_config_validates_clipping_engine():
    from fedssl.config import PrivacyConfig
    from fedssl.errors import ConfigError

    assert PrivacyConfig().clipping == "bookkeeping"
    PrivacyConfig(clipping="opacus").validate()
    with pytest.raises(ConfigError, match=r"^privacy\.clipping: valid choices: bookkeeping, opacus, got 'ghost'$"):
        PrivacyConfig(clipping="ghost").validate()


@pytest.mark.parametrize("clipping", ["bookkeeping", "opacus"])
def test_train_round_with_each_clipping_engine(tmp_path, digits_site, global_encoder, make_plan, clipping):
    """Both engines train, and train_round's accountant cross-check (history == charge) passes."""
    from fedssl.training.local import STATUS_TRAINED, SiteSettings, train_round
    from fedssl.config import PrivacyConfig

    site = SiteSettings(site_id=0, state_dir=tmp_path, device="cpu",
                        privacy=PrivacyConfig(enabled=True, target_epsilon=1.0, clipping=clipping))
    result = train_round(digits_site, global_encoder, make_plan(pretext="simsiam"), site)
    assert result.status == STATUS_TRAINED and result.steps == 2
    moved = [not torch.equal(result.encoder_state[k], v) for k, v in global_encoder.items() if k.endswith("weight")]
    assert all(moved)
    assert set(result.encoder_state) == set(global_encoder)


def _trains_with_engine(dataset, encoder: str, pretext: str, clipping: str, state_dir, make_plan) -> None:
    """One DP round of ``encoder`` by ``pretext`` under ``clipping`` trains every weight."""
    from fedssl.config import PrivacyConfig
    from fedssl.training.local import STATUS_TRAINED, SiteSettings, train_round

    initial = build_encoder(encoder, dataset.input_shape, width=16, depth=1, seed=0).state_dict()
    site = SiteSettings(site_id=0, state_dir=state_dir, device="cpu",
                        privacy=PrivacyConfig(enabled=True, target_epsilon=1.0, clipping=clipping))
    result = train_round(dataset, initial, make_plan(encoder=encoder, width=16, depth=1, pretext=pretext), site)
    assert result.status == STATUS_TRAINED and result.steps == 2
    assert set(result.encoder_state) == set(initial)
    assert all(not torch.equal(result.encoder_state[k], v) for k, v in initial.items() if k.endswith("weight"))


@pytest.mark.parametrize("clipping", ["bookkeeping", "opacus"])
def test_train_round_trains_the_vit_by_masked_patches_with_each_clipping_engine(tmp_path, digits_site, make_plan, clipping):
    _trains_with_engine(digits_site, "vit", "masked_reconstruction", clipping, tmp_path, make_plan)


@pytest.mark.parametrize("clipping", ["bookkeeping", "opacus"])
def test_train_round_trains_the_text_transformer_on_padded_texts_with_each_clipping_engine(tmp_path, make_plan, clipping):
    from fedssl.data import SiteDataset
    from fedssl.data.text import encode_all

    texts = [f"{word} {i}" for i, word in enumerate(["card lost", "fee", "a much longer line of text", "hi"] * 16)]
    dataset = SiteDataset(torch.tensor(encode_all(texts, 24), dtype=torch.float32), tuple(f"row-{i}" for i in range(64)), "text")
    _trains_with_engine(dataset, "transformer", "masked_tokens", clipping, tmp_path, make_plan)
