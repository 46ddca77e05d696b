"""Each pretext loss against a plain re-implementation (loops, explicit formulas), and BYOL's target network."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from fedssl.pretext.byol import BYOLModel, byol_loss
from fedssl.pretext.masked_reconstruction import MaskedReconstructionModel, masked_mse
from fedssl.pretext.rotation import rotate, rotation_loss
from fedssl.pretext.simclr import nt_xent_loss
from fedssl.pretext.simsiam import simsiam_loss

from pretext_cases import NO_AUGMENT, batch_for, make_model, seeded

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


# --- losses against plain re-implementations -------------------------------------------------


def test_rotation_loss_is_per_sample_cross_entropy() -> None:
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([0, 1, 2, 3, 1, 0])
    rows = zip(logits.tolist(), targets.tolist())
    expected = torch.tensor([-math.log(math.exp(row[t]) / sum(math.exp(v) for v in row)) for row, t in rows])
    assert torch.allclose(rotation_loss(logits, targets), expected, atol=1e-5)


def test_rotate_turns_each_image_by_its_own_quarter_turns() -> None:
    x = batch_for("cnn", 4)
    turns = torch.tensor([0, 3, 1, 2])
    rotated = rotate(x, turns)
    for i in range(4):
        assert torch.equal(rotated[i], torch.rot90(x[i], int(turns[i]), dims=(1, 2)))


def test_rotation_model_loss_is_the_cross_entropy_of_the_drawn_rotation() -> None:
    model = make_model("rotation")
    x = batch_for("cnn", 5)
    loss = seeded(model, x).detach()
    torch.manual_seed(3)
    turns = torch.randint(0, 4, (5,))  # the model's only random draw
    for i in range(5):
        image = torch.rot90(x[i], int(turns[i]), dims=(1, 2))[None]
        logits = model.head(model.encoder(image))[0]
        assert torch.isclose(loss[i], -torch.log_softmax(logits, dim=0)[turns[i]], atol=1e-5)


def test_all_rotations_averages_the_four_rotation_losses() -> None:
    model = make_model("rotation", all_rotations=True)
    x = batch_for("cnn", 3)
    with torch.no_grad():
        loss = model(x)
        per_turn = [
            rotation_loss(model.head(model.encoder(torch.rot90(x, k, dims=(2, 3)))), torch.full((3,), k))
            for k in range(4)
        ]
    assert torch.allclose(loss, sum(per_turn) / 4, atol=1e-6)


def test_masked_mse_averages_only_masked_positions() -> None:
    gen = torch.Generator().manual_seed(0)
    recon, target = torch.randn(3, 1, 4, 4, generator=gen), torch.randn(3, 1, 4, 4, generator=gen)
    mask = (torch.rand(3, 1, 4, 4, generator=gen) < 0.5).float()
    mask[:, 0, 0, 0] = 1
    expected = []
    for r, t, m in zip(recon.flatten(1).tolist(), target.flatten(1).tolist(), mask.flatten(1).tolist()):
        errors = [(a - b) ** 2 for a, b, keep in zip(r, t, m) if keep]
        expected.append(sum(errors) / len(errors))
    assert torch.allclose(masked_mse(recon, target, mask), torch.tensor(expected), atol=1e-5)


def test_image_masks_hide_whole_patches_at_the_configured_ratio() -> None:
    model = make_model("masked_reconstruction", mask_ratio=0.25, patch_size=2)
    assert isinstance(model, MaskedReconstructionModel)
    mask = model.sample_mask(batch_for("cnn", 6))
    patches = mask.unfold(2, 2, 2).unfold(3, 2, 2).reshape(6, 16, 4)
    assert (patches.amin(-1) == patches.amax(-1)).all()  # constant within each 2x2 patch
    assert (patches[..., 0].sum(1) == 4).all()  # 25% of 16 patches, for every sample
    assert not torch.equal(mask[0], mask[1])  # drawn per sample


def test_masked_reconstruction_loss_scores_the_decoder_on_hidden_pixels() -> None:
    model = make_model("masked_reconstruction", decoder_hidden=8)
    x = batch_for("cnn", 4)
    loss = seeded(model, x).detach()
    torch.manual_seed(3)
    mask = model.sample_mask(x)
    with torch.no_grad():
        recon = model.decoder(model.encoder(x * (1 - mask))).view_as(x)
    expected = [((recon[i] - x[i]) ** 2)[mask[i] == 1].mean() for i in range(4)]
    assert torch.allclose(loss, torch.stack(expected), atol=1e-6)


def test_byol_loss_is_two_minus_two_cosine() -> None:
    gen = torch.Generator().manual_seed(0)
    p, z = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen)
    expected = [2 - 2 * (pi @ zi) / (pi.norm() * zi.norm()) for pi, zi in zip(p, z)]
    assert torch.allclose(byol_loss(p, z), torch.stack(expected), atol=1e-6)


def test_simsiam_loss_is_negative_cosine_with_stop_gradient() -> None:
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(5, 7, generator=gen, requires_grad=True)
    z = torch.randn(5, 7, generator=gen, requires_grad=True)
    loss = simsiam_loss(p, z)
    expected = [-(pi @ zi) / (pi.norm() * zi.norm()) for pi, zi in zip(p.detach(), z.detach())]
    assert torch.allclose(loss, torch.stack(expected), atol=1e-6)
    loss.sum().backward()
    assert z.grad is None and p.grad is not None


def test_nt_xent_matches_a_loop_over_all_anchors() -> None:
    gen = torch.Generator().manual_seed(0)
    z1, z2, temperature = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen), 0.3
    z = [v / v.norm() for v in torch.cat([z1, z2])]
    n = len(z)
    per_anchor = []
    for a in range(n):
        positive = (a + n // 2) % n
        denominator = sum(math.exp(float(z[a] @ z[k]) / temperature) for k in range(n) if k != a)
        per_anchor.append(-math.log(math.exp(float(z[a] @ z[positive]) / temperature) / denominator))
    expected = torch.tensor([(per_anchor[i] + per_anchor[i + 4]) / 2 for i in range(4)])
    assert torch.allclose(nt_xent_loss(z1, z2, temperature), expected, atol=1e-5)


def test_byol_model_loss_with_identity_views_is_the_symmetrised_byol_loss() -> None:
    model = make_model("byol", **NO_AUGMENT)
    assert isinstance(model, BYOLModel)
    x = batch_for("cnn", 3)
    with torch.no_grad():
        p = model.predictor(model.projector(model.encoder(x)))
        z = model.target_projector(model.target_encoder(x))
        expected = 2 * (2 - 2 * nn.functional.cosine_similarity(p, z))
        assert torch.allclose(model(x), expected, atol=1e-5)


def test_simsiam_and_simclr_models_with_identity_views_match_their_losses() -> None:
    x = batch_for("cnn", 3)
    simsiam, simclr = make_model("simsiam", **NO_AUGMENT), make_model("simclr", temperature=0.2, **NO_AUGMENT)
    with torch.no_grad():
        z = simsiam.projector(simsiam.encoder(x))
        assert torch.allclose(simsiam(x), simsiam_loss(simsiam.predictor(z), z), atol=1e-5)
        z = simclr.projector(simclr.encoder(x))
        assert torch.allclose(simclr(x), nt_xent_loss(z, z, 0.2), atol=1e-5)


# --- BYOL target ------------------------------------------------------------------------------


def test_byol_target_gets_no_gradient_and_follows_online_by_tau() -> None:
    model = make_model("byol", tau=0.9)
    assert isinstance(model, BYOLModel)
    targets = list(model.target_encoder.parameters()) + list(model.target_projector.parameters())
    onlines = list(model.encoder.parameters()) + list(model.projector.parameters())
    assert all(not t.requires_grad for t in targets)
    assert all(torch.equal(t, o) for t, o in zip(targets, onlines))  # starts as a copy
    assert not any(name.startswith("target") for name in model.encoder.state_dict())  # never exchanged

    model(batch_for("cnn", 4)).mean().backward()
    assert all(t.grad is None for t in targets)
    old_targets = [t.clone() for t in targets]
    with torch.no_grad():
        for o in onlines:
            o.add_(torch.randn_like(o))
    model.after_optimizer_step()
    for t, old, o in zip(targets, old_targets, onlines, strict=True):
        assert torch.allclose(t, 0.9 * old + 0.1 * o, atol=1e-6)

    model.sync_target()
    assert all(torch.equal(t, o) for t, o in zip(targets, onlines))


def test_other_methods_have_a_no_op_after_optimizer_step() -> None:
    model = make_model("simsiam")
    before = copy.deepcopy(model.state_dict())
    model.after_optimizer_step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
