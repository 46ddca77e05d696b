"""MoCo: the InfoNCE loss by hand, the queue, and the cross-step coupling that makes ``moco`` refused under DP."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fedssl.errors import PrivacyError
from fedssl.models import build_encoder
from fedssl.pretext import PRETEXT_TASKS, get_pretext, require_dp_compatible
from fedssl.pretext.moco import MoCoModel, info_nce_loss

SMALL = {"hidden_dim": 16, "projection_dim": 8, "num_negatives": 6}


def make(name: str, **params) -> MoCoModel:
    encoder = build_encoder("cnn", (1, 8, 8), width=8, depth=2, seed=0)
    torch.manual_seed(1)
    return get_pretext(name, {**SMALL, **params}).build_model(encoder)


def test_info_nce_is_minus_log_softmax_of_the_positive_by_hand():
    g = torch.Generator().manual_seed(0)
    q, k, n = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g), torch.randn(5, 4, generator=g)
    got = info_nce_loss(q, k, n, temperature=0.5)
    for i in range(3):
        unit = lambda v: v / v.norm()  # noqa: E731
        pos = math.exp(float(unit(q[i]) @ unit(k[i])) / 0.5)
        negs = sum(math.exp(float(unit(q[i]) @ unit(n[j])) / 0.5) for j in range(5))
        assert got[i].item() == pytest.approx(-math.log(pos / (pos + negs)), rel=1e-5)


def test_the_queue_takes_each_steps_keys_first_in_first_out():
    model = make("moco")
    before = model.queue.clone()
    model(torch.rand(4, 1, 8, 8)).mean().backward()
    assert torch.equal(model.queue[4:], before[4:]) and not torch.equal(model.queue[:4], before[:4])
    assert int(model.queue_next) == 4
    model(torch.rand(4, 1, 8, 8)).mean().backward()  # wraps around: slots 4, 5, 0, 1
    assert int(model.queue_next) == 2
    with torch.no_grad():
        queue = model.queue.clone()
        model(torch.rand(4, 1, 8, 8))  # evaluation passes never enqueue
    assert torch.equal(model.queue, queue)


@pytest.mark.parametrize("name", sorted(PRETEXT_TASKS))
def test_a_sample_from_an_earlier_step_changes_later_losses_only_for_moco(name):
    """The attack on a queue: two sites identical but for one record in step 1 must give the same
    step-2 losses on the same step-2 batch (no optimizer step between, so the weights are equal).
    Only moco's queue carries the record into step 2, which is why it is refused under DP."""
    modalities = PRETEXT_TASKS[name].modalities
    text = "text" in modalities
    # Text tasks see token ids through the transformer; vector-only methods (tables: vime, scarf) the same
    # pixels as 64-feature rows through an MLP; time-series ones (masked_segment, ts_views) as 2 x 32 series.
    kind, shape = (("transformer", (12,)) if text else ("conv1d", (2, 32)) if "timeseries" in modalities
                   else ("cnn", (1, 8, 8)) if "image" in modalities else ("mlp", (64,)))
    encoder = build_encoder(kind, shape, width=8, depth=1 if text else 2, seed=0)

    def rand(n, generator):  # n samples of the method's input; token ids for a text task
        x = torch.rand(n, 1, 8, 8, generator=generator)
        return (x.flatten(1)[:, :12] * 250 + 3).floor() if text else x.view(n, *shape)
    torch.manual_seed(1)
    small = {"hidden_dim": 16, "projection_dim": 8} if name in ("byol", "simsiam", "simclr", "moco", "moco_noise", "scarf") else {}
    site = get_pretext(name, small).build_model(encoder)
    neighbour = copy.deepcopy(site)
    step1 = rand(4, torch.Generator().manual_seed(2))
    step1_neighbour = step1.clone()
    step1_neighbour[0] = rand(1, torch.Generator().manual_seed(9))[0]
    for model, batch in ((site, step1), (neighbour, step1_neighbour)):
        torch.manual_seed(3)
        model(batch).mean().backward()
    step2 = rand(4, torch.Generator().manual_seed(5))
    later = []
    for model in (site, neighbour):
        torch.manual_seed(4)
        with torch.no_grad():
            later.append(model(step2))
    influenced = not torch.allclose(later[0], later[1], atol=1e-6)
    assert influenced == (name == "moco")


def test_moco_is_refused_under_dp_with_the_reason_and_the_noise_variant_is_not():
    with pytest.raises(PrivacyError, match="queue of earlier batches' keys") as err:
        require_dp_compatible(get_pretext("moco"))
    assert "moco_noise" in str(err.value) and "privacy.enabled=false" in str(err.value)
    require_dp_compatible(get_pretext("moco_noise"))


def test_noise_negatives_are_fresh_each_step_and_depend_on_no_sample():
    model = make("moco_noise")
    torch.manual_seed(0)
    first = model._negatives(torch.zeros(1))
    torch.manual_seed(0)
    again = model._negatives(torch.ones(5))  # a different batch: the same negatives for the same draw
    assert torch.equal(first, again) and first.shape == (6, 8)
    assert not torch.equal(model._negatives(torch.zeros(1)), first)


def test_the_key_encoder_follows_the_query_encoder_by_momentum():
    model = make("moco", tau=0.5)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    key_before = [p.clone() for p in model.key_encoder.parameters()]
    model.after_optimizer_step()
    for k0, k1, q in zip(key_before, model.key_encoder.parameters(), model.encoder.parameters()):
        assert torch.allclose(k1, 0.5 * k0 + 0.5 * q)
    assert not any(p.requires_grad for p in model.key_encoder.parameters())
