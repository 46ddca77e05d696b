"""One local round (fedssl.training.local.train_round) with real Opacus on tiny digits data.

The privacy numbers are checked against a fresh Opacus accountant, never against fedssl's own
arithmetic.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from torch.utils.data import DataLoader, TensorDataset

from conftest import DELTA, LOCAL_STEPS, PLANNED_ROUNDS, SAMPLE_RATE, TARGET_EPSILON
from fedssl.errors import PrivacyError
from fedssl.fl.plan import TrainPlan
from fedssl.models import build_encoder, encoder_state_keys
from fedssl.pretext import get_pretext
from fedssl.training.local import OPACUS_PREFIX, STATUS_TRAINED, poisson_sample_rate, train_round

# get_noise_multiplier(target_epsilon=1, target_delta=1e-5, sample_rate=1/8, steps=4) with Opacus 1.6
PINNED_SIGMA = 1.8359375


def opacus_epsilon(history: list[tuple[float, float, int]]) -> float:
    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=DELTA))


def saved_accountant(state_dir) -> dict:
    return json.loads((state_dir / "accountant.json").read_text())


def test_sample_rate_is_what_opacus_derives(digits_site):
    assert poisson_sample_rate(len(digits_site), 8) == SAMPLE_RATE
    assert poisson_sample_rate(65, 8) == 1 / 9
    # 93 batches: Opacus' Poisson loader has int(1 / (1 / 93)) = 92, and its accountant books 1/92
    assert poisson_sample_rate(93 * 8, 8) == 1 / 92 and poisson_sample_rate(3125 * 32, 32) == 1 / 3124


def test_a_site_whose_batch_count_rounds_down_in_opacus_trains_and_is_charged_what_opacus_books(make_site, tmp_path):
    """93 rows at batch 1: Opacus samples at 1/93 and books 1/92; the site charged 1/93 before, found the
    steps taken differing from the steps charged and discarded the round it had paid for."""
    from fedssl.data.loaders import load_digits_labeled

    rows = load_digits_labeled()[0].subset(list(range(93)))
    plan = TrainPlan(run_id="rounding", server_round=1, planned_rounds=1, pretext="rotation", encoder="cnn", width=4,
                     depth=1, local_steps=2, batch_size=1, lr=0.05)
    start = build_encoder("cnn", rows.input_shape, width=4, depth=1, seed=0).state_dict()
    result = train_round(rows, start, plan, make_site(tmp_path / "state"))
    assert result.status == STATUS_TRAINED, result.reason
    history = saved_accountant(tmp_path / "state")["history"]
    assert history == [[history[0][0], 1 / 92, 2]]
    assert result.epsilon == pytest.approx(opacus_epsilon([tuple(history[0])]), rel=1e-9)


def test_epsilon_grows_and_equals_a_fresh_opacus_accountant(trained_site):
    r1, r2 = trained_site.round1, trained_site.round2
    assert r1.status == r2.status == STATUS_TRAINED
    assert 0 < r1.epsilon < r2.epsilon
    sigma = saved_accountant(trained_site.after_round2)["mechanism"]["noise_multiplier"]
    one_round = (sigma, SAMPLE_RATE, LOCAL_STEPS)
    assert r1.epsilon == pytest.approx(opacus_epsilon([one_round]), rel=1e-9, abs=0)
    assert r2.epsilon == pytest.approx(opacus_epsilon([one_round, one_round]), rel=1e-9, abs=0)
    # what the round reports is what the site's accountant file holds
    assert saved_accountant(trained_site.after_round1)["history"] == [list(one_round)]
    assert saved_accountant(trained_site.after_round2)["history"] == [list(one_round), list(one_round)]
    assert (r1.steps, r2.steps) == (LOCAL_STEPS, LOCAL_STEPS)
    assert r2.target_epsilon == TARGET_EPSILON and r2.delta == DELTA
    assert r1.ledger_seq < r2.ledger_seq


def test_noise_is_calibrated_once_for_all_planned_steps(trained_site):
    mechanism_1 = saved_accountant(trained_site.after_round1)["mechanism"]
    mechanism_2 = saved_accountant(trained_site.after_round2)["mechanism"]
    assert mechanism_1 == mechanism_2  # not recalibrated in round 2
    planned_steps = PLANNED_ROUNDS * LOCAL_STEPS
    assert mechanism_1["planned_steps"] == planned_steps
    expected = get_noise_multiplier(
        target_epsilon=TARGET_EPSILON, target_delta=DELTA, sample_rate=SAMPLE_RATE, steps=planned_steps, accountant="rdp"
    )
    assert mechanism_1["noise_multiplier"] == pytest.approx(expected, rel=1e-12)
    assert mechanism_1["noise_multiplier"] == pytest.approx(PINNED_SIGMA, rel=1e-6)
    # Calibrated per round instead, round 1 alone would already spend (almost) the whole budget.
    assert trained_site.round1.epsilon < 0.9 * TARGET_EPSILON


def test_the_whole_plan_ends_at_the_budget_and_not_above(trained_site):
    final = trained_site.round2.epsilon
    assert final <= TARGET_EPSILON
    assert final >= TARGET_EPSILON - 0.01  # Opacus' calibration tolerance


def test_round_returns_only_encoder_weights_and_they_moved(trained_site, digits_site, global_encoder):
    expected = encoder_state_keys(build_encoder("cnn", digits_site.input_shape, width=8, depth=2))
    for result in (trained_site.round1, trained_site.round2):
        state = result.encoder_state
        assert {k: tuple(v.shape) for k, v in state.items()} == expected
        assert not any(k.startswith(OPACUS_PREFIX) for k in state)
        assert all(torch.isfinite(v).all() for v in state.values())
        assert math.isfinite(result.pretext_loss)
        assert result.num_examples == len(digits_site)
    moved = [k for k in expected if not torch.equal(trained_site.round1.encoder_state[k], global_encoder[k])]
    assert moved, "DP-SGD round left every encoder weight unchanged"


def test_dp_noise_and_sampling_are_not_predictable_from_the_plan(trained_site, state_copy, digits_site, make_plan, make_site):
    """The server knows the plan (seed, round), the site id and the mechanism. If that fixed the site's
    randomness, the server could regenerate the Gaussian noise and subtract it from the update.
    So the same round, run twice from the same state with the same inputs, must not give the same weights."""
    plan, start = make_plan(server_round=2), trained_site.round1.encoder_state
    a, b = (train_round(digits_site, start, plan, make_site(state_copy(trained_site.after_round1))) for _ in range(2))
    assert a.epsilon == b.epsilon == pytest.approx(trained_site.round2.epsilon, rel=1e-12)
    assert any(not torch.equal(a.encoder_state[k], b.encoder_state[k]) for k in start)


def test_without_dp_a_seeded_round_is_reproducible(tmp_path, digits_site, global_encoder, make_plan, make_site):
    a, b = (
        train_round(digits_site, global_encoder, make_plan(), make_site(tmp_path / name, enabled=False)) for name in ("a", "b")
    )
    assert all(torch.equal(a.encoder_state[k], b.encoder_state[k]) for k in global_encoder)


def test_simclr_is_refused_under_dp_before_anything_is_charged(tmp_path, digits_site, global_encoder, make_plan, make_site):
    state_dir = tmp_path / "site"
    with pytest.raises(PrivacyError, match="in-batch negatives"):
        train_round(digits_site, global_encoder, make_plan(pretext="simclr"), make_site(state_dir))
    assert not (state_dir / "accountant.json").exists()
    assert not (state_dir / "ledger.jsonl").exists()


def test_without_dp_a_round_trains_and_reports_infinite_epsilon(tmp_path, digits_site, global_encoder, make_plan, make_site):
    state_dir = tmp_path / "site"
    # A coupled method is fine without DP: nothing is claimed.
    result = train_round(digits_site, global_encoder, make_plan(pretext="simclr"), make_site(state_dir, enabled=False))
    assert result.status == STATUS_TRAINED
    assert result.epsilon == math.inf
    assert result.steps == LOCAL_STEPS
    assert set(result.encoder_state) == set(global_encoder)
    assert math.isfinite(result.pretext_loss)
    assert not (state_dir / "accountant.json").exists()  # no privacy state is pretended


def test_byol_round_runs_under_dp(trained_site, state_copy, digits_site, make_plan, make_site):
    state_dir = state_copy(trained_site.after_round1)
    start = trained_site.round1.encoder_state
    result = train_round(digits_site, start, make_plan(server_round=2, pretext="byol"), make_site(state_dir))
    assert result.status == STATUS_TRAINED
    assert result.epsilon == pytest.approx(trained_site.round2.epsilon, rel=1e-12)  # same mechanism, same charge
    assert set(result.encoder_state) == set(start)
    assert math.isfinite(result.pretext_loss)
    assert any(not torch.equal(result.encoder_state[k], start[k]) for k in start)


def test_byol_target_follows_the_noised_online_weights_by_ema(digits_site, global_encoder):
    """The EMA target update runs after the DP optimizer step and never receives gradients."""
    torch.manual_seed(0)
    encoder = build_encoder("cnn", digits_site.input_shape, width=8, depth=2)
    encoder.load_state_dict(global_encoder)
    model = get_pretext("byol", {"tau": 0.5}).build_model(encoder)
    targets_before = [p.detach().clone() for p in model.target_encoder.parameters()]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    private, private_optimizer, loader = PrivacyEngine().make_private(
        module=model,
        optimizer=optimizer,
        data_loader=DataLoader(TensorDataset(digits_site.inputs), batch_size=8),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=True,
    )
    (batch,) = next(b for b in loader if len(b[0]))
    private_optimizer.zero_grad()
    private(batch).mean().backward()
    assert all(p.grad is None and getattr(p, "grad_sample", None) is None for p in model.target_encoder.parameters())
    private_optimizer.step()
    model.after_optimizer_step()
    for before, target, online in zip(targets_before, model.target_encoder.parameters(), model.encoder.parameters(), strict=True):
        assert torch.allclose(target, 0.5 * before + 0.5 * online.detach(), atol=1e-6)
    assert any(not torch.equal(b, t) for b, t in zip(targets_before, model.target_encoder.parameters()))


def test_a_round_leaves_no_garbage_cycles_behind(digits_site, global_encoder, make_plan, make_site, tmp_path):
    """A process trains round after round (a site runner, a simulation worker): each private round's model,
    optimizer and DP engine must be freed when it returns, not left in reference cycles for a collector that
    counts objects rather than bytes (at batch 256 that grew a process by ~0.5 GB a round, to 24 GiB)."""
    import gc

    site = make_site(tmp_path / "state")
    train_round(digits_site, global_encoder, make_plan(server_round=1), site)  # imports and caches settle
    gc.collect()
    gc.disable()  # only what the round itself frees counts
    try:
        result = train_round(digits_site, global_encoder, make_plan(server_round=2), site)
        assert result.status == STATUS_TRAINED
        left = gc.collect()
        assert left < 50, f"the round left {left} objects of its model or DP engine in reference cycles"
    finally:
        gc.enable()


def test_a_round_collects_only_what_it_made_and_leaves_the_hosts_collector_as_it_found_it(
        digits_site, global_encoder, make_plan, make_site, tmp_path):
    """The round's closing collection scans only the objects the round made (the rest are frozen meanwhile):
    afterwards nothing of the host's stays frozen, and a host that had frozen objects itself keeps them frozen."""
    import gc

    site = make_site(tmp_path / "state")
    assert gc.get_freeze_count() == 0
    frozen_during_full_collections: list[int] = []

    def watch(phase: str, info: dict) -> None:
        if phase == "start" and info["generation"] == 2:
            frozen_during_full_collections.append(gc.get_freeze_count())

    gc.callbacks.append(watch)
    try:
        train_round(digits_site, global_encoder, make_plan(server_round=1), site)
    finally:
        gc.callbacks.remove(watch)
    # the round's closing collection ran with the host's objects frozen, i.e. it did not scan them
    assert frozen_during_full_collections and frozen_during_full_collections[-1] > 0, frozen_during_full_collections
    assert gc.get_freeze_count() == 0, "the round left the host's objects frozen"
    gc.freeze()
    try:
        host_frozen = gc.get_freeze_count()
        result = train_round(digits_site, global_encoder, make_plan(server_round=2), site)
        assert result.status == STATUS_TRAINED
        # still frozen (unfrozen would read 0); a few frozen objects die by reference count meanwhile
        assert 0.99 * host_frozen < gc.get_freeze_count() <= host_frozen, (host_frozen, gc.get_freeze_count())
    finally:
        gc.unfreeze()


def test_the_plan_carries_the_readout_grid_each_site_trains_through(digits_site, global_encoder, make_plan):
    """model.readout reaches every site in the plan: the pretext head reads the features the probe will."""
    from conftest import WIDTH
    from fedssl.errors import ConfigError
    from fedssl.training.local import build_pretext_model

    plan = TrainPlan.from_wire(make_plan(readout=1).to_wire())
    model = build_pretext_model(plan, digits_site.input_shape, global_encoder)
    assert plan.readout == 1 and model.encoder.readout == 1 and model.encoder.out_dim == WIDTH
    # a server from before model.readout sends none: the site picks the image's grid (2x2 at 8x8), as encoder_for does
    older = {key: value for key, value in plan.to_wire().items() if key != "readout"}
    assert build_pretext_model(TrainPlan.from_wire(older), digits_site.input_shape, global_encoder).encoder.readout == 2
    with pytest.raises(ConfigError, match=r"train config: readout must be a grid side in \[1, 8\], or 0 .*, got 9$"):
        TrainPlan.from_wire({**plan.to_wire(), "readout": 9})
    with pytest.raises(ConfigError, match="train config: readout only the cnn, resnet, vit encoders pool to a grid; leave it 0 for mlp, got 2"):
        TrainPlan.from_wire({**plan.to_wire(), "encoder": "mlp", "readout": 2})
