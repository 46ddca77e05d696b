"""Tests for fedssl.pretext: registry, parameters, per-sample losses and Opacus compatibility.

Reference tests re-implement each loss plainly (loops, explicit formulas) and compare; the
per-sample tests check the property DP-SGD relies on: sample i's loss and gradient depend on
sample i alone (and pin that SimCLR's do not).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

from fedssl.errors import ConfigError, PrivacyError
from fedssl.models import build_encoder
from fedssl.pretext import PRETEXT_TASKS, PretextModel, get_pretext, require_dp_compatible
from fedssl.pretext.augment import Augmenter, random_erasing
from fedssl.pretext.byol import BYOLModel, byol_loss
from fedssl.pretext.masked_reconstruction import MaskedReconstructionModel, masked_mse
from fedssl.pretext.rotation import rotate, rotation_loss
from fedssl.pretext.simclr import nt_xent_loss
from fedssl.pretext.simsiam import simsiam_loss

# Opacus hooks warn when the input itself needs no gradient, which is always the case here.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

IMAGE_SHAPE = (1, 8, 8)
VECTOR_SHAPE = (12,)
SERIES_SHAPE = (2, 16)  # (channels, length)
SHAPES = {"cnn": IMAGE_SHAPE, "mlp": VECTOR_SHAPE, "conv1d": SERIES_SHAPE}
ALL = ["byol", "jigsaw", "masked_reconstruction", "masked_segment", "masked_tokens", "moco", "moco_noise", "rotation",
       "scarf", "simclr", "simsiam", "ts_views", "vime"]
PER_SAMPLE = ["byol", "jigsaw", "masked_reconstruction", "masked_segment", "masked_tokens", "moco_noise", "rotation",
              "simsiam", "ts_views", "vime"]
# Per sample within one step; moco couples samples across steps instead (tests/pretext/test_moco.py).
PER_SAMPLE_WITHIN_A_STEP = [*PER_SAMPLE, "moco"]
IMAGE_ONLY = {"jigsaw", "rotation"}
TEXT_ONLY = {"masked_tokens"}  # on token ids with the transformer: tests/text/test_text.py
VECTOR_ONLY = {"scarf", "vime"}  # tables
SERIES_ONLY = {"masked_segment", "ts_views"}  # time series (C, L) with conv1d; more in tests/timeseries
IMAGE_OR_VECTOR = [name for name in ALL if name not in TEXT_ONLY | SERIES_ONLY]
# Every (method, modality) pair a method claims to support.
CASES = ([(name, "cnn") for name in IMAGE_OR_VECTOR if name not in VECTOR_ONLY]
         + [(name, "mlp") for name in IMAGE_OR_VECTOR if name not in IMAGE_ONLY]
         + [(name, "conv1d") for name in sorted(SERIES_ONLY)])
NO_AUGMENT = {
    "crop_scale": 1.0,
    "max_rotation": 0.0,
    "max_shift": 0.0,
    "noise_std": 0.0,
    "erase_prob": 0.0,
    "feature_mask_prob": 0.0,
}


def make_model(name: str, kind: str = "cnn", **params: object) -> PretextModel:
    encoder = build_encoder(kind, SHAPES[kind], width=8, depth=2, seed=0)
    # Non-trivial site-only parts too: heads are seeded so failures reproduce.
    torch.manual_seed(1)
    return get_pretext(name, dict(params)).build_model(encoder)


def batch_for(kind: str, size: int, seed: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(size, *SHAPES[kind], generator=generator)


def seeded(model: nn.Module, x: torch.Tensor, seed: int = 3) -> torch.Tensor:
    torch.manual_seed(seed)
    return model(x)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# --- registry and parameters -----------------------------------------------------------------


def test_registry_lists_every_method() -> None:
    assert sorted(PRETEXT_TASKS) == ALL
    assert {n for n, t in PRETEXT_TASKS.items() if t.dp_compatible} == set(PER_SAMPLE)
    for task in PRETEXT_TASKS.values():
        assert task.paper and task.modalities


def test_unknown_pretext_is_rejected_with_the_valid_names() -> None:
    with pytest.raises(ValueError) as err:
        get_pretext("mocov3")
    assert "'mocov3'" in str(err.value)
    for name in ALL:
        assert name in str(err.value)


def test_unknown_param_names_the_key_and_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"pretext\.params\.momentum.*valid parameters: .*tau"):
        get_pretext("byol", {"momentum": 0.9})


@pytest.mark.parametrize(
    ("name", "params", "expected"),
    [
        ("byol", {"tau": 1.5}, r"pretext\.params\.tau: must be a number in \[0, 1\], got 1\.5"),
        ("byol", {"tau": float("nan")}, r"pretext\.params\.tau"),
        ("byol", {"hidden_dim": 0}, r"pretext\.params\.hidden_dim: must be an integer >= 1"),
        ("byol", {"hidden_dim": 2.5}, r"pretext\.params\.hidden_dim: must be an integer"),
        ("byol", {"hidden_dim": True}, r"pretext\.params\.hidden_dim: must be an integer"),
        ("rotation", {"all_rotations": 1}, r"pretext\.params\.all_rotations: must be a boolean"),
        ("masked_reconstruction", {"mask_ratio": 1.0}, r"pretext\.params\.mask_ratio: must be a number in \(0, 1\)"),
        ("simclr", {"temperature": 0}, r"pretext\.params\.temperature: must be a number > 0"),
        ("simsiam", {"feature_mask_prob": 1.0}, r"pretext\.params\.feature_mask_prob"),
    ],
)
def test_invalid_param_values_are_rejected_with_the_range(name: str, params: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        get_pretext(name, params)


def test_valid_params_are_kept_and_defaults_filled() -> None:
    task = get_pretext("byol", {"tau": 1})
    assert task.params.tau == 1.0 and isinstance(task.params.tau, float)
    assert get_pretext("masked_reconstruction").params.mask_ratio == 0.5


def test_rotation_refuses_vectors_and_non_square_images() -> None:
    with pytest.raises(ValueError, match=r"vector.*valid choices for vector data: byol, masked_reconstruction"):
        get_pretext("rotation").build_model(build_encoder("mlp", VECTOR_SHAPE, width=8, depth=1))
    with pytest.raises(ValueError, match="square"):
        get_pretext("rotation").build_model(build_encoder("cnn", (1, 8, 6), width=8, depth=1))


def test_patch_size_must_divide_the_image() -> None:
    with pytest.raises(ValueError, match=r"pretext\.params\.patch_size: must divide the image size 8x8, got 3"):
        get_pretext("masked_reconstruction", {"patch_size": 3}).build_model(build_encoder("cnn", IMAGE_SHAPE, width=8))


def test_simclr_is_refused_under_dp_and_the_others_pass() -> None:
    with pytest.raises(PrivacyError, match="in-batch negatives") as err:
        require_dp_compatible(get_pretext("simclr"))
    assert "privacy.enabled=false" in str(err.value) and "simsiam" in str(err.value)
    for name in PER_SAMPLE:
        require_dp_compatible(get_pretext(name))


# --- the model contract: shapes, empty batches, Opacus ---------------------------------------


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_forward_returns_one_loss_per_sample(name: str, kind: str) -> None:
    model = make_model(name, kind)
    loss = model(batch_for(kind, 5))
    assert loss.shape == (5,) and torch.isfinite(loss).all()


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_empty_batch_gives_empty_loss_that_backpropagates(name: str, kind: str) -> None:
    model = make_model(name, kind)
    loss = model(batch_for(kind, 0))
    assert loss.shape == (0,) and loss.requires_grad
    loss.mean().backward()
    for p in trainable(model):
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_opacus_accepts_the_model_and_gives_per_sample_grads(name: str, kind: str) -> None:
    model = make_model(name, kind)
    assert ModuleValidator.validate(model, strict=False) == []
    wrapped = GradSampleModule(model)
    for size in (4, 0):
        wrapped(batch_for(kind, size)).mean().backward()
        for p in trainable(model):
            assert p.grad_sample is not None and p.grad_sample.shape == (size, *p.shape)
            p.grad_sample = None


@pytest.mark.parametrize("name", [*IMAGE_OR_VECTOR, *sorted(SERIES_ONLY)])
def test_opacus_grad_samples_are_the_gradients_of_each_samples_own_loss(name: str) -> None:
    # The per-sample gradient of loss_i, computed by plain autograd on an unwrapped copy with the
    # same random views, is what DP-SGD must clip. Opacus attributes gradient by batch index, so
    # the two agree exactly when the loss decomposes per sample, and must not agree for SimCLR.
    kind = "mlp" if name in VECTOR_ONLY else "conv1d" if name in SERIES_ONLY else "cnn"
    model = make_model(name, kind)
    reference = copy.deepcopy(model)
    x = batch_for(kind, 4)
    wrapped = GradSampleModule(model)
    seeded(wrapped, x).mean().backward()
    losses = seeded(reference, x)
    agree = True
    for i in range(4):
        own = torch.autograd.grad(losses[i], trainable(reference), retain_graph=True)
        for p, g in zip(trainable(model), own, strict=True):
            agree &= torch.allclose(p.grad_sample[i], g, rtol=1e-3, atol=1e-6)
    assert agree == (name in PER_SAMPLE_WITHIN_A_STEP)


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_changing_one_sample_changes_only_its_own_loss_iff_dp_compatible(name: str, kind: str) -> None:
    model = make_model(name, kind)
    x = batch_for(kind, 4)
    changed = x.clone()
    changed[3] = batch_for(kind, 1, seed=9)[0]
    with torch.no_grad():
        before, after = seeded(model, x), seeded(model, changed)
    assert not torch.allclose(before[3], after[3])  # the change matters at all
    others_unchanged = torch.allclose(before[:3], after[:3], rtol=1e-5, atol=1e-6)
    assert others_unchanged == (name in PER_SAMPLE_WITHIN_A_STEP)


def test_seeded_forward_is_reproducible() -> None:
    model = make_model("byol")
    x = batch_for("cnn", 5)
    with torch.no_grad():
        assert torch.equal(seeded(model, x), seeded(model, x))
        assert not torch.equal(seeded(model, x, seed=3), seeded(model, x, seed=4))


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


# --- augmentations ----------------------------------------------------------------------------


def test_zero_strength_augmentation_is_the_identity() -> None:
    params = get_pretext("byol", NO_AUGMENT).params
    for modality, kind in (("image", "cnn"), ("vector", "mlp")):
        x = batch_for(kind, 4)
        assert torch.allclose(Augmenter(params, modality)(x), x, atol=1e-6)


def test_each_sample_gets_its_own_view() -> None:
    params = get_pretext("byol").params
    for modality, kind in (("image", "cnn"), ("vector", "mlp")):
        same = batch_for(kind, 1).expand(6, *batch_for(kind, 1).shape[1:])
        views = Augmenter(params, modality)(same)
        assert views.shape == same.shape
        assert all(not torch.allclose(views[0], views[i]) for i in range(1, 6))


def test_vector_feature_masking_hits_the_configured_fraction() -> None:
    params = get_pretext("byol", {"noise_std": 0.0, "feature_mask_prob": 0.3}).params
    views = Augmenter(params, "vector")(torch.ones(200, 50))
    assert abs((views == 0).float().mean().item() - 0.3) < 0.02


def test_random_erasing_zeroes_one_rectangle_per_erased_image() -> None:
    erased = random_erasing(torch.ones(50, 1, 8, 8), prob=1.0, max_frac=0.5)
    for image in erased[:, 0]:
        rows, cols = (image == 0).any(dim=1), (image == 0).any(dim=0)
        assert 1 <= rows.sum() <= 4 and 1 <= cols.sum() <= 4
        assert (image == 0).sum() == rows.sum() * cols.sum()  # a full rectangle, nothing else
    assert torch.equal(random_erasing(torch.ones(5, 1, 8, 8), prob=0.0, max_frac=0.5), torch.ones(5, 1, 8, 8))


# --- training smoke tests ---------------------------------------------------------------------


def test_adam_steps_on_digits_reduce_rotation_loss() -> None:
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().data[:64], dtype=torch.float32).view(64, 1, 8, 8) / 16
    encoder = build_encoder("cnn", IMAGE_SHAPE, width=16, depth=2, seed=0)
    torch.manual_seed(0)
    model = get_pretext("rotation", {"all_rotations": True}).build_model(encoder)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    with torch.no_grad():
        before = model(x).mean().item()
    for _ in range(30):
        optimizer.zero_grad()
        model(x).mean().backward()
        optimizer.step()
        model.after_optimizer_step()
    with torch.no_grad():
        after = model(x).mean().item()
    assert after < 0.8 * before, (before, after)


def test_byol_trains_under_opacus_dp_sgd_with_poisson_batches() -> None:
    # The path local training takes: make_private wraps the whole model; the frozen target is
    # skipped by the DP optimizer and updated after each step from the privatized online weights.
    from opacus import PrivacyEngine

    torch.manual_seed(0)
    model = make_model("byol", tau=0.5)
    data = torch.utils.data.TensorDataset(batch_for("cnn", 32))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    engine = PrivacyEngine()
    private, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=True,
    )
    target_before = copy.deepcopy(model.target_encoder.state_dict())
    for (x,) in loader:
        optimizer.zero_grad()
        private(x).mean().backward()
        optimizer.step()
        private._module.after_optimizer_step()
    assert any(not torch.equal(target_before[k], v) for k, v in model.target_encoder.state_dict().items())
    assert engine.get_epsilon(delta=1e-5) > 0
