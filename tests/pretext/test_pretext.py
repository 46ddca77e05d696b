"""Tests for fedssl.pretext: registry, parameters, the model contract (per-sample losses, Opacus), augmentations.

The per-sample tests check the property DP-SGD relies on: sample i's loss and gradient depend on sample i alone
(and pin that SimCLR's do not). Each loss against a plain re-implementation: test_pretext_losses.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from fedssl.errors import ConfigError, PrivacyError
from fedssl.models import build_encoder
from fedssl.pretext import PRETEXT_TASKS, get_pretext, require_dp_compatible
from fedssl.pretext.augment import Augmenter, random_erasing

from pretext_cases import (
    ALL, CASES, IMAGE_OR_VECTOR, IMAGE_SHAPE, NO_AUGMENT, PER_SAMPLE, PER_SAMPLE_WITHIN_A_STEP, SERIES_ONLY, VECTOR_ONLY,
    VECTOR_SHAPE, batch_for, make_model, seeded, trainable,
)

# Opacus hooks warn when the input itself needs no gradient, which is always the case here.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


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
