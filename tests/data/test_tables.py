"""Categorical CSV columns (fedssl.tables): the public one-hot encoding, the 'missing'/'other' slots and
their warnings, the one-line errors for a bad spec, and the probe's width agreeing with the loader's."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from fedssl.config import load_config
from fedssl.data.loaders import MissingValuesImputedWarning, UnknownCategoryWarning, load_site_data
from fedssl.data.probe import probe_data
from fedssl.errors import ConfigError, DataError
from fedssl.sample_format import SampleFormat
from fedssl.tables import CategoricalSpec, categorical_spec

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "configs" / "base.yaml"
# A bank's table: a declared column (home), a hashed one (job), numbers, and gaps in both kinds.
BANK = ("id,age,home,job,income,label\n"
        "c1,30,rent,fixed,2.5,0\n"
        "c2,41,owner,,3.0,1\n"
        "c3,,castle,freelance,1.0,0\n"
        "c4,25,,fixed,0.5,1\n")
BANK_FORMAT = SampleFormat(categorical=["job"], categories={"home": ["rent", "owner"]}, hash_buckets=4)


def _csv(tmp_path: Path, text: str = BANK) -> Path:
    path = tmp_path / "bank.csv"
    path.write_text(text)
    return path


def test_declared_and_hashed_columns_become_one_hot_blocks_after_the_numbers(tmp_path: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_site_data(_csv(tmp_path), options=BANK_FORMAT)
    x = data.inputs.numpy()
    # numeric age, income; home: rent, owner, other, missing; job: 4 buckets, missing
    assert data.input_shape == (2 + 4 + 5,) and data.feature_blocks == (4, 5)
    assert x[:, :2].tolist() == [[30, 2.5], [41, 3.0], [0, 1.0], [25, 0.5]]
    assert x[:, 2:6].tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    job = x[:, 6:]
    assert (job.sum(axis=1) == 1).all() and job[1, 4] == 1 and job[0, :4].argmax() < 4
    assert (job[0] == job[3]).all()  # the same value lands in the same bucket, on every site and run
    kinds = {type(w.message): str(w.message) for w in caught}
    assert "'home': 1" in kinds[UnknownCategoryWarning]  # castle -> other
    missing = [str(w.message) for w in caught if w.category is MissingValuesImputedWarning]
    assert any("'missing'" in m and "'home': 1" in m and "'job': 1" in m for m in missing)
    assert any("imputed 0" in m and "'age': 1" in m for m in missing)


def test_hash_buckets_do_not_depend_on_the_data() -> None:
    spec = categorical_spec(["job"], {}, buckets=8)
    assert spec.slot("job", "fixed") == categorical_spec(["job"], {}, buckets=8).slot("job", "fixed")
    assert spec.slot("job", "")[0] == 8 and spec.block_size("job") == 9
    assert len({spec.slot("job", f"value-{i}")[0] for i in range(200)}) == 8  # every bucket reachable


def test_a_text_column_not_declared_names_the_keys_that_declare_it(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_site_data(_csv(tmp_path), options=SampleFormat(categorical=["job"]))
    assert "column 'home' is not numeric" in str(err.value) and "data.categorical: [home]" in str(err.value)
    with pytest.raises(DataError, match="data.categorical: \\[home\\]"):
        probe_data(str(_csv(tmp_path)), options=SampleFormat(categorical=["job"]))


def test_a_categorical_column_not_in_the_header_is_one_line(tmp_path: Path) -> None:
    options = SampleFormat(categorical=["job", "hom"], categories={"home": ["rent"]})
    for read in (lambda: load_site_data(_csv(tmp_path), options=options), lambda: probe_data(str(_csv(tmp_path)), options=options)):
        with pytest.raises(DataError) as err:
            read()
        assert "'hom'" in str(err.value) and "\n" not in str(err.value) and "bank.csv" in str(err.value)


@pytest.mark.parametrize(("override", "key"), [
    ("data.hash_buckets=1", "data.hash_buckets"),
    ("data.categorical=[job, job]", "data.categorical"),
    ("data.categorical=['']", "data.categorical[0]"),
    ("data.categories={home: []}", "data.categories.home"),
    ("data.categories={home: [a, a]}", "data.categories.home"),
    ("data.categories={home: rent}", "data.categories.home"),
    ("data.categorical=[job]", "data.categorical"),  # with data.kind npy below
])
def test_bad_categorical_spec_is_one_line_naming_the_key(override: str, key: str) -> None:
    extra = ["data.kind=npy"] if override == "data.categorical=[job]" else []
    with pytest.raises(ConfigError) as err:
        load_config(BASE, [override, *extra])
    assert str(err.value).startswith(f"{key}:") and "\n" not in str(err.value)


def test_config_keys_reach_the_spec() -> None:
    cfg = load_config(BASE, ["data.categorical=[job, home]", "data.categories={home: [rent, 1]}", "data.hash_buckets=4"])
    assert cfg.data.categorical_spec == CategoricalSpec((("home", ("rent", "1")),), ("job",), 4)


def test_the_probe_agrees_with_the_loader_on_tables(tmp_path: Path) -> None:
    path = _csv(tmp_path)
    for options in (BANK_FORMAT, SampleFormat(categorical=["home", "job"], hash_buckets=3)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = load_site_data(path, options=options)
        probe = probe_data(str(path), options=options)
        assert (probe.sample_shape, probe.count, probe.modality) == (loaded.input_shape, len(loaded), "vector")
    assert np.isfinite(loaded.inputs.numpy()).all()


def _converter():
    import importlib.util

    spec = importlib.util.spec_from_file_location("credit_to_table", ROOT / "simulations" / "credit_to_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_credit_converter_writes_features_without_the_label_and_an_id_label_csv(tmp_path: Path) -> None:
    columns = {"Status": ["good", "bad", "good"], "Income": [129, None, 0], "Home": ["rent", None, "owner"]}
    assert _converter().write_table(columns, ["Income"], tmp_path, label="Status", positive="bad") == 3
    assert (tmp_path / "credit.csv").read_text().splitlines() == [
        "id,Income,Home", "row-0,4.86753,rent", "row-1,,", "row-2,0,owner"]  # log1p; NA stays empty
    assert (tmp_path / "labels.csv").read_text().split() == ["id,label", "row-0,0", "row-1,1", "row-2,0"]
    with pytest.warns(MissingValuesImputedWarning):
        data = load_site_data(tmp_path / "credit.csv", options=SampleFormat(categories={"Home": ["rent", "owner"]}))
    assert data.sample_ids == ("row-0", "row-1", "row-2") and data.input_shape == (1 + 4,)


MODELDATA = Path("/usr/lib/R/site-library/modeldata/data/Rdata.rdx")


@pytest.mark.skipif(not MODELDATA.is_file(), reason="r-cran-modeldata is not installed (apt-get install r-cran-modeldata)")
def test_credit_data_converts_and_fits_the_declared_schema(tmp_path: Path) -> None:
    pytest.importorskip("rdata")
    module = _converter()
    columns, numeric = module.read_lazyload(MODELDATA.with_suffix(""), "credit_data")
    assert module.write_table(columns, numeric, tmp_path, "Status", "bad") == 4454
    options = load_config(ROOT / "configs" / "experiments" / "credit-vime.yaml").data
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_site_data(tmp_path / "credit.csv", options=options)
    assert not [w for w in caught if w.category is UnknownCategoryWarning]  # the schema names every value
    assert data.input_shape == (34,) and len(data) == 4454


def test_site_sources_are_encoded_by_the_same_schema_as_the_central_table(tmp_path: Path) -> None:
    """Per-site CSVs (data.site_sources) with different values present still give every site the central width."""
    from fedssl.config import config_from_dict
    from fedssl.experiment import central_data_for, simulated_site_from_config
    from fedssl.preflight import preflight

    central = _csv(tmp_path)
    (tmp_path / "labels.csv").write_text("id,label\n" + "".join(f"c{i},{i % 2}\n" for i in range(1, 5)))
    (tmp_path / "a.csv").write_text("id,age,home,job,income\na1,30,rent,fixed,1\na2,31,rent,fixed,2\n")
    (tmp_path / "b.csv").write_text("id,age,home,job,income\nb1,50,owner,,1\nb2,51,,pilot,2\nb3,52,tent,pilot,3\n")
    config = config_from_dict({
        "data": {"source": str(central), "labels": str(tmp_path / "labels.csv"), "partition": "iid", "test_fraction": 0.5,
                 "site_sources": [str(tmp_path / "a.csv"), str(tmp_path / "b.csv")], "categorical": ["job"],
                 "categories": {"home": ["rent", "owner"]}, "hash_buckets": 4},
        "federation": {"num_sites": 2, "min_sites": 1, "rounds": 1},
        "model": {"encoder": "mlp", "width": 8}, "pretext": {"name": "vime"}, "privacy": {"enabled": False},
        "training": {"batch_size": 2, "local_steps": 1},
    })
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sites = [simulated_site_from_config(config, i)[0] for i in range(2)]
        width = central_data_for(config).train.input_shape
    assert [s.input_shape for s in sites] == [width, width] == [(11,), (11,)]
    assert all(s.feature_blocks == (4, 5) for s in sites)
    assert [p.key for p in preflight(config, evaluate=False).problems] == []


def test_the_preflight_names_data_categorical_for_a_schema_that_does_not_fit_the_table(tmp_path: Path) -> None:
    from fedssl.preflight import preflight

    path = _csv(tmp_path)
    for overrides in (["data.categorical=[job]"], ["data.categorical=[job, hom]", "data.categories={home: [rent]}"]):
        cfg = load_config(BASE, [f"data.source={path}", "model.encoder=mlp", "pretext.name=vime", *overrides])
        problems = preflight(cfg, evaluate=False).problems
        assert [p.key for p in problems][:1] == ["data.categorical"] and "bank.csv" in problems[0].message
