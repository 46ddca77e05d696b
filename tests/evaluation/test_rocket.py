"""ROCKET's random kernels (fedssl.evaluation.rocket), against a direct computation, kernel by kernel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedssl.evaluation.probes import encode
from fedssl.evaluation.rocket import KERNEL_LENGTHS, Kernel, Rocket, normalise, random_kernels


def _direct(series: np.ndarray, kernel: Kernel) -> tuple[float, float]:
    """(PPV, max) of one kernel on one normalised series (C, L), one output step at a time."""
    padded = np.pad(series, ((0, 0), (kernel.padding, kernel.padding)))
    steps = padded.shape[1] - (kernel.length - 1) * kernel.dilation
    response = np.array([
        kernel.bias + sum(kernel.weights[row, tap] * padded[channel, t + tap * kernel.dilation]
                          for row, channel in enumerate(kernel.channels) for tap in range(kernel.length))
        for t in range(steps)
    ])
    return float((response > 0).mean()), float(response.max())


def test_the_features_are_the_direct_computation():
    rng = np.random.default_rng(1)
    series = rng.normal(size=(3, 4, 40)).astype(np.float32)
    transform = Rocket(4, 40, num_kernels=60, seed=3)
    features = encode(transform, torch.from_numpy(series))
    assert features.shape == (3, 120)
    assert {k.padding > 0 for k in transform.kernels} == {True, False} and max(k.dilation for k in transform.kernels) > 1
    normalised = normalise(torch.from_numpy(series).double()).numpy()
    for n in range(3):
        for index, kernel in enumerate(transform.kernels):
            ppv, peak = _direct(normalised[n], kernel)
            assert features[n, 2 * index] == pytest.approx(ppv, abs=1e-6)
            assert features[n, 2 * index + 1] == pytest.approx(peak, rel=1e-4, abs=1e-4)


def test_the_kernels_are_drawn_as_the_paper_draws_them_and_from_no_data():
    kernels = random_kernels(5, 100, num_kernels=500, seed=0)
    assert {k.length for k in kernels} == set(KERNEL_LENGTHS)
    for kernel in kernels:
        assert kernel.weights.shape == (len(kernel.channels), kernel.length)
        np.testing.assert_allclose(kernel.weights.mean(axis=1), 0, atol=1e-12)  # centred, channel by channel
        assert -1 <= kernel.bias <= 1 and kernel.dilation >= 1 and (kernel.length - 1) * kernel.dilation <= 99
        assert list(kernel.channels) == sorted(set(kernel.channels)) and 0 <= min(kernel.channels) <= max(kernel.channels) < 5
        assert kernel.padding in (0, (kernel.length - 1) * kernel.dilation // 2)
    assert len({len(k.channels) for k in kernels}) > 2  # channel subsets of several sizes
    # the seed and the shape decide everything: two sites draw the same kernels
    again = random_kernels(5, 100, num_kernels=500, seed=0)
    assert all(np.array_equal(a.weights, b.weights) for a, b in zip(kernels, again))
    assert [(k.channels, k.bias, k.dilation, k.padding) for k in kernels] == \
        [(k.channels, k.bias, k.dilation, k.padding) for k in again]  # fmt: skip
    assert [k.bias for k in random_kernels(5, 100, num_kernels=500, seed=1)] != [k.bias for k in kernels]


def test_each_series_is_normalised_on_its_own_so_its_offset_and_scale_do_not_matter():
    series = torch.randn(4, 2, 30)
    features = encode(Rocket(2, 30, num_kernels=50), series)
    moved = series * torch.tensor([3.0, 0.5]).view(1, 2, 1) + torch.tensor([10.0, -4.0]).view(1, 2, 1)
    np.testing.assert_allclose(encode(Rocket(2, 30, num_kernels=50), moved), features, rtol=1e-4, atol=1e-4)
    # ... but each series keeps its own shape: the features of two different series differ
    assert not np.allclose(features[0], features[1])


def test_short_series_batches_and_an_empty_pool(monkeypatch):
    short = Rocket(1, 5, num_kernels=40)  # shorter than every kernel: each one pads, none gives an empty response
    assert all(k.padding > 0 and k.dilation == 1 for k in short.kernels)
    assert np.isfinite(encode(short, torch.randn(3, 1, 5))).all()
    series = torch.randn(7, 3, 25)
    expected = encode(Rocket(3, 25, num_kernels=30), series)  # one batch
    monkeypatch.setattr("fedssl.evaluation.probes.FEATURE_BATCH", 3)  # 3 + 3 + 1: batching must not matter
    np.testing.assert_allclose(encode(Rocket(3, 25, num_kernels=30), series), expected, rtol=1e-5, atol=1e-5)
    assert encode(Rocket(3, 25, num_kernels=30), series[:0]).shape == (0, 60)


def test_bad_shapes_and_settings_are_refused_in_one_line():
    with pytest.raises(ValueError, match=r"expected series of shape \(N, 3, 25\), got \(2, 3, 24\)"):
        Rocket(3, 25, num_kernels=5)(torch.zeros(2, 3, 24))
    with pytest.raises(ValueError, match="ROCKET needs >= 1 channel, >= 1 step and >= 1 kernel; got 0, 25, 5"):
        random_kernels(0, 25, num_kernels=5)
