"""data.site_sources: one real data source per simulated site (no partition of data.source), on tiny real
files; the central evaluation keeps data.source + data.labels, and the preflight probes every site's source."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedssl.config import config_from_dict
from fedssl.errors import ConfigError
from fedssl.experiment import central_data_for, site_partitions, simulated_site_from_config
from fedssl.preflight import preflight


def _write_lines(path: Path, words: str, count: int) -> Path:
    path.write_text("".join(f"{words} number {i}\n" for i in range(count)))
    return path


def _config(tmp_path: Path, sites: list[str], **federation: object) -> dict:
    central = _write_lines(tmp_path / "central.txt", "held out", 20)
    (tmp_path / "labels.csv").write_text("id,label\n" + "".join(f"row-{i},{'ab'[i % 2]}\n" for i in range(20)))
    return {
        "run": {"name": "sites", "output_dir": str(tmp_path / "runs")},
        "data": {"source": str(central), "labels": str(tmp_path / "labels.csv"), "site_sources": sites,
                 "partition": "dirichlet", "test_fraction": 0.5, "max_length": 16},
        "federation": {"num_sites": len(sites), "min_sites": 1, "rounds": 1, **federation},
        "model": {"encoder": "transformer", "width": 8, "depth": 1},
        "pretext": {"name": "masked_tokens"},
        "training": {"local_steps": 1, "batch_size": 4},
        "privacy": {"enabled": False},
    }


def test_each_site_trains_on_its_own_source_and_the_evaluation_on_data_source(tmp_path: Path) -> None:
    sites = [str(_write_lines(tmp_path / "clinic-a.txt", "alpha", 7)), str(_write_lines(tmp_path / "clinic-b.txt", "beta", 11))]
    config = config_from_dict(_config(tmp_path, sites))
    assert site_partitions(config) == []  # no partition: dirichlet is not used, though central labels exist
    datasets = [simulated_site_from_config(config, i)[0] for i in range(2)]
    assert [len(d) for d in datasets] == [7, 11] and all(d.modality == "text" for d in datasets)
    assert datasets[0].inputs[0].tolist() != datasets[1].inputs[0].tolist()  # 'alpha ...' vs 'beta ...'
    central = central_data_for(config)
    assert len(central.train) + len(central.test) == 20 and central.labels is not None
    with pytest.raises(ConfigError, match="out of range"):
        simulated_site_from_config(config, 2)
    assert preflight(config).problems == []


def test_num_sites_must_match_the_site_sources(tmp_path: Path) -> None:
    sites = [str(_write_lines(tmp_path / f"s{i}.txt", "x", 5)) for i in range(2)]
    with pytest.raises(ConfigError) as error:
        config_from_dict(_config(tmp_path, sites, num_sites=3, min_sites=1))
    assert str(error.value).startswith("federation.num_sites: must equal the 2 data.site_sources") and "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="^data.site_sources: must be a list of paths"):
        config_from_dict(_config(tmp_path, [sites[0], ""]))


def test_the_preflight_probes_every_site_source(tmp_path: Path) -> None:
    good = str(_write_lines(tmp_path / "good.txt", "x", 5))
    table = tmp_path / "table.csv"
    table.write_text("a,b\n1,2\n3,4\n")
    problems = preflight(config_from_dict(_config(tmp_path, [good, str(tmp_path / "missing.txt"), str(table)]))).problems
    assert [p.key for p in problems] == ["data.site_sources"]
    assert problems[0].message.startswith(f"site 1 ({tmp_path / 'missing.txt'}):")
    (problem,) = preflight(config_from_dict(_config(tmp_path, [good, str(table)]))).problems
    assert problem.key == "data.site_sources" and problem.message.startswith(f"site 1 ({table}) holds 2 vectors")
