"""IDX files and uint8 pixels on tiny real files: round trips, memory maps, errors, consent, training."""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from fedssl.config import config_from_dict
from fedssl.data import ConsentedLabels, ConsentManifest, load_site_data
from fedssl.data.idx import IdxLabelSource, read_idx, read_idx_header, write_idx
from fedssl.data.pixels import fit_images, unit_float
from fedssl.errors import ConfigError, ConsentError, DataError
from fedssl.experiment import central_data_for, simulated_site_from_config
from fedssl.sample_format import SampleFormat
from fedssl.training.local import train_round


def _one_line(error: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def _pixels(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _fashion_like(tmp_path: Path, count: int = 40, gz: bool = True) -> tuple[Path, Path, np.ndarray]:
    """An MNIST-style pair: count 6x6 greyscale images and labels 0..3, named as the real files."""
    suffix = ".gz" if gz else ""
    images = write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", _pixels((count, 6, 6)))
    labels = np.arange(count, dtype=np.uint8) % 4
    return images, write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels), labels


# --- reading and writing -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_round_trip_every_type_plain_and_gzipped(tmp_path: Path, name: str, dtype: type) -> None:
    array = (np.arange(2 * 3 * 4) - 5).astype(dtype).reshape(2, 3, 4) if dtype is not np.uint8 else _pixels((2, 3, 4))
    back = read_idx(write_idx(tmp_path / name, array))
    assert back.dtype == np.dtype(dtype) and back.dtype.isnative
    np.testing.assert_array_equal(back, array)


def test_header_is_big_endian_as_the_format_says(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "a.idx", np.array([[1, 258]], dtype=np.int32))
    raw = path.read_bytes()
    assert raw[:4] == bytes([0, 0, 0x0C, 2]) and raw[4:12] == bytes([0, 0, 0, 1, 0, 0, 0, 2])
    assert raw[12:] == bytes([0, 0, 0, 1, 0, 0, 1, 2])
    header = read_idx_header(path)
    assert header.shape == (1, 2) and header.offset == 12 and header.data_bytes == 8


def test_plain_files_are_memory_mapped_and_never_written(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "a.idx", _pixels((3, 4, 4)))
    before = path.read_bytes()
    array = read_idx(path)
    assert isinstance(array, np.memmap)
    array[0] = 0  # copy-on-write: the site's data file is never modified
    assert path.read_bytes() == before
    data = load_site_data(path)
    assert data.inputs.dtype == torch.uint8 and data.inputs.untyped_storage().nbytes() == 3 * 16
    with path.open("r+b") as handle:  # the dataset reads the file's pages (Linux: an untouched private map follows the file)
        handle.seek(read_idx_header(path).offset)
        handle.write(bytes([before[16] ^ 0xFF]))
    assert int(data.inputs[0, 0, 0, 0]) == before[16] ^ 0xFF


def test_gzip_is_recognised_by_content_not_name(tmp_path: Path) -> None:
    plain = write_idx(tmp_path / "a.idx", _pixels((2, 3, 3)))
    disguised = tmp_path / "b.idx"
    disguised.write_bytes(gzip.compress(plain.read_bytes()))
    np.testing.assert_array_equal(read_idx(disguised), read_idx(plain))


# --- errors: one line naming the file and the problem ----------------------------------------------


def _bad_file(tmp_path: Path, name: str, payload: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(payload)
    return path


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"\x00\x00", "truncated IDX header (2 bytes"),
        (b"\x01\x02\x08\x01\x00\x00\x00\x01\x05", "bad IDX magic 01020801"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x05", "unknown IDX type code 0x07"),
        (b"\x00\x00\x08\x00", "declares 0 dimensions"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x02", "truncated IDX header (needs 16 bytes"),
        (bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3]) + bytes(5), "truncated: the header declares 2 x 3 uint8 (6 bytes) but only 5"),
        (bytes([0, 0, 8, 1, 0, 0, 0, 2]) + bytes(3), "1 bytes beyond the 2 uint8"),
    ],
)
@pytest.mark.parametrize("gz", [False, True])
def test_damaged_files_are_one_line_errors_naming_the_file(tmp_path: Path, payload: bytes, expected: str, gz: bool) -> None:
    path = _bad_file(tmp_path, "x.idx", gzip.compress(payload) if gz else payload)
    with pytest.raises(DataError) as error:
        read_idx(path)
    message = _one_line(error)
    assert str(path) in message and expected in message


def test_truncated_gzip_stream_is_named(tmp_path: Path) -> None:
    whole = gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 200]) + bytes(200))
    path = _bad_file(tmp_path, "x.idx.gz", whole[: len(whole) // 2])
    with pytest.raises(DataError) as error:
        read_idx(path)
    assert f"{path}: gzip data is damaged or truncated" in _one_line(error)


def test_loader_errors_name_the_file(tmp_path: Path) -> None:
    labels = write_idx(tmp_path / "l.idx", np.zeros(4, dtype=np.uint8))
    with pytest.raises(DataError) as error:
        load_site_data(labels)
    assert f"{labels} is 1-D (4 values), a label file; set data.source to the images file" in _one_line(error)
    odd = write_idx(tmp_path / "odd.idx", np.zeros((2, 5, 5, 5), dtype=np.uint8))
    with pytest.raises(DataError) as error:
        load_site_data(odd)
    assert f"{odd}: images shaped (2, 5, 5, 5) are not N x H x W" in _one_line(error)
    with pytest.raises(DataError) as error:
        load_site_data(tmp_path / "missing-idx3-ubyte.gz", kind="idx")
    assert "does not exist" in _one_line(error)


def test_label_file_must_match_the_images(tmp_path: Path) -> None:
    images, _, _ = _fashion_like(tmp_path, count=5)
    ids = load_site_data(images).sample_ids
    short = write_idx(tmp_path / "short.idx", np.zeros(4, dtype=np.uint8))
    with pytest.raises(DataError) as error:
        IdxLabelSource(short, ids, images)
    assert f"{short} has 4 labels but {images} has 5 images; pair the images with their own label file" in _one_line(error)
    with pytest.raises(DataError) as error:
        IdxLabelSource(images, ids, images)
    assert f"{images}: a label file must be 1-D integers" in _one_line(error)
    with pytest.raises(DataError) as error:
        IdxLabelSource(tmp_path / "none.idx", ids, images)
    assert "does not exist; set data.labels" in _one_line(error)


# --- pixels: layout, per-batch conversion, resize / crop ---------------------------------------------


def test_greyscale_and_rgb_load_as_uint8_nchw(tmp_path: Path) -> None:
    grey = _pixels((3, 4, 5))
    rgb = _pixels((3, 4, 5, 3), seed=1)
    grey_data = load_site_data(write_idx(tmp_path / "g.idx", grey))
    rgb_data = load_site_data(write_idx(tmp_path / "c.idx.gz", rgb))
    assert grey_data.is_pixels and grey_data.input_shape == (1, 4, 5) and grey_data.modality == "image"
    assert rgb_data.is_pixels and rgb_data.input_shape == (3, 4, 5)
    np.testing.assert_array_equal(rgb_data.inputs.numpy(), rgb.transpose(0, 3, 1, 2))
    assert grey_data.sample_ids == ("row-0", "row-1", "row-2")
    vectors = load_site_data(write_idx(tmp_path / "v.idx", np.ones((2, 3), dtype=np.float32)))
    assert vectors.modality == "vector" and vectors.inputs.dtype == torch.float32


def test_per_batch_conversion_equals_the_image_folder_float_path(tmp_path: Path) -> None:
    pixels = _pixels((4, 5, 6, 3))
    for i, image in enumerate(pixels):
        Image.fromarray(image, "RGB").save(tmp_path / f"{i}.png")
    floats = load_site_data(tmp_path, kind="image_folder", grayscale=False)
    uint8 = load_site_data(write_idx(tmp_path / "p.idx", pixels))
    assert floats.inputs.dtype == torch.float32 and uint8.inputs.dtype == torch.uint8
    assert torch.equal(unit_float(uint8.inputs), floats.inputs)  # bit for bit
    assert unit_float(floats.inputs) is floats.inputs  # float data passes untouched


@pytest.mark.parametrize(
    ("size", "expected"),
    [((6, 6), (6, 6)), ((12, 12), (12, 12)), ((3, 3), (3, 3)), ((8, 4), (8, 4)), ((2, 5), (2, 5))],
)
def test_resize_and_crop_to_the_configured_size(tmp_path: Path, size: tuple[int, int], expected: tuple[int, int]) -> None:
    images, _, _ = _fashion_like(tmp_path, count=3)
    data = load_site_data(images, options=SampleFormat(image_size=list(size)))
    assert data.inputs.shape == (3, 1, *expected) and data.inputs.dtype == torch.uint8


def test_resize_keeps_values_and_crops_the_centre() -> None:
    flat = np.full((2, 3, 4, 4), 77, dtype=np.uint8)
    assert (fit_images(flat, (8, 8)) == 77).all() and (fit_images(flat, (2, 2)) == 77).all()
    # Left half 0, right half 200: cropping a 4x4 to 4x2 keeps the centre columns, one of each.
    halves = np.zeros((1, 1, 4, 4), dtype=np.uint8)
    halves[..., 2:] = 200
    cropped = fit_images(halves, (4, 2))
    assert cropped.tolist() == [[[[0, 200]] * 4]]
    same = np.zeros((1, 1, 4, 4), dtype=np.uint8)
    assert fit_images(same, (4, 4)) is same and fit_images(same, None) is same


def test_image_size_config_is_checked_at_the_edge() -> None:
    with pytest.raises(ConfigError) as error:
        config_from_dict({"data": {"image_size": [64]}})
    assert _one_line(error).startswith("data.image_size: must be [height, width] in pixels")
    with pytest.raises(ConfigError) as error:
        config_from_dict({"data": {"image_size": [0, 8]}})
    assert "data.image_size" in _one_line(error)
    with pytest.raises(ConfigError) as error:
        config_from_dict({"data": {"source": "x.npy", "kind": "npy", "labels": "y.idx"}})
    assert _one_line(error).startswith("data.labels: an IDX label file pairs with IDX images")
    assert config_from_dict({"data": {"image_size": [64, 32]}}).data.image_hw == (64, 32)


# --- labels behind consent -----------------------------------------------------------------------


def test_idx_labels_are_read_only_for_consented_ids(tmp_path: Path) -> None:
    images, labels_path, labels = _fashion_like(tmp_path, count=8)
    ids = load_site_data(images).sample_ids
    source = IdxLabelSource(labels_path, ids, images)
    asked: list[str] = []

    def spy(sample_id: str) -> int:
        asked.append(sample_id)
        return source(sample_id)

    consented = ConsentedLabels(ConsentManifest(frozenset({"row-1", "row-6"})), spy)
    assert consented.labels_for(["row-6", "row-1"]).tolist() == [labels[6], labels[1]]
    with pytest.raises(ConsentError):
        consented.labels_for(["row-1", "row-2"])
    assert asked == ["row-6", "row-1"]  # the refused request read nothing


def _idx_experiment(tmp_path: Path, **data: object) -> dict:
    images, labels_path, _ = _fashion_like(tmp_path, count=60)
    manifest = tmp_path / "consent.txt"
    manifest.write_text("".join(f"row-{i}\n" for i in range(0, 60, 2)))  # even rows only
    return {
        "run": {"name": "idx", "output_dir": str(tmp_path / "runs")},
        "data": {"source": str(images), "labels": str(labels_path), "partition": "dirichlet", "test_fraction": 0.2, **data},
        "federation": {"num_sites": 2, "rounds": 1},
        "model": {"width": 8, "depth": 2},
        "training": {"local_steps": 2, "batch_size": 8},
        "evaluation": {"consent_manifest": str(manifest)},
        "privacy": {"min_noise_multiplier": 0.3},
    }


def test_split_and_partition_see_consented_idx_labels_only(tmp_path: Path) -> None:
    config = config_from_dict(_idx_experiment(tmp_path, image_size=[8, 8]))
    data = central_data_for(config)
    assert data.labels is not None and data.train.is_pixels and data.train.input_shape == (1, 8, 8)
    assert all(int(i.split("-")[1]) % 2 == 0 for i in data.test.sample_ids)  # the test set is consented
    partition_labels = data.train_partition_labels()
    odd = [int(i.split("-")[1]) % 2 == 1 for i in data.train.sample_ids]
    assert (partition_labels[odd] == -1).all() and (partition_labels[[not o for o in odd]] >= 0).all()


@pytest.mark.parametrize("enabled", [True, False])
def test_round_on_a_uint8_idx_site_trains_with_the_float_sample_rate(tmp_path: Path, make_plan, make_site, enabled: bool) -> None:
    """A conv on uint8 input would raise, so a trained round proves the per-batch conversion; under DP the
    accountant's sample rate is the one the float path charges (1 / number of batches of the loader)."""
    from fedssl.models import build_encoder

    config = config_from_dict(_idx_experiment(tmp_path, image_size=[8, 8]))
    site, _ = simulated_site_from_config(config, 0)
    assert site.is_pixels and site.input_shape == (1, 8, 8)
    encoder = build_encoder("cnn", site.input_shape, width=8, depth=2).state_dict()
    results = {}
    for name, data in (("uint8", site), ("float", dataclasses.replace(site, inputs=unit_float(site.inputs)))):
        state_dir = tmp_path / name
        results[name] = train_round(data, encoder, make_plan(batch_size=8, local_steps=2), make_site(state_dir, enabled=enabled))
        assert results[name].status == "trained" and np.isfinite(results[name].pretext_loss)
    if enabled:
        histories = [json.loads((tmp_path / name / "accountant.json").read_text())["history"] for name in results]
        assert histories[0] == histories[1]
        assert histories[0][0][1] == 1 / len(DataLoader(TensorDataset(site.inputs), batch_size=8))


def test_site_yaml_image_size_is_checked_and_applied(tmp_path: Path) -> None:
    from fedssl.deploy.site.config import SiteData, _cached_dataset

    with pytest.raises(ConfigError) as error:
        SiteData(path="images.idx", image_size=[8]).validate()
    assert _one_line(error).startswith("data.image_size: must be [height, width] in pixels")
    images, _, _ = _fashion_like(tmp_path, count=3)
    site = SiteData(path=str(images), kind="idx", image_size=[9, 7])
    site.validate()
    dataset = _cached_dataset(str(images), 0, 0, site.kind, site.sample_format)
    assert dataset.is_pixels and dataset.inputs.shape == (3, 1, 9, 7)
