"""data.labels for any source (fedssl.data.labels) on tiny real files: an id,label CSV of class names or
integers, class-named image folders; the loader's split and the torch-free preflight agree on every error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedssl.config import config_from_dict
from fedssl.data import ConsentManifest
from fedssl.data.labels import LabelTable, class_indexed, open_labels
from fedssl.data.probe import probe_data, probe_labels
from fedssl.errors import ConfigError, DataError
from fedssl.experiment import central_data_for
from fedssl.preflight import preflight

TOPICS = ("food", "art", "computers")


def _text_source(tmp_path: Path, count: int = 30) -> tuple[Path, Path]:
    lines = tmp_path / "lines.txt"
    lines.write_text("".join(f"fortune {i} about {TOPICS[i % 3]}\n" for i in range(count)))
    labels = tmp_path / "labels.csv"
    labels.write_text("id,label\n" + "".join(f"row-{i},{TOPICS[i % 3]}\n" for i in range(count)))
    return lines, labels


def _config(tmp_path: Path, source: Path, labels: str | Path, **data: object) -> dict:
    return {
        "run": {"name": "labels", "output_dir": str(tmp_path / "runs")},
        "data": {"source": str(source), "labels": str(labels), "partition": "iid", "test_fraction": 0.2, **data},
        "federation": {"num_sites": 2, "rounds": 1},
        "model": {"encoder": "transformer", "width": 8, "depth": 1},
        "pretext": {"name": "masked_tokens"},
        "training": {"local_steps": 1, "batch_size": 4},
        "privacy": {"enabled": False},
    }


def _problems(config: dict) -> list[tuple[str, str]]:
    return [(p.key, p.message) for p in preflight(config_from_dict(config)).problems]


def test_class_names_become_sorted_integers_and_keep_their_names(tmp_path: Path) -> None:
    source, labels = _text_source(tmp_path)
    data = central_data_for(config_from_dict(_config(tmp_path, source, labels)))
    assert data.labels is not None and data.labels.class_names == ("art", "computers", "food")
    ids = list(data.test.sample_ids)
    expected = [("art", "computers", "food").index(TOPICS[int(i.split("-")[1]) % 3]) for i in ids]
    assert data.labels.labels_for(ids).tolist() == expected
    assert len(data.train) + len(data.test) == 30 and len(data.test) == 6
    assert _problems(_config(tmp_path, source, labels)) == []
    assert probe_labels(str(labels), probe_data(str(source), labels=str(labels))) == 30


def test_integer_labels_stay_as_written_and_unconsented_labels_are_never_read(tmp_path: Path) -> None:
    table = tmp_path / "labels.csv"
    table.write_text("id,label\na,7\nb,NOT-READ\nc,3\n")
    read: list[str] = []
    labels = LabelTable(frozenset("abc"), lambda i: (read.append(i), "7" if i == "a" else "3")[1])
    source, names = class_indexed(labels, ["c", "a"])
    assert (source("a"), source("c"), names) == (7, 3, None) and sorted(read) == ["a", "c"]
    # the numbering of names comes from consented labels only: b's value never shows
    opened = open_labels(str(table), ["a", "b", "c"], "src")
    source, names = class_indexed(opened, ["a", "c"])
    assert (source("a"), source("c"), names) == (7, 3, None)
    with pytest.raises(DataError, match="data.labels: no label for sample 'b'"):
        source("b")


def test_a_partially_labelled_source_consents_only_labelled_ids(tmp_path: Path) -> None:
    source, labels = _text_source(tmp_path, count=40)
    labels.write_text("id,label\n" + "".join(f"row-{i},{TOPICS[i % 3]}\n" for i in range(0, 40, 2)))
    data = central_data_for(config_from_dict(_config(tmp_path, source, labels)))
    assert data.labels is not None
    assert all(int(i.split("-")[1]) % 2 == 0 for i in data.labels.manifest.ids) and len(data.test) == 8
    assert probe_labels(str(labels), probe_data(str(source), labels=str(labels))) == 20


def test_class_folders_label_an_image_folder(tmp_path: Path) -> None:
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(10):
            Image.fromarray((rng.random((6, 6)) * 255).astype(np.uint8)).save(root / cls / f"{i}.png")
    config = _config(tmp_path, root, "folders", partition="dirichlet")
    config["model"], config["pretext"] = {"encoder": "cnn", "width": 8, "depth": 1}, {"name": "rotation"}
    data = central_data_for(config_from_dict(config))
    assert data.labels is not None and data.labels.class_names == ("cat", "dog")
    assert data.labels.labels_for(data.test.sample_ids).tolist() == [i.startswith("dog/") for i in data.test.sample_ids]
    assert _problems(config) == []
    assert probe_labels("folders", probe_data(str(root))) == 20
    # an image folder's ids are its relative paths: a CSV must use them
    (tmp_path / "paths.csv").write_text("id,label\n" + "".join(f"{c}/{i}.png,{c}\n" for c in ("cat", "dog") for i in range(10)))
    assert probe_labels(str(tmp_path / "paths.csv"), probe_data(str(root))) == 20


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("id,label\nrow-0,art\nline-99,food\n", "1 of 2 ids in"),  # an id the source does not have
        ("id,topic\nrow-0,art\n", "has no column 'label'"),
        ("", "is empty"),
        ("id,label\n", "has a header but no rows"),
    ],
)
def test_a_bad_labels_csv_is_one_line_naming_data_labels_in_the_loader_and_the_preflight(
        tmp_path: Path, text: str, expected: str) -> None:
    source, labels = _text_source(tmp_path)
    labels.write_text(text)
    config = _config(tmp_path, source, labels)
    with pytest.raises(DataError) as error:
        central_data_for(config_from_dict(config))
    message = str(error.value)
    assert message.startswith("data.labels: ") and expected in message and "\n" not in message
    problems = _problems(config)
    assert problems[0][0] == "data.labels" and expected in problems[0][1]


def test_a_missing_labels_file_and_mismatched_forms_are_named(tmp_path: Path) -> None:
    source, _ = _text_source(tmp_path)
    assert [key for key, _ in _problems(_config(tmp_path, source, tmp_path / "none.csv"))][:1] == ["data.labels"]
    # folders on text, an IDX label file on text: both named, with the fix
    for labels, fragment in (("folders", "folders labels an image folder"), (tmp_path / "l.idx", "IDX label file")):
        (key, message), *_ = _problems(_config(tmp_path, source, labels))
        assert key == "data.labels" and fragment in message and "id,label CSV" in message
    with pytest.raises(ConfigError, match="^data.labels: folders labels an image folder"):
        config_from_dict(_config(tmp_path, source, "folders", kind="text"))
    with pytest.raises(ConfigError, match="^data.labels: must be an id,label CSV"):
        config_from_dict(_config(tmp_path, source, ""))


def test_an_explicit_manifest_consenting_an_unlabelled_id_is_named(tmp_path: Path) -> None:
    source, labels = _text_source(tmp_path)
    labels.write_text("id,label\n" + "".join(f"row-{i},{TOPICS[i % 3]}\n" for i in range(29)))
    manifest = tmp_path / "consent.txt"
    ConsentManifest(frozenset(f"row-{i}" for i in range(30))).save(manifest)
    config = _config(tmp_path, source, labels)
    config["evaluation"] = {"consent_manifest": str(manifest)}
    with pytest.raises(DataError, match="^data.labels: consented sample 'row-29' has no label"):
        central_data_for(config_from_dict(config))
