"""Table pretext tasks (vime, scarf): each loss against a direct computation, the per-sample corruption,
and scarf's refusal under DP."""

from __future__ import annotations

import math

import pytest
import torch

from fedssl.errors import ConfigError, PrivacyError
from fedssl.models import build_encoder
from fedssl.pretext import get_pretext, require_dp_compatible
from fedssl.pretext.simclr import nt_xent_loss
from fedssl.pretext.vime import self_permuted_corruption, table_corruption, vime_loss, vime_table_loss


def test_corruption_keeps_unmasked_features_and_draws_masked_ones_from_the_same_row() -> None:
    torch.manual_seed(0)
    x = torch.arange(24, dtype=torch.float32).view(3, 8)  # each row's values are its own
    mask = (torch.rand(3, 8) < 0.5).float()
    corrupted = self_permuted_corruption(x, mask)
    assert torch.equal(corrupted[mask == 0], x[mask == 0])
    for i in range(3):
        assert set(corrupted[i].tolist()) <= set(x[i].tolist())  # nothing from another row


def test_vime_loss_matches_a_direct_computation() -> None:
    torch.manual_seed(1)
    logits, recon, x = torch.randn(2, 5), torch.randn(2, 5), torch.randn(2, 5)
    mask = (torch.rand(2, 5) < 0.5).float()
    expected = []
    for i in range(2):
        mse = sum((recon[i, j] - x[i, j]) ** 2 for j in range(5)) / 5
        bce = 0.0
        for j in range(5):
            p = 1 / (1 + math.exp(-logits[i, j].item()))
            bce -= mask[i, j].item() * math.log(p) + (1 - mask[i, j].item()) * math.log(1 - p)
        expected.append(mse.item() + 2.0 * bce / 5)
    assert torch.allclose(vime_loss(logits, recon, x, mask, 2.0), torch.tensor(expected), atol=1e-5)


def test_vime_model_is_the_loss_of_its_heads_on_the_corrupted_row() -> None:
    encoder = build_encoder("mlp", (6,), width=8, depth=2, seed=0)
    model = get_pretext("vime", {"mask_prob": 0.4, "alpha": 1.5}).build_model(encoder)
    x = torch.rand(4, 6)
    torch.manual_seed(3)
    got = model(x)
    torch.manual_seed(3)
    mask = (torch.rand(4, 6) < 0.4).float()
    z = encoder(self_permuted_corruption(x, mask))
    assert torch.allclose(got, vime_loss(model.mask_head(z), model.feature_head(z), x, mask, 1.5))


def test_vime_refuses_images() -> None:
    with pytest.raises(ConfigError, match="vector"):
        get_pretext("vime").build_model(build_encoder("cnn", (1, 8, 8), width=8))


def test_scarf_is_nt_xent_between_two_corrupted_views_and_refused_under_dp() -> None:
    encoder = build_encoder("mlp", (6,), width=8, depth=2, seed=0)
    model = get_pretext("scarf", {"hidden_dim": 8, "projection_dim": 4, "temperature": 0.5}).build_model(encoder)
    x = torch.rand(5, 6)
    torch.manual_seed(4)
    got = model(x)
    torch.manual_seed(4)
    views = []
    for _ in range(2):
        mask = (torch.rand(5, 6) < 0.6).float()
        views.append(model.projector(encoder(self_permuted_corruption(x, mask))))
    assert torch.allclose(got, nt_xent_loss(*views, 0.5))
    with pytest.raises(PrivacyError, match="InfoNCE") as err:
        require_dp_compatible(get_pretext("scarf"))
    assert "vime" in str(err.value)


# --- tables with categorical columns (fedssl.tables): numeric features, then one-hot blocks ---------------

BLOCKS = (3, 2)


def _table_rows(count: int) -> torch.Tensor:
    numeric = torch.randn(count, 4)
    blocks = [torch.nn.functional.one_hot(torch.randint(size, (count,)), size).float() for size in BLOCKS]
    return torch.cat([numeric, *blocks], dim=1)


def test_table_corruption_permutes_numbers_among_numbers_and_draws_whole_categories() -> None:
    torch.manual_seed(5)
    x = _table_rows(64)
    corrupted, mask = table_corruption(x, BLOCKS, 0.5)
    assert mask.shape == (64, 4 + len(BLOCKS))
    for i in range(64):
        assert set(corrupted[i, :4].tolist()) <= set(x[i, :4].tolist())  # the row's own numbers only
        for j, (start, size) in enumerate(((4, 3), (7, 2))):
            block = corrupted[i, start:start + size]
            assert sorted(block.tolist()) == [0.0] * (size - 1) + [1.0]  # still one category
            if mask[i, 4 + j] == 0:
                assert torch.equal(block, x[i, start:start + size])
    assert torch.equal(corrupted[:, :4][mask[:, :4] == 0], x[:, :4][mask[:, :4] == 0])
    # a corrupted category is drawn uniformly, so it often differs from the row's own
    changed = (corrupted[:, 4:7] != x[:, 4:7]).any(dim=1) & (mask[:, 4] == 1)
    assert 0 < changed.sum() < (mask[:, 4] == 1).sum()


def test_vime_table_loss_matches_a_direct_computation() -> None:
    torch.manual_seed(6)
    x = _table_rows(2)
    logits, recon = torch.randn(2, 6), torch.randn(2, 9)
    mask = (torch.rand(2, 6) < 0.5).float()
    expected = []
    for i in range(2):
        feature = sum((recon[i, j] - x[i, j]) ** 2 for j in range(4)).item()
        for start, size in ((4, 3), (7, 2)):
            true = int(x[i, start:start + size].argmax())
            scores = recon[i, start:start + size].tolist()
            feature += -scores[true] + math.log(sum(math.exp(s) for s in scores))
        bce = 0.0
        for j in range(6):
            p = 1 / (1 + math.exp(-logits[i, j].item()))
            bce -= mask[i, j].item() * math.log(p) + (1 - mask[i, j].item()) * math.log(1 - p)
        expected.append(feature / 6 + 2.0 * bce / 6)
    assert torch.allclose(vime_table_loss(logits, recon, x, mask, BLOCKS, 2.0), torch.tensor(expected), atol=1e-5)


def test_vime_on_a_table_is_the_table_loss_of_its_heads_and_one_value_per_row() -> None:
    encoder = build_encoder("mlp", (9,), width=8, depth=2, seed=0)
    model = get_pretext("vime", {"mask_prob": 0.4}).build_model(encoder, BLOCKS)
    assert model.mask_head.out_features == 6 and model.feature_head.out_features == 9  # a mask logit per column
    x = _table_rows(5)
    torch.manual_seed(7)
    got = model(x)
    torch.manual_seed(7)
    corrupted, mask = table_corruption(x, BLOCKS, 0.4)
    z = encoder(corrupted)
    assert torch.allclose(got, vime_table_loss(model.mask_head(z), model.feature_head(z), x, mask, BLOCKS, 2.0))
    # per sample: one row's loss does not move when another row changes
    torch.manual_seed(8)
    first = model(x)
    y = x.clone()
    y[1:] = _table_rows(4)
    torch.manual_seed(8)
    assert torch.allclose(model(y)[0], first[0])
    # other tasks see the one-hot blocks as plain features
    assert get_pretext("masked_reconstruction").build_model(build_encoder("mlp", (9,), width=8), BLOCKS)(x).shape == (5,)
