"""Time-series modality: the loader's layouts and length rule, the probe, conv1d, masked_segment and ts_views."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedssl.data.loaders import LabelColumnDroppedWarning, load_site_data
from fedssl.data.probe import probe_data
from fedssl.errors import DataError
from fedssl.inputs import TIMESERIES, encoder_input_problem, pretext_input_problem
from fedssl.models import build_encoder
from fedssl.pretext import get_pretext
from fedssl.pretext.masked_segment import masked_segment_loss, segment_mask
from fedssl.pretext.simsiam import simsiam_loss
from fedssl.pretext.ts_augment import SeriesAugmenter, SeriesAugmentParams, permutation_index, random_crop
from fedssl.sample_format import SampleFormat

# Opacus hooks warn when the input itself needs no gradient, which is always the case here.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")
SMALL_VIEWS = {"hidden_dim": 16, "projection_dim": 8, "predictor_hidden_dim": 4}


def model_for(task: str, channels: int = 2, length: int = 16, **params):
    encoder = build_encoder("conv1d", (channels, length), width=8, depth=2, seed=0)
    torch.manual_seed(1)
    return get_pretext(task, {**(SMALL_VIEWS if task == "ts_views" else {}), **params}).build_model(encoder)


# --- loader and probe ---------------------------------------------------------------------------------------


def test_arrays_load_as_channels_by_length(tmp_path):
    uni, multi = np.random.default_rng(0).normal(size=(5, 9)), np.random.default_rng(1).normal(size=(4, 3, 7))
    np.save(tmp_path / "uni.npy", uni)
    np.savez(tmp_path / "multi.npz", x=multi, ids=np.array(["a", "b", "c", "d"]))
    data = load_site_data(tmp_path / "uni.npy", "timeseries")
    assert data.modality == TIMESERIES and data.input_shape == (1, 9)
    assert np.allclose(data.inputs[:, 0].numpy(), uni)
    data = load_site_data(tmp_path / "multi.npz", "timeseries")
    assert data.input_shape == (3, 7) and data.sample_ids == ("a", "b", "c", "d")
    assert load_site_data(tmp_path / "uni.npy").modality == "vector"  # never guessed: a 2-D array is a table
    for name, shape in (("uni.npy", (1, 9)), ("multi.npz", (3, 7))):
        probe = probe_data(str(tmp_path / name), "timeseries")
        assert (probe.modality, probe.sample_shape, probe.count) == (TIMESERIES, shape, 5 if name == "uni.npy" else 4)
    assert probe_data(str(tmp_path / "multi.npz"), "timeseries", SampleFormat(series_length=20)).sample_shape == (3, 20)


def test_length_rule_crops_the_tail_and_zero_pads_the_end_and_nan_tails_are_shorter_series(tmp_path):
    x = np.arange(2 * 2 * 6, dtype=np.float64).reshape(2, 2, 6) + 1
    x[1, :, 4:] = np.nan  # series 1 has 4 steps (the UCR/UEA convention)
    np.save(tmp_path / "s.npy", x)
    own = load_site_data(tmp_path / "s.npy", "timeseries").inputs.numpy()
    assert own.shape == (2, 2, 6) and np.allclose(own[0], x[0]) and np.allclose(own[1, :, 4:], 0)
    longer = load_site_data(tmp_path / "s.npy", "timeseries", SampleFormat(series_length=8)).inputs.numpy()
    assert np.allclose(longer[0, :, :6], x[0]) and np.allclose(longer[:, :, 6:], 0)
    shorter = load_site_data(tmp_path / "s.npy", "timeseries", SampleFormat(series_length=3)).inputs.numpy()
    assert np.allclose(shorter[0], x[0, :, :3]) and np.allclose(shorter[1], x[1, :, :3])


@pytest.mark.parametrize("case, message", [
    ("hole", r"sample 'row-0' has a missing value \(NaN\) at channel 1, step 2, inside the series"),
    ("inf", "infinite value"),
    ("empty", "sample 'row-1' has no values"),
    ("4d", r"is not N x L \(univariate\) or N x C x L"),
    ("text", "dtype <U1 is not numeric"),
])
def test_bad_series_arrays_say_one_line(tmp_path, case, message):
    x = np.ones((2, 2, 5))
    if case == "hole":
        x[0, 1, 2] = np.nan
    elif case == "inf":
        x[1, 0, 0] = np.inf
    elif case == "empty":
        x[1] = np.nan
    elif case == "4d":
        x = np.ones((2, 1, 2, 5))
    else:
        x = np.array([["a", "b"]])
    np.save(tmp_path / "bad.npy", x)
    with pytest.raises(DataError, match=message) as err:
        load_site_data(tmp_path / "bad.npy", "timeseries")
    assert "\n" not in str(err.value)


def test_csv_holds_one_univariate_series_per_row(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("id,label,t0,t1,t2,t3\na,x,1,2,3,4\nb,y,5,6,,\n")
    with pytest.warns(LabelColumnDroppedWarning):
        data = load_site_data(path, "timeseries")
    assert data.sample_ids == ("a", "b") and data.input_shape == (1, 4)
    assert data.inputs[:, 0].tolist() == [[1, 2, 3, 4], [5, 6, 0, 0]]  # the shorter series zero-padded
    probe = probe_data(str(path), "timeseries")
    assert (probe.sample_shape, probe.count) == ((1, 4), 2)
    path.write_text("t0,t1,t2\n1,,3\n")
    with pytest.raises(DataError, match="missing value .* inside the series"):
        load_site_data(path, "timeseries")
    path.write_text("t0,t1\n1,x\n")
    with pytest.raises(DataError, match="column 't1' is not numeric"):
        load_site_data(path, "timeseries")
    (tmp_path / "s.txt").write_text("1 2 3\n")
    with pytest.raises(DataError, match="a .npy, .npz or .csv file"):
        load_site_data(tmp_path / "s.txt", "timeseries")
    with pytest.raises(DataError, match="a .npy, .npz or .csv file"):
        probe_data(str(tmp_path / "s.txt"), "timeseries")


def test_input_rules_pair_conv1d_with_series_only():
    assert "model.encoder=conv1d" in encoder_input_problem("cnn", (3, 50), TIMESERIES)
    assert "model.encoder=conv1d" in encoder_input_problem("mlp", (3, 50), TIMESERIES)
    assert encoder_input_problem("conv1d", (3, 50), TIMESERIES) is None
    assert "data.kind=timeseries" in encoder_input_problem("conv1d", (12,))
    key, problem = pretext_input_problem("rotation", {}, (3, 50), TIMESERIES)
    assert key == "pretext.name" and "masked_segment, ts_views" in problem
    assert pretext_input_problem("masked_segment", {}, (3, 50), TIMESERIES) is None
    assert pretext_input_problem("ts_views", {}, (1, 8, 8))[0] == "pretext.name"


# --- encoder ------------------------------------------------------------------------------------------------


def test_conv1d_pools_over_time_so_its_weights_do_not_depend_on_length():
    short, long = build_encoder("conv1d", (3, 20), width=8, seed=0), build_encoder("conv1d", (3, 500), width=8, seed=0)
    assert {k: v.shape for k, v in short.state_dict().items()} == {k: v.shape for k, v in long.state_dict().items()}
    assert short(torch.randn(4, 3, 20)).shape == (4, 8) and short(torch.randn(4, 3, 33)).shape == (4, 8)
    assert short.steps(torch.randn(2, 3, 20)).shape == (2, 8, 5)  # two stride-2 blocks after the first
    with pytest.raises(ValueError, match="data.kind=timeseries"):
        build_encoder("conv1d", (1, 8, 8))


@pytest.mark.parametrize("task", ["masked_segment", "ts_views"])
def test_pretexts_pass_opacus_validator_and_grad_sampler(task):
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    model = model_for(task)
    assert ModuleValidator.validate(model, strict=False) == []
    gsm = GradSampleModule(model)
    gsm(torch.randn(3, 2, 16)).sum().backward()
    assert all(p.grad_sample.shape[0] == 3 for p in model.parameters() if p.requires_grad)
    assert model(torch.zeros(0, 2, 16)).shape == (0,)


# --- masked_segment ------------------------------------------------------------------------------------------


def test_segment_mask_is_contiguous_runs_and_at_least_one_per_sample():
    torch.manual_seed(0)
    for _ in range(20):
        mask = segment_mask((5, 2, 30), 0.01, 4)
        assert (mask.flatten(1).sum(1) >= 4).all()  # the forced segment, whole
        padded = torch.nn.functional.pad(mask.int(), (1, 1))
        runs = (padded[..., 1:] - padded[..., :-1]).eq(1).nonzero()  # run starts
        for b, c, t in runs.tolist():
            assert mask[b, c, t : t + 4].all() or t + 4 > 30  # every run is >= one segment long
    assert abs(float(segment_mask((200, 3, 100), 0.15, 3).float().mean()) - 0.15) < 0.03


def test_masked_segment_loss_matches_direct_computation():
    torch.manual_seed(0)
    prediction, target = torch.randn(3, 2, 6), torch.randn(3, 2, 6)
    mask = torch.rand(3, 2, 6) < 0.3
    mask[:, 0, 0] = True
    want = torch.stack([((prediction[b] - target[b])[mask[b]] ** 2).mean() for b in range(3)])
    assert torch.allclose(masked_segment_loss(prediction, target, mask), want)


def test_masked_segment_model_zeroes_the_segments_and_scores_only_them():
    model = model_for("masked_segment", segment_length=3)
    x = torch.randn(4, 2, 16)
    torch.manual_seed(5)
    got = model(x)
    torch.manual_seed(5)
    mask = segment_mask(x.shape, 0.15, 3)
    hidden = x.clone()
    hidden[mask] = 0.0
    steps = model.encoder.steps(hidden)
    upsampled = torch.nn.functional.interpolate(steps, size=16, mode="linear", align_corners=False)
    prediction = torch.einsum("bwl,cw->bcl", upsampled, model.head.weight) + model.head.bias[None, :, None]
    want = torch.stack([((prediction[b] - x[b])[mask[b]] ** 2).mean() for b in range(4)])
    assert torch.allclose(got, want, atol=1e-6)


# --- ts_views ------------------------------------------------------------------------------------------------


def test_augmentations_keep_each_series_its_own():
    torch.manual_seed(0)
    index = permutation_index(6, 20, 4)
    assert torch.equal(index.sort(dim=1).values, torch.arange(20).expand(6, -1))  # a permutation of the steps
    x = torch.arange(10.0).view(1, 1, 10)
    assert torch.allclose(random_crop(x, 1.0), x)  # the whole window: nothing stretched
    identity = SeriesAugmenter(SeriesAugmentParams(crop_scale=1.0, permute_prob=0.0, scale_std=0.0, jitter_std=0.0))
    batch = torch.randn(3, 2, 10)
    assert torch.allclose(identity(batch), batch)
    # Sample 0's view is the same whatever the other samples hold (same draws: the shapes depend on B only).
    augment = SeriesAugmenter(SeriesAugmentParams(permute_prob=1.0))
    other = batch.clone()
    other[1:] = torch.randn(2, 2, 10)
    torch.manual_seed(3)
    first = augment(batch)
    torch.manual_seed(3)
    assert torch.allclose(augment(other)[0], first[0])


def test_ts_views_is_simsiam_over_two_series_views():
    model = model_for("ts_views")
    x = torch.randn(4, 2, 16)
    torch.manual_seed(7)
    got = model(x)
    torch.manual_seed(7)
    augment = SeriesAugmenter(model.augment.params)
    z1 = model.projector(model.encoder(augment(x)))
    z2 = model.projector(model.encoder(augment(x)))
    p1, p2 = model.predictor(z1), model.predictor(z2)
    want = torch.stack([0.5 * simsiam_loss(p1[b:b + 1], z2[b:b + 1]) + 0.5 * simsiam_loss(p2[b:b + 1], z1[b:b + 1])
                        for b in range(4)]).flatten()
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("task", ["masked_segment", "ts_views"])
def test_each_sample_loss_and_gradient_depend_on_that_sample_alone(task):
    model = model_for(task)
    x = torch.randn(4, 2, 16)
    torch.manual_seed(9)
    losses = model(x)
    changed = x.clone()
    changed[1:] = torch.randn(3, 2, 16)
    torch.manual_seed(9)
    assert torch.allclose(model(changed)[0], losses[0], atol=1e-6)
    leaf = x.clone().requires_grad_(True)
    torch.manual_seed(9)
    (grad,) = torch.autograd.grad(model(leaf)[0], leaf)
    assert grad[0].abs().sum() > 0 and grad[1:].abs().sum() == 0


# --- the UCR/UEA converter ---------------------------------------------------------------------------------


def test_ucr_converter_writes_nan_tailed_series_and_row_id_labels(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "simulations" / "ucr_to_series.py"
    spec = importlib.util.spec_from_file_location("ucr_to_series", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    folder = tmp_path / "aeon-data" / "Toy"
    folder.mkdir(parents=True)
    header = "@problemName Toy\n@univariate false\n@dimensions 2\n@equalLength false\n@classLabel true a b\n@data\n"
    (folder / "Toy_TRAIN.ts").write_text(header + "1,2,3:4,5,6:a\n1,2:3,4:b\n")
    (folder / "Toy_TEST.ts").write_text(header + "7,8,9:1,1,2:b\n")
    assert module.convert(tmp_path / "aeon-data", tmp_path / "out", "Toy") == (3, (2, 3))
    data = load_site_data(tmp_path / "out" / "Toy.npy", "timeseries")
    assert data.input_shape == (2, 3) and data.sample_ids == ("row-0", "row-1", "row-2")
    raw = np.load(tmp_path / "out" / "Toy.npy")
    assert np.isnan(raw[1, :, 2]).all() and not np.isnan(raw[2]).any()  # only the short series has a NaN tail
    assert abs(float(np.nanmean(raw[:, 0]))) < 1e-6  # standardised per channel
    assert float(data.inputs[1, 0, 2]) == 0.0  # the NaN tail zero-padded at load
    assert (tmp_path / "out" / "labels.csv").read_text().split() == ["id,label", "row-0,a", "row-1,b", "row-2,b"]
    (folder / "Toy_TEST.ts").write_text(header + "7,8,9:1,?,2:b\n")  # the archive's missing value
    assert np.isnan(module.read_ts(folder / "Toy_TEST.ts")[0][0][1][1])
    with pytest.raises(SystemExit, match="shipped sets: Toy"):
        module.convert(tmp_path / "aeon-data", tmp_path / "out", "Missing")
