"""The consent manifest and the guarantee that an unconsented label is never read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedssl.data import (
    ConsentedLabels,
    ConsentManifest,
    label_source_from_array,
    label_source_from_csv,
    make_demo_manifest,
)
from fedssl.errors import ConfigError, ConsentError, DataError

IDS = tuple(f"s{i}" for i in range(40))
LABELS = np.arange(40) % 4
CONSENTED = frozenset(IDS[::3])  # s0, s3, s6, ...


class RecordingSource:
    """A label source that records every read and fails the test on an unconsented one."""

    def __init__(self, consented: frozenset[str]) -> None:
        self.consented = consented
        self.reads: list[str] = []
        self._labels = label_source_from_array(IDS, LABELS)

    def __call__(self, sample_id: str) -> int:
        if sample_id not in self.consented:
            raise AssertionError(f"unconsented label {sample_id!r} was read")
        self.reads.append(sample_id)
        return self._labels(sample_id)


@pytest.mark.parametrize("suffix", [".txt", ".json", ".yaml"])
def test_manifest_round_trip(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"consent{suffix}"
    ConsentManifest(CONSENTED).save(path)
    assert ConsentManifest.load(path).ids == CONSENTED
    assert not path.with_name(path.name + ".tmp").exists()


def test_manifest_text_allows_comments_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "consent.txt"
    path.write_text("# consented 2024-05\ns1\n\n  s2  # signed late\n#s3\n")
    manifest = ConsentManifest.load(path)
    assert manifest.ids == {"s1", "s2"} and "s2" in manifest and "s3" not in manifest


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("c.json", '{"ids": ["a"]}', "needs key 'consented_ids'"),
        ("c.json", '{"consented_ids": [1, 2]}', "list of sample id strings"),
        ("c.yaml", "consented_ids: [a\n", "is not valid YAML"),
        ("c.json", "{", "is not valid JSON"),
    ],
)
def test_manifest_bad_file(tmp_path: Path, name: str, text: str, expected: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError) as error:
        ConsentManifest.load(tmp_path / name)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_manifest_missing_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="evaluation.consent_manifest"):
        ConsentManifest.load(tmp_path / "absent.txt")


def test_unconsented_label_is_never_read_across_labelled_subsets() -> None:
    source = RecordingSource(CONSENTED)
    labels = ConsentedLabels(ConsentManifest(CONSENTED), source)
    pool = labels.consented_ids(IDS)
    assert pool == [i for i in IDS if i in CONSENTED]  # order kept
    for seed in range(5):
        for size in (1, 4, len(pool)):
            subset = list(np.random.default_rng(seed).choice(pool, size=size, replace=False))
            expected = [int(LABELS[IDS.index(i)]) for i in subset]
            assert labels.labels_for(subset).tolist() == expected
    assert set(source.reads) == CONSENTED


def test_unconsented_request_fails_before_any_read() -> None:
    source = RecordingSource(CONSENTED)
    labels = ConsentedLabels(ConsentManifest(CONSENTED), source)
    with pytest.raises(ConsentError) as error:
        labels.labels_for(["s0", "s3", "s4", "s5"])
    assert "'s4'" in str(error.value) and "'s5'" not in str(error.value)
    assert source.reads == []  # not even s0 and s3


def test_labels_for_returns_int64_and_handles_empty() -> None:
    labels = ConsentedLabels(ConsentManifest(CONSENTED), RecordingSource(CONSENTED))
    assert labels.labels_for([]).dtype == np.int64 and labels.labels_for([]).shape == (0,)
    assert labels.labels_for(["s6", "s3"]).tolist() == [2, 3]


def test_array_source_rejects_mismatch_and_unknown_ids() -> None:
    with pytest.raises(DataError, match="2 sample ids for 1 labels"):
        label_source_from_array(["a", "b"], [1])
    with pytest.raises(DataError, match="no label for sample 'z'"):
        label_source_from_array(["a"], [1])("z")


def test_csv_source_parses_only_requested_labels(tmp_path: Path) -> None:
    # Unconsented rows hold labels that would fail to parse: an eager reader would raise.
    path = tmp_path / "labels.csv"
    path.write_text("id,site,label\na,1,3\nb,1,SECRET\nc,2,5\n", encoding="utf-8")
    labels = ConsentedLabels(ConsentManifest(frozenset({"a", "c"})), label_source_from_csv(path))
    assert labels.labels_for(["c", "a"]).tolist() == [5, 3]
    with pytest.raises(ConsentError, match="'b'"):
        labels.labels_for(["b"])
    with pytest.raises(DataError, match="label of sample 'b' is 'SECRET'"):
        label_source_from_csv(path)("b")


@pytest.mark.parametrize(
    ("text", "kwargs", "expected"),
    [
        ("id,y\na,1\n", {}, "has no column 'label' (columns: id, y)"),
        ("id,label\na,1\na,2\n", {}, "sample id 'a' repeats"),
        ("", {}, "is empty"),
    ],
)
def test_csv_source_bad_file(tmp_path: Path, text: str, kwargs: dict[str, str], expected: str) -> None:
    path = tmp_path / "labels.csv"
    path.write_text(text)
    with pytest.raises(DataError) as error:
        label_source_from_csv(path, **kwargs)
    assert expected in str(error.value)


def test_csv_source_custom_columns(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("sample,diagnosis\nx,2\n")
    assert label_source_from_csv(path, id_column="sample", label_column="diagnosis")("x") == 2


def test_demo_manifest_consents_enough_for_the_test_set_plus_a_fraction_of_the_rest() -> None:
    ids = IDS[:40]  # a test set of 10 (0.25) and half of the other 30
    manifest = make_demo_manifest(ids, test_fraction=0.25, consented_fraction=0.5, seed=0)
    assert len(manifest) == 10 + 15 and manifest.ids <= set(ids)
    assert make_demo_manifest(ids, 0.25, 0.5, seed=0).ids == manifest.ids
    assert make_demo_manifest(ids, 0.25, 0.5, seed=1).ids != manifest.ids
    with pytest.raises(ConfigError, match="evaluation.consented_fraction"):
        make_demo_manifest(ids, 0.25, 1.5, seed=0)


def test_too_few_consented_records_for_the_test_set_is_one_line_naming_the_fix(tmp_path: Path) -> None:
    from fedssl.experiment import central_data

    manifest = tmp_path / "consent.txt"
    ConsentManifest(frozenset(f"digits-{i}" for i in range(100))).save(manifest)
    with pytest.raises(ConfigError) as error:
        central_data("digits", "auto", 0.3, 0, str(manifest))
    message = str(error.value)
    assert "\n" not in message and "evaluation.consent_manifest" in message and "data.test_fraction" in message


def test_label_skew_without_consented_training_labels_is_refused(tmp_path: Path) -> None:
    from fedssl.experiment import central_data, load_experiment, site_partitions

    root = Path(__file__).resolve().parents[2]
    manifest = tmp_path / "consent.txt"
    ids = [f"digits-{i}" for i in range(1797)]
    ConsentManifest(frozenset(ids[: round(0.3 * 1797)])).save(manifest)  # just enough for the test set
    config = load_experiment(root / "configs" / "experiments" / "digits-tiny.yaml",
                             [f"evaluation.consent_manifest={manifest}", "data.partition=dirichlet"])
    try:
        with pytest.raises(ConfigError, match="data.partition: dirichlet label skew needs consented labels"):
            site_partitions(config)
    finally:
        central_data.cache_clear()
