"""The fixed Gabor filter bank (fedssl.evaluation.handcrafted), against a direct computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import signal

from fedssl.evaluation.handcrafted import GaborBank, gabor_features, gabor_filters, grid_for, low_pass_filter


def _direct(image: np.ndarray, orientations: int, scales: tuple[float, ...], size: int, grid: int) -> np.ndarray:
    """The bank's features for one grey image, one filter at a time: cross-correlation with zero padding, the
    modulus of each (even, odd) pair, the low-pass, then the mean over each cell of the grid."""
    wavelets = gabor_filters(orientations, scales, size)[:, 0].double().numpy()
    maps = [np.hypot(signal.correlate2d(image, even, mode="same"), signal.correlate2d(image, odd, mode="same"))
            for even, odd in zip(wavelets[0::2], wavelets[1::2])]
    maps.append(signal.correlate2d(image, low_pass_filter(size)[0, 0].double().numpy(), mode="same"))
    cell = image.shape[0] // grid
    return np.concatenate([m.reshape(grid, cell, grid, cell).mean(axis=(1, 3)).ravel() for m in maps])


def test_the_features_are_the_direct_computation():
    rng = np.random.default_rng(0)
    image = rng.random((12, 12))
    bank = GaborBank(orientations=4, scales=(1.5, 2.5), size=7, grid=3)
    features = bank(torch.from_numpy(image).float()[None, None])[0].double().numpy()
    assert features.shape == ((4 * 2 + 1) * 3 * 3,)
    np.testing.assert_allclose(features, _direct(image, 4, (1.5, 2.5), 7, 3), rtol=1e-5, atol=1e-6)


def test_the_wavelets_are_unit_norm_and_blind_to_a_flat_image():
    filters = gabor_filters(8, (1.5, 2.5, 4.0), 9)[:, 0]
    assert filters.shape == (48, 9, 9)
    torch.testing.assert_close(filters.flatten(1).norm(dim=1), torch.ones(48))
    torch.testing.assert_close(filters[0::2].sum(dim=(1, 2)), torch.zeros(24), atol=1e-6, rtol=0)
    flat = GaborBank(grid=7)(torch.full((1, 1, 28, 28), 0.5))
    # away from the zero-padded border a flat image excites no wavelet, only the low-pass
    moduli = flat.view(25, 7, 7)[:24, 1:-1, 1:-1]
    assert moduli.abs().max() < 1e-5 and flat.view(25, 7, 7)[24, 3, 3] == pytest.approx(0.5, abs=1e-5)


def test_nothing_is_learned_and_each_colour_channel_is_filtered_on_its_own():
    assert list(GaborBank().parameters()) == []  # so its features cost no privacy: no data went into them
    grey = torch.rand(2, 1, 16, 16)
    rgb = GaborBank(channels=3, grid=4)(grey.repeat(1, 3, 1, 1))
    single = GaborBank(channels=1, grid=4)(grey).view(2, 25, 16)
    assert rgb.shape == (2, 3 * 25 * 16)
    by_channel = rgb.view(2, 3 * 24 + 3, 16)
    for channel in range(3):  # the moduli of every channel, then each channel's low-pass
        torch.testing.assert_close(by_channel[:, channel * 24:(channel + 1) * 24], single[:, :24])
        torch.testing.assert_close(by_channel[:, 72 + channel], single[:, 24])


def test_bad_settings_and_inputs_are_refused_in_one_line():
    with pytest.raises(ValueError, match="odd size >= 3"):
        gabor_filters(size=8)
    with pytest.raises(ValueError, match="a grid >= 1"):
        GaborBank(grid=0)
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 1, H, W\), got \(2, 3, 8, 8\)"):
        GaborBank()(torch.zeros(2, 3, 8, 8))


def test_the_grid_follows_the_image_size_in_two_pixel_cells_up_to_a_cap():
    # The cells both validation screens picked (8x8 digits: 4; 28x28 Fashion-MNIST: 14), then the cap.
    assert [grid_for(side, side) for side in (1, 3, 8, 28, 32, 64, 224)] == [1, 1, 4, 14, 14, 14, 14]
    assert grid_for(8, 28) == 4  # the shorter side decides


def test_features_of_a_pool_are_the_bank_over_batches(monkeypatch):
    images = torch.rand(7, 3, 12, 12)
    expected = GaborBank(channels=3, grid=6)(images).numpy()
    monkeypatch.setattr("fedssl.evaluation.probes.FEATURE_BATCH", 3)  # 3 + 3 + 1: batching must not matter
    features = gabor_features(images)
    assert features.dtype == np.float32 and features.shape == (7, 3 * 25 * 36)
    np.testing.assert_allclose(features, expected, rtol=1e-6, atol=1e-7)
    assert gabor_features(images[:0]).shape == (0, 3 * 25 * 36)  # an empty pool keeps its width
    with pytest.raises(ValueError, match=r"expected images of shape \(N, C, H, W\), got \(7, 144\)"):
        gabor_features(images.flatten(2)[:, 0])
