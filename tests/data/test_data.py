"""Site datasets, loaders and simulation partitioners on tiny real files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedssl.data import (
    LabelColumnDroppedWarning,
    SiteDataset,
    dirichlet,
    iid,
    load_digits_labeled,
    load_site_data,
    make_site_dataset,
    quantity_skew,
)
from fedssl.data.partition import UNLABELLED, partition
from fedssl.errors import ConfigError, DataError
from fedssl.sample_format import SampleFormat

# --- helpers --------------------------------------------------------------------------------


def _vectors(rows: int = 3) -> SiteDataset:
    inputs = torch.arange(rows * 2, dtype=torch.float32).reshape(rows, 2)
    return SiteDataset(inputs, tuple(f"s{i}" for i in range(rows)), "vector")


def _write_csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _one_line(error: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def _mean_label_entropy(parts: list[np.ndarray], labels: np.ndarray) -> float:
    entropies = []
    for part in parts:
        p = np.bincount(labels[part]) / len(part)
        p = p[p > 0]
        entropies.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(entropies))


@pytest.fixture(scope="module")
def digits() -> tuple[SiteDataset, np.ndarray]:
    return load_digits_labeled()


# --- SiteDataset ----------------------------------------------------------------------------


def test_site_dataset_has_no_place_for_labels() -> None:
    # feature_blocks: a table's categorical block sizes, from the public schema (fedssl.tables), not a label
    assert {f.name for f in dataclasses.fields(SiteDataset)} == {"inputs", "sample_ids", "modality", "feature_blocks"}


def test_site_dataset_shape_len_and_subset() -> None:
    data = _vectors(3)
    assert len(data) == 3 and data.input_shape == (2,)
    part = data.subset([2, 0])
    assert part.sample_ids == ("s2", "s0")
    assert part.inputs.tolist() == [[4.0, 5.0], [0.0, 1.0]]


@pytest.mark.parametrize(
    ("inputs", "ids", "modality", "expected"),
    [
        (torch.zeros(2, 3), ("a",), "vector", "1 sample ids for 2 input rows"),
        (torch.zeros(2, 3), ("a", "a"), "vector", "sample id 'a' appears more than once"),
        (torch.tensor([[0.0], [float("nan")]]), ("a", "b"), "vector", "sample 'b' contains NaN"),
        (torch.tensor([[float("inf")]]), ("a",), "vector", "sample 'a' contains NaN or infinite"),
        (torch.zeros(0, 3), (), "vector", "dataset is empty"),
        (torch.zeros(2, 3, dtype=torch.float64), ("a", "b"), "vector", "must be float32"),
        (torch.zeros(2, 3), ("a", "b"), "image", "image inputs must be shaped N x C x H x W"),
        (torch.zeros(2, 3), ("a", "b"), "audio", "valid choices: image, text, timeseries, vector"),
    ],
)
def test_site_dataset_rejects_bad_input(
    inputs: torch.Tensor, ids: tuple[str, ...], modality: str, expected: str
) -> None:
    with pytest.raises(DataError) as error:
        SiteDataset(inputs, ids, modality)
    assert expected in _one_line(error)


def test_nan_past_the_first_checked_chunk_is_named() -> None:
    from fedssl.data.dataset import FINITE_CHECK_ROWS

    rows = FINITE_CHECK_ROWS + 3
    inputs = torch.zeros(rows, 2)
    inputs[FINITE_CHECK_ROWS + 1, 1] = float("nan")
    with pytest.raises(DataError) as error:
        SiteDataset(inputs, tuple(f"s{i}" for i in range(rows)), "vector")
    assert f"sample 's{FINITE_CHECK_ROWS + 1}' contains NaN" in _one_line(error)


def test_subset_rejects_out_of_range_and_empty() -> None:
    with pytest.raises(DataError, match="out of range"):
        _vectors(3).subset([3])
    with pytest.raises(DataError, match="non-empty"):
        _vectors(3).subset([])


# --- loaders --------------------------------------------------------------------------------


def test_digits_loads_1797_images_in_unit_range(digits: tuple[SiteDataset, np.ndarray]) -> None:
    data, labels = digits
    assert data.inputs.shape == (1797, 1, 8, 8) and data.modality == "image"
    assert data.inputs.dtype == torch.float32
    assert float(data.inputs.min()) == 0.0 and float(data.inputs.max()) == 1.0
    assert float(data.inputs.mean()) == pytest.approx(0.305260, abs=1e-5)
    assert data.sample_ids[:2] == ("digits-0", "digits-1") and data.sample_ids[-1] == "digits-1796"
    assert labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_digits_kind_ignores_path_and_matches_labeled_inputs(digits: tuple[SiteDataset, np.ndarray]) -> None:
    unlabeled = load_site_data("/no/such/place", kind="digits")
    assert torch.equal(unlabeled.inputs, digits[0].inputs)


def test_auto_treats_bare_digits_source_as_embedded(
    digits: tuple[SiteDataset, np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no file or folder called "digits" here
    assert torch.equal(load_site_data("digits").inputs, digits[0].inputs)


def test_image_folder_recursive_resized_scaled(tmp_path: Path) -> None:
    Image.new("L", (4, 2), color=255).save(tmp_path / "b.png")  # first in sorted order: sets 2 x 4
    (tmp_path / "sub").mkdir()
    Image.new("L", (8, 4), color=51).save(tmp_path / "sub" / "a.png")  # resized down to 2 x 4
    Image.new("RGB", (4, 2), color=(0, 0, 0)).save(tmp_path / "c.jpg")
    (tmp_path / "notes.txt").write_text("not an image")

    data = load_site_data(tmp_path)
    assert data.modality == "image"
    assert data.sample_ids == ("b.png", "c.jpg", "sub/a.png")
    assert data.inputs.shape == (3, 1, 2, 4)
    assert data.inputs[0].unique().tolist() == [1.0]
    assert data.inputs[1].unique().tolist() == [0.0]
    assert data.inputs[2].unique().tolist() == [pytest.approx(0.2)]


def test_image_folder_explicit_size_and_colour(tmp_path: Path) -> None:
    Image.new("RGB", (5, 5), color=(255, 0, 0)).save(tmp_path / "red.png")
    data = load_site_data(tmp_path, "image_folder", SampleFormat(image_size=[3, 2]), grayscale=False)
    assert data.inputs.shape == (1, 3, 3, 2)
    assert data.inputs[0, :, 0, 0].tolist() == [1.0, 0.0, 0.0]


def test_image_folder_unreadable_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"not really a png")
    with pytest.raises(DataError) as error:
        load_site_data(tmp_path)
    assert "broken.png" in _one_line(error)


def test_image_folder_without_images(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no .png/.jpg/.jpeg files"):
        load_site_data(tmp_path)


def test_npy_vectors_and_images(tmp_path: Path) -> None:
    np.save(tmp_path / "v.npy", np.arange(6).reshape(3, 2))
    vectors = load_site_data(tmp_path / "v.npy")
    assert vectors.modality == "vector" and vectors.sample_ids == ("row-0", "row-1", "row-2")
    assert vectors.inputs.dtype == torch.float32 and vectors.inputs[2].tolist() == [4.0, 5.0]

    np.save(tmp_path / "i.npy", np.zeros((2, 5, 6)))
    images = load_site_data(tmp_path / "i.npy")
    assert images.modality == "image" and images.input_shape == (1, 5, 6)


def test_npz_with_ids_and_inputs_key(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", x=np.ones((2, 3)), ids=np.array(["p", "q"]))
    data = load_site_data(tmp_path / "a.npz")
    assert data.sample_ids == ("p", "q") and data.input_shape == (3,)

    np.savez(tmp_path / "b.npz", inputs=np.ones((2, 1, 2, 2)))
    assert load_site_data(tmp_path / "b.npz").sample_ids == ("row-0", "row-1")


def test_npz_without_inputs_key_lists_keys(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", features=np.ones((2, 3)))
    with pytest.raises(DataError) as error:
        load_site_data(tmp_path / "a.npz")
    assert "['features']" in _one_line(error) and "'x' or 'inputs'" in str(error.value)


def test_csv_uses_id_column_and_drops_label(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "d.csv", "id,f1,label,f2\nu1,1.5,7,2\nu2,3,8,-4\n")
    with pytest.warns(LabelColumnDroppedWarning, match="label"):
        data = load_site_data(path)
    assert data.modality == "vector" and data.sample_ids == ("u1", "u2")
    assert data.inputs.tolist() == [[1.5, 2.0], [3.0, -4.0]]


def test_csv_empty_cells_are_imputed_with_zero_and_counted(tmp_path: Path) -> None:
    from fedssl.data.loaders import MissingValuesImputedWarning

    with pytest.warns(MissingValuesImputedWarning, match=r"\{'a': 2\}"):
        data = load_site_data(_write_csv(tmp_path / "d.csv", "id,a,b\nu1,,2\nu2,3,4\nu3, ,5\n"))
    assert data.inputs.tolist() == [[0.0, 2.0], [3.0, 4.0], [0.0, 5.0]]


def test_csv_without_id_column_numbers_rows(tmp_path: Path) -> None:
    data = load_site_data(_write_csv(tmp_path / "d.csv", "a,b\n1,2\n\n3,4\n"))
    assert data.sample_ids == ("row-0", "row-1") and data.inputs.tolist() == [[1.0, 2.0], [3.0, 4.0]]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("id,age,city\nu1,30,Oslo\n", "column 'city' is not numeric"),
        ("", "is empty"),
        ("a,b\n", "no data rows"),
        ("id,a\nu1,nan\n", "sample 'u1' contains NaN"),
        ("a,b\n1,2,3\n", "line 2: 3 cells but the header has 2"),
        ("id,a\nu1,1\nu1,2\n", "sample id 'u1' appears more than once"),
    ],
)
def test_csv_bad_input(tmp_path: Path, text: str, expected: str) -> None:
    path = _write_csv(tmp_path / "d.csv", text)
    with pytest.raises(DataError) as error:
        load_site_data(path)
    message = _one_line(error)
    assert expected in message and "d.csv" in message


def test_missing_path_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(DataError) as error:
        load_site_data(tmp_path / "nope")
    message = _one_line(error)
    assert "nope does not exist" in message and "site.data_dir" in message


def test_unknown_kind_lists_valid_kinds(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="valid choices: auto, csv, digits, idx, image_folder, npy, npz"):
        load_site_data(tmp_path, kind="parquet")


def test_auto_rejects_unknown_suffix(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "d.tsv", "a\t1\n")
    with pytest.raises(DataError, match="cannot tell the data kind"):
        load_site_data(path)


def test_bad_image_size_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="^data.image_size: "):
        load_site_data(tmp_path, options=SampleFormat(image_size=[0, 4]))


# --- partitioners ---------------------------------------------------------------------------

LABELS = np.repeat(np.arange(4), 25)  # 100 samples, 4 balanced classes


def _run(name: str, seed: int = 0, alpha: float = 0.5, labels: np.ndarray = LABELS) -> list[np.ndarray]:
    return partition(name, labels=labels, num_sites=7, seed=seed, alpha=alpha)


@pytest.mark.parametrize("name", ["iid", "dirichlet", "quantity_skew"])
def test_partition_is_disjoint_complete_nonempty_and_seeded(name: str) -> None:
    parts = _run(name)
    assert len(parts) == 7 and all(len(p) > 0 for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(100))
    assert all(np.array_equal(a, b) for a, b in zip(parts, _run(name)))
    assert any(not np.array_equal(a, b) for a, b in zip(parts, _run(name, seed=1)))


def test_partition_registry_matches_functions_and_rejects_unknown() -> None:
    assert all(np.array_equal(a, b) for a, b in zip(_run("iid"), iid(100, 7, seed=0)))
    assert all(np.array_equal(a, b) for a, b in zip(_run("dirichlet"), dirichlet(LABELS, 7, 0.5, seed=0)))
    assert all(np.array_equal(a, b) for a, b in zip(_run("quantity_skew"), quantity_skew(100, 7, 0, 0.5)))
    with pytest.raises(ValueError, match="valid choices: dirichlet, iid, quantity_skew"):
        _run("pathological")


def test_iid_sizes_differ_by_at_most_one() -> None:
    assert [len(p) for p in iid(100, 7, seed=3)] == [15, 15, 14, 14, 14, 14, 14]


def test_dirichlet_small_alpha_is_more_label_skewed(digits: tuple[SiteDataset, np.ndarray]) -> None:
    labels = digits[1]
    skewed = _mean_label_entropy(dirichlet(labels, 10, alpha=0.1, seed=0), labels)
    near_iid = _mean_label_entropy(dirichlet(labels, 10, alpha=100.0, seed=0), labels)
    assert skewed < 0.6 < 2.0 < near_iid < np.log(10)
    # Label skew only: every site still holds an equal share.
    assert {len(p) for p in dirichlet(labels, 10, alpha=0.1, seed=0)} == {179, 180}


def test_dirichlet_scales_to_a_thousand_sites(digits: tuple[SiteDataset, np.ndarray]) -> None:
    parts = dirichlet(digits[1], 1000, alpha=0.1, seed=0)
    assert min(len(p) for p in parts) == 1 and sum(len(p) for p in parts) == 1797


def test_dirichlet_skews_consented_records_only_and_deals_the_rest_evenly(digits: tuple[SiteDataset, np.ndarray]) -> None:
    labels = digits[1].copy()
    labels[1::3] = UNLABELLED  # a third of the records have no label consent
    parts = dirichlet(labels, 10, alpha=0.1, seed=0)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))  # disjoint, complete
    assert {len(p) for p in parts} == {179, 180}  # still equal shares, not quantity skew
    unlabelled = [int((labels[p] == UNLABELLED).sum()) for p in parts]
    assert max(unlabelled) - min(unlabelled) <= 1  # dealt evenly, not by (unreadable) label
    assert _mean_label_entropy([p[labels[p] != UNLABELLED] for p in parts], labels) < 0.6  # the skew stays


def test_quantity_skew_small_alpha_is_more_unequal() -> None:
    spread = {a: np.std([len(p) for p in quantity_skew(1000, 10, seed=0, alpha=a)]) for a in (0.2, 100.0)}
    assert spread[0.2] > 4 * spread[100.0]


@pytest.mark.parametrize("name", ["iid", "dirichlet", "quantity_skew"])
def test_more_sites_than_samples_is_config_error(name: str) -> None:
    with pytest.raises(ConfigError) as error:
        partition(name, labels=np.zeros(5, dtype=int), num_sites=6, seed=0, alpha=1.0)
    assert "federation.num_sites=6" in _one_line(error)


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan")])
def test_bad_alpha_is_config_error(alpha: float) -> None:
    with pytest.raises(ConfigError, match="data.alpha"):
        partition("dirichlet", labels=LABELS, num_sites=2, seed=0, alpha=alpha)


def test_make_site_dataset_copies_only_its_rows(digits: tuple[SiteDataset, np.ndarray]) -> None:
    base = digits[0]
    site = make_site_dataset(base, np.array([5, 1700]))
    assert site.sample_ids == ("digits-5", "digits-1700")
    assert torch.equal(site.inputs[1], base.inputs[1700])
    assert site.inputs.untyped_storage().nbytes() == 2 * 64 * 4  # two 8x8 float32 rows, not the whole base
