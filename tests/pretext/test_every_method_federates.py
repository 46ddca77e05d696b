"""Every registered pretext method, over the registry: two DP sites train two rounds, or it is refused.

A new method cannot be added untested: this is parametrized over ``PRETEXT_TASKS`` itself. Each
site is deployed as an operator lays it out (its own data file, site.yaml, ledger key and budget)
and runs the same site round the Flower ClientApp runs (``fedssl.site_round.run_site_round``);
between rounds the two replies are averaged as FedAvg does, so round 2 starts from a global encoder
both sites moved. Flower itself is exercised by the simulation and deployment tests (tests/run,
tests/deploy); here the subject is each method's DP training path and its refusal.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from fedssl.errors import ConfigError
from fedssl.fl import keys
from fedssl.fl.plan import TrainPlan
from fedssl.models import build_encoder
from fedssl.pretext import PRETEXT_TASKS, check_config
from tests.site_layout import write_site_yaml

ROOT = Path(__file__).resolve().parents[2]
ROWS_PER_SITE = 48
SMALL_HEADS = {"hidden_dim": 8, "projection_dim": 4}
PLAN = TrainPlan(run_id="registry-run", server_round=1, planned_rounds=2, pretext="rotation", encoder="cnn", width=4,
                 depth=1, local_steps=2, batch_size=8, lr=0.05)


def small_params(name: str) -> dict:
    fields = {f.name for f in dataclasses.fields(PRETEXT_TASKS[name].Params)}
    params = {k: v for k, v in SMALL_HEADS.items() if k in fields}
    if "num_negatives" in fields:
        params["num_negatives"] = 8
    return params


@pytest.fixture(scope="module")
def site_rows():
    from fedssl.data.loaders import load_digits_labeled

    rows = load_digits_labeled()[0].subset(list(range(2 * ROWS_PER_SITE))).inputs.numpy()
    return [rows[:ROWS_PER_SITE], rows[ROWS_PER_SITE:]]


@pytest.fixture(scope="module")
def text_rows():
    """Token ids of short texts (float32, as a site's .npy holds them) for text-only methods."""
    from fedssl.data.text import encode

    texts = [f"sample {i}: the bank moved {i * 7} euros" for i in range(2 * ROWS_PER_SITE)]
    rows = np.array([encode(t, 24) for t in texts], dtype=np.float32)
    return [rows[:ROWS_PER_SITE], rows[ROWS_PER_SITE:]]


def fedavg(replies) -> dict[str, torch.Tensor]:
    states = [reply.result.encoder_state for reply in replies]
    return {name: sum(state[name] for state in states) / len(states) for name in states[0]}


@pytest.mark.parametrize("name", sorted(PRETEXT_TASKS))
def test_each_method_trains_two_dp_rounds_at_two_sites_or_is_refused_with_its_reason(name, tmp_path, site_rows, text_rows):
    task = PRETEXT_TASKS[name]
    text, series = "text" in task.modalities, "timeseries" in task.modalities
    if not task.dp_compatible:
        from fedssl.config import load_config

        config = load_config(str(ROOT / "configs" / "experiments" / "digits-tiny.yaml"), [f"pretext.name={name}", "privacy.enabled=true"])
        with pytest.raises(ConfigError, match=rf"pretext\.name: pretext '{name}' .*DP-SGD's guarantee is void"):
            check_config(config)
        assert task.coupling  # the reason the user reads
        return
    from fedssl.site_round import run_site_round

    # Text trains the transformer on token ids; a method for vectors only (tables: vime) an MLP on the
    # same rows as the images, flattened; a time-series method conv1d on them as 2-channel series of 32 steps.
    encoder, shape = (("transformer", (24,)) if text else ("conv1d", (2, 32)) if series
                      else ("cnn", (1, 8, 8)) if "image" in task.modalities else ("mlp", (64,)))
    nodes = []
    for site_id, rows in enumerate(text_rows if text else site_rows):
        root = tmp_path / f"site-{site_id}"
        root.mkdir()
        np.save(root / "data.npy", rows.reshape(len(rows), *shape))
        site_yaml = write_site_yaml(root, target_epsilon=2.0, site_id=site_id, data_kind="timeseries" if series else "auto")
        nodes.append({keys.NODE_SITE_CONFIG: str(site_yaml)})
    plan = dataclasses.replace(PLAN, pretext=name, pretext_params=small_params(name), encoder=encoder)
    global_state = build_encoder(encoder, shape, width=4, depth=1, seed=0).state_dict()
    epsilons = []
    for server_round in (1, 2):
        wire = dataclasses.replace(plan, server_round=server_round).to_wire()
        replies = [run_site_round(node, {}, wire, global_state) for node in nodes]
        assert [r.result.status for r in replies] == [keys.STATUS_TRAINED] * 2, [r.result.reason for r in replies]
        moved = fedavg(replies)
        assert any(not torch.equal(moved[k], global_state[k]) for k in global_state)
        assert all(torch.isfinite(v).all() for v in moved.values())
        epsilons.append([r.result.epsilon for r in replies])
        global_state = moved
    assert all(0 < first < second <= 2.0 for first, second in zip(*epsilons)), epsilons
