"""FedEMA: the divergence-aware start against the paper's formula, and a site's two real rounds."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from fedssl.fl import keys
from fedssl.fl.plan import TrainPlan
from fedssl.models import build_encoder
from fedssl.training import fedema

PLAN = TrainPlan(run_id="run-a", server_round=2, planned_rounds=3, pretext="rotation", encoder="cnn", width=4, depth=1,
                 local_steps=2, batch_size=8, lr=0.05, local_update="fedema", fedema_tau=0.7)


def states(seed_global: int = 0, seed_local: int = 1) -> tuple[dict, dict]:
    g = build_encoder("cnn", (1, 8, 8), width=4, depth=1, seed=seed_global).state_dict()
    local = build_encoder("cnn", (1, 8, 8), width=4, depth=1, seed=seed_local).state_dict()
    return g, local


def by_hand_distance(a: dict, b: dict) -> float:
    return math.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in a))


def test_the_first_round_of_a_run_starts_from_the_global_encoder(tmp_path):
    g, _ = states()
    start, scale = fedema.start_weights(g, tmp_path, PLAN)
    assert scale is None and all(torch.equal(start[k], g[k]) for k in g)


def test_the_second_round_starts_at_mu_tau_and_later_ones_follow_the_divergence(tmp_path):
    g, local = states()
    fedema.remember(local, tmp_path, dataclasses.replace(PLAN, server_round=1), None)
    start, scale = fedema.start_weights(g, tmp_path, PLAN)
    distance = by_hand_distance(g, local)
    assert scale == pytest.approx(0.7 / distance)  # the autoscaler: lambda = tau / ||w_g - w_l||
    for k in g:  # mu = min(lambda * distance, 1) = tau
        assert torch.allclose(start[k], 0.7 * local[k] + 0.3 * g[k], atol=1e-6)
    # Round 3: lambda is kept; a global model twice as far away gives mu = min(2 tau, 1) = 1 (all local)
    fedema.remember(local, tmp_path, PLAN, scale)
    far = {k: local[k] + 2 * (g[k] - local[k]) for k in g}
    start3, scale3 = fedema.start_weights(far, tmp_path, dataclasses.replace(PLAN, server_round=3))
    assert scale3 == scale and all(torch.allclose(start3[k], local[k], atol=1e-6) for k in g)


def test_another_run_a_changed_encoder_or_a_damaged_file_start_from_the_global_encoder(tmp_path):
    g, local = states()
    fedema.remember(local, tmp_path, PLAN, 3.0)
    other_run = dataclasses.replace(PLAN, run_id="run-b")
    assert fedema.start_weights(g, tmp_path, other_run)[1] is None
    wider = build_encoder("cnn", (1, 8, 8), width=8, depth=1, seed=0).state_dict()
    assert all(torch.equal(a, b) for a, b in zip(fedema.start_weights(wider, tmp_path, PLAN)[0].values(), wider.values()))
    (tmp_path / fedema.STATE_FILE).write_bytes(b"not a torch file")
    start, scale = fedema.start_weights(g, tmp_path, PLAN)
    assert scale is None and all(torch.equal(start[k], g[k]) for k in g)


def test_fedavg_plans_neither_read_nor_write_the_state(tmp_path):
    g, local = states()
    plain = dataclasses.replace(PLAN, local_update="global")
    fedema.remember(local, tmp_path, plain, None)
    assert not (tmp_path / fedema.STATE_FILE).exists()
    fedema.remember(local, tmp_path, PLAN, None)
    start, _ = fedema.start_weights(g, tmp_path, plain)
    assert all(torch.equal(start[k], g[k]) for k in g)


def test_a_bad_local_update_in_the_plan_is_one_line():
    with pytest.raises(ValueError, match="train config: local-update must be one of global, fedema, got 'ema'"):
        TrainPlan.from_wire({**PLAN.to_wire(), "local-update": "ema"})


def test_a_deployed_site_keeps_its_encoder_between_two_real_rounds(tmp_path):
    """run_site_round twice at one site (real data on disk, real DP training, its own ledger): after
    round 1 the state holds the trained encoder; round 2 sets lambda from the real divergence."""
    from fedssl.data.loaders import load_digits_labeled
    from fedssl.site_round import run_site_round
    from tests.site_layout import write_site_yaml

    rows = load_digits_labeled()[0].subset(list(range(64))).inputs.numpy()
    tmp_path.mkdir(exist_ok=True)
    np.save(tmp_path / "data.npy", rows)
    site_yaml = write_site_yaml(tmp_path, target_epsilon=1.0)
    node = {keys.NODE_SITE_CONFIG: str(site_yaml)}
    g1 = build_encoder("cnn", (1, 8, 8), width=4, depth=1, seed=0).state_dict()
    first = run_site_round(node, {}, dataclasses.replace(PLAN, server_round=1).to_wire(), g1)
    assert first.result.status == keys.STATUS_TRAINED, first.result.reason
    saved = torch.load(tmp_path / "state" / fedema.STATE_FILE, weights_only=True)
    assert saved["run_id"] == "run-a" and saved["scale"] is None
    assert all(torch.equal(saved["encoder"][k], first.result.encoder_state[k]) for k in g1)

    g2 = build_encoder("cnn", (1, 8, 8), width=4, depth=1, seed=5).state_dict()
    second = run_site_round(node, {}, PLAN.to_wire(), g2)
    assert second.result.status == keys.STATUS_TRAINED, second.result.reason
    after = torch.load(tmp_path / "state" / fedema.STATE_FILE, weights_only=True)
    assert after["scale"] == pytest.approx(0.7 / by_hand_distance(g2, saved["encoder"]), rel=1e-6)
