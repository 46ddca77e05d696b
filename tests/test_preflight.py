"""The preflight check on tiny real files: each problem named by its config key, all of them at once,
without torch or Flower, and `fedssl check` answering one line per problem."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedssl.config import load_config
from fedssl.data.idx import write_idx
from fedssl.preflight import PreflightError, preflight, require_preflight
from fedssl.sample_format import SampleFormat

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "configs" / "base.yaml"
DEMO = ROOT / "configs" / "experiments" / "digits-demo.yaml"
TINY = ROOT / "configs" / "experiments" / "digits-tiny.yaml"
FEDSSL = str(Path(sys.executable).parent / "fedssl")
# Settings under which tiny files fit (a few sites, no labels needed, a batch the sites' policy accepts).
FITS = ["data.partition=iid", "evaluation.enabled=false", "federation.num_sites=2", "training.batch_size=2",
        "privacy.enabled=false"]
VECTOR_FITS = ["model.encoder=mlp", "pretext.name=byol"]
TEXT_FITS = ["model.encoder=transformer", "pretext.name=masked_tokens", "data.partition=iid"]
SERIES_FITS = ["data.kind=timeseries", "model.encoder=conv1d", "pretext.name=masked_segment"]
FITS_BY_SOURCE = {"table": VECTOR_FITS, "vectors": VECTOR_FITS, "wide": ["pretext.name=byol"], "lines": TEXT_FITS, "docs": TEXT_FITS,
                  "series": SERIES_FITS}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Tiny real sources: square and wide PNG folders, a CSV (with a label column), .npy images and vectors."""
    root = tmp_path_factory.mktemp("preflight-data")
    rng = np.random.default_rng(0)
    for name, (height, width) in {"square": (12, 12), "wide": (8, 12)}.items():
        (root / name).mkdir()
        for i in range(8):
            Image.fromarray((rng.random((height, width)) * 255).astype(np.uint8)).save(root / name / f"{i}.png")
    rows = "".join(f"r{i},{i},{i % 3},{i * 0.5},{i % 2}\n" for i in range(40))
    (root / "table.csv").write_text("id,a,b,c,label\n" + rows)
    homes = ["rent", "owner", "", "castle"]
    (root / "bank.csv").write_text("id,age,home,job\n" + "".join(f"b{i},{i},{homes[i % 4]},job-{i % 5}\n" for i in range(40)))
    np.save(root / "images.npy", rng.random((40, 8, 8)).astype(np.float32))
    np.save(root / "vectors.npy", rng.random((40, 6)).astype(np.float32))
    series = rng.normal(size=(40, 3, 20))
    series[::3, :, 15:] = np.nan  # every third series is 15 steps long (the UCR/UEA NaN tail)
    np.savez(root / "series.npz", x=series)
    (root / "manifest.txt").write_text("digits-0\ndigits-1\n")
    (root / "lines.txt").write_text("".join(f"line {i}: card lost, please block it\n" for i in range(40)))
    (root / "docs").mkdir()
    for i in range(6):
        (root / "docs" / f"{i}.txt").write_text(f"document {i}\nabout fees")
    sources = {path.stem if path.is_file() else path.name: path for path in root.iterdir()}
    # IDX as Fashion-MNIST ships it (gzipped, MNIST names), but RGB channels-last, with its label file
    sources["rgb"] = write_idx(root / "rgb-images-idx3-ubyte.gz", (rng.random((40, 10, 10, 3)) * 255).astype(np.uint8))
    sources["rgb_labels"] = write_idx(root / "rgb-labels-idx1-ubyte.gz", (np.arange(40) % 4).astype(np.uint8))
    sources["short_labels"] = write_idx(root / "short-labels-idx1-ubyte", (np.arange(39) % 4).astype(np.uint8))
    return sources


def _keys(source: Path | str, *overrides: str, config: Path = BASE, **options) -> list[str]:
    cfg = load_config(config, [f"data.source={source}", *overrides])
    return [problem.key for problem in preflight(cfg, **options).problems]


# (data fixture, overrides on top of FITS, the one key the problem line must name)
CASES = [
    ("table", ["model.encoder=cnn"], "model.encoder"),
    ("vectors", ["model.encoder=resnet", "pretext.name=byol"], "model.encoder"),
    ("table", ["model.encoder=mlp", "pretext.name=rotation"], "pretext.name"),
    ("wide", ["pretext.name=rotation"], "pretext.name"),
    ("square", ["pretext.name=masked_reconstruction", "pretext.params.patch_size=5"], "pretext.params.patch_size"),
    ("square", ["pretext.name=colorization"], "pretext.name"),
    ("square", ["pretext.name=simclr", "privacy.enabled=true"], "pretext.name"),
    ("square", ["pretext.name=moco", "privacy.enabled=true"], "pretext.name"),
    ("square", ["pretext.name=vime"], "pretext.name"),  # tables only
    ("table", ["model.encoder=mlp", "pretext.name=scarf", "privacy.enabled=true"], "pretext.name"),
    ("wide", ["pretext.name=jigsaw", "pretext.params.grid=3"], "pretext.params.grid"),
    ("wide", ["pretext.name=rotation_jigsaw"], "pretext.name"),  # rotation's rule: a square image
    ("images", ["pretext.name=rotation_jigsaw", "pretext.params.grid=3"], "pretext.params.grid"),  # 8x8: jigsaw's rule
    ("table", ["model.encoder=vit"], "model.encoder"),
    ("square", ["model.input_shape=[1,8,8]"], "model.input_shape"),
    ("square", ["data.partition=dirichlet"], "data.partition"),
    ("table", ["model.encoder=mlp", "pretext.name=byol", "evaluation.enabled=true"], "evaluation.enabled"),
    ("images", ["federation.num_sites=40", "federation.min_sites=2"], "federation.num_sites"),
    ("images", ["privacy.enabled=true", "training.batch_size=16"], "training.batch_size"),
    ("images", ["privacy.enabled=true", "training.local_steps=2000"], "training.local_steps"),
    ("images", ["privacy.enabled=true", "federation.rounds=200"], "federation.rounds"),
    ("square", ["warm_start.source=synthetic"], "warm_start.source"),
    ("images", ["warm_start.source=path", "warm_start.path=/no/such/checkpoint.pt", "warm_start.description=public"],
     "warm_start.path"),
    ("lines", ["model.encoder=cnn"], "model.encoder"),
    ("docs", ["model.encoder=resnet"], "model.encoder"),
    ("lines", ["pretext.name=rotation"], "pretext.name"),
    ("lines", ["pretext.name=jigsaw"], "pretext.name"),
    ("vectors", ["model.encoder=transformer"], "model.encoder"),
    ("square", ["pretext.name=masked_tokens"], "pretext.name"),
    ("series", ["model.encoder=cnn"], "model.encoder"),
    ("series", ["model.encoder=mlp"], "model.encoder"),
    ("series", ["pretext.name=rotation"], "pretext.name"),
    ("series", ["pretext.name=byol"], "pretext.name"),
    ("vectors", ["model.encoder=conv1d"], "model.encoder"),
    ("square", ["pretext.name=ts_views"], "pretext.name"),
    ("nowhere", [], "data.source"),
    ("square", ["data.kind=parquet"], "data.kind"),
]


@pytest.mark.parametrize(("source", "overrides", "key"), CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_each_mismatch_is_one_problem_naming_its_key(data, source, overrides, key):
    path = data.get(source, Path("/no/such") / source)
    fits = [*FITS, *FITS_BY_SOURCE.get(source, [])]
    if source != "nowhere" and "data.kind=parquet" not in overrides:
        assert _keys(path, *fits) == []  # the same data and base settings fit: the override is the problem
    assert _keys(path, *fits, *overrides) == [key]


def test_the_noise_floor_check_agrees_with_the_sites_budget():
    """digits-tiny lowers the floor to 0.3 because 2 rounds x 3 steps calibrate to sigma ~0.47: at the default
    0.8 the sites refuse, and preflight says so; raising the rounds far enough fits again."""
    assert _keys("digits", config=TINY) == []
    assert _keys("digits", "privacy.min_noise_multiplier=0.8", config=TINY) == ["privacy.min_noise_multiplier"]
    from fedssl.privacy.analysis import noise_for_budget

    assert noise_for_budget(8.0, 1e-5, 1 / 40, 6) < 0.8  # what a site would calibrate, below its floor


def test_every_problem_is_listed_not_only_the_first(data):
    """The new user's image folder under the default config: label skew, evaluation and site count at once."""
    cfg = load_config(BASE, [f"data.source={data['square']}"])
    with pytest.raises(PreflightError) as raised:
        require_preflight(cfg)
    assert [p.key for p in raised.value.problems] == ["data.partition", "evaluation.enabled", "training.batch_size"]
    assert str(raised.value).count("\n") == 2


def test_labels_come_through_the_consent_manifest_only(data):
    assert _keys("digits", "data.partition=dirichlet") == []
    # Two consented ids cannot hold a 30 % test set, let alone a training pool to skew by label.
    keys = _keys("digits", "data.partition=dirichlet", f"evaluation.consent_manifest={data['manifest']}")
    assert keys == ["evaluation.consent_manifest", "data.partition"]


def test_a_deployment_checks_the_config_not_the_coordinators_data(data):
    """The sites hold the data: the coordinator's data.source is not theirs, its evaluation optional."""
    overrides = ["data.partition=dirichlet", "model.encoder=mlp", "model.input_shape=[6]", "pretext.name=byol"]
    assert _keys(data["table"], *overrides, simulated_sites=False, evaluation_optional=True) == []
    assert _keys(data["table"], "model.input_shape=[1,8,12]", simulated_sites=False, evaluation_optional=True) == \
        ["pretext.name"]


def test_the_probe_reads_what_the_loaders_load(data):
    from fedssl.data.loaders import load_site_data
    from fedssl.data.probe import probe_data

    for name in ("square", "wide", "table", "images", "vectors", "rgb", "lines", "docs"):
        probe, loaded = probe_data(str(data[name])), load_site_data(data[name])
        assert (probe.sample_shape, probe.count, probe.modality) == (loaded.input_shape, len(loaded), loaded.modality), name
    for length in (0, 12, 30):  # time series: data.kind timeseries, fitted to data.series_length (0: its own)
        options = SampleFormat(series_length=length)
        probe, loaded = probe_data(str(data["series"]), "timeseries", options), load_site_data(data["series"], "timeseries", options)
        assert (probe.sample_shape, probe.count, probe.modality) == (loaded.input_shape, len(loaded), loaded.modality)
        assert probe.sample_shape == (3, length or 20)
    for name in ("square", "rgb"):  # data.image_size: the shape the sites train on is the resized one
        resized = SampleFormat(image_size=[6, 4])
        probe, loaded = probe_data(str(data[name]), options=resized), load_site_data(data[name], options=resized)
        assert probe.sample_shape == loaded.input_shape == (loaded.input_shape[0], 6, 4), name
    # tables with categorical columns: each one-hot block adds its slots, whatever values the rows hold
    schema = load_config(BASE, ["data.categorical=[job]", "data.categories={home: [rent, owner]}"]).data
    with pytest.warns(UserWarning):  # 'missing' and 'other' cells are counted
        loaded = load_site_data(data["bank"], options=schema)
    probe = probe_data(str(data["bank"]), options=schema)
    assert probe.sample_shape == loaded.input_shape == (1 + 4 + 17,) and probe.count == len(loaded) == 40
    digits = probe_data("digits")
    loaded = load_site_data("digits")
    assert (digits.sample_shape, digits.count, digits.labelled) == (loaded.input_shape, len(loaded), True)
    # the labelled kinds: the ids a consent manifest lists are the loaders' ids
    for probe, loaded in ((digits, loaded), (probe_data(str(data["rgb"])), load_site_data(data["rgb"]))):
        assert [probe.sample_id(i) for i in range(len(loaded))] == list(loaded.sample_ids)


def test_idx_labels_are_labels_only_when_they_pair_with_the_images(data):
    skew = ["data.partition=dirichlet", "evaluation.enabled=true", "model.encoder=mlp", "pretext.name=byol"]
    fits = [o for o in FITS if not o.startswith(("data.partition", "evaluation.enabled"))] + skew
    assert _keys(data["rgb"], *fits) == ["data.partition", "evaluation.enabled"]  # no labels given
    assert _keys(data["rgb"], *fits[:-2], f"data.labels={data['rgb_labels']}") == []
    assert _keys(data["rgb"], *fits[:-2], f"data.labels={data['short_labels']}")[:1] == ["data.labels"]
    # a label file given as the images is named as such
    cfg = load_config(BASE, [f"data.source={data['rgb_labels']}", *FITS])
    (problem,) = preflight(cfg).problems
    assert problem.key == "data.source" and "a label file; set data.source to the images file" in problem.message


def test_check_imports_neither_torch_nor_flower_and_is_quick():
    # CPU seconds, not wall: a loaded CI machine stretches wall time several-fold (11 s seen at load 15),
    # while what this guards against (loading torch or Flower) costs CPU seconds on any machine.
    code = ("import sys, time; t = time.process_time(); from fedssl.cli import main; "
            f"code = main(['check', {str(DEMO)!r}]); seconds = time.process_time() - t; "
            "import json; print(json.dumps([code, seconds, sorted(m for m in ('torch', 'flwr', 'ray', 'opacus') if m in sys.modules)]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    code, seconds, heavy = json.loads(out.stdout.strip().splitlines()[-1])
    assert code == 0 and heavy == [], out.stderr
    assert seconds < 3  # well under 1 s of wall time on an idle machine (commit message)


def test_cli_exits_2_with_one_line_per_problem_and_no_traceback(data):
    started = time.perf_counter()
    out = subprocess.run([FEDSSL, "check", str(BASE), "--set", f"data.source={data['table']}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    keys = [line.removeprefix("fedssl: error: ").split(":")[0] for line in lines]
    assert keys == ["model.encoder", "pretext.name", "data.partition", "evaluation.enabled", "training.batch_size"]
    assert all(line.startswith("fedssl: error: ") for line in lines)
    assert time.perf_counter() - started < 30


def test_cli_says_what_it_checked_when_the_config_fits():
    out = subprocess.run([FEDSSL, "check", str(DEMO)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "1797 images shaped [1, 8, 8]; labels built in" in out.stdout


def test_the_torch_free_rules_match_the_registries():
    from opacus.accountants import RDPAccountant

    from fedssl.data.loaders import LOADERS
    from fedssl.data.probe import KINDS
    from fedssl.inputs import COUPLED_PRETEXTS, ENCODER_NAMES, PRETEXT_MODALITIES
    from fedssl.models import ENCODERS
    from fedssl.pretext import PRETEXT_TASKS
    from fedssl.privacy.feasibility import RDP_ORDERS

    assert set(ENCODER_NAMES) == set(ENCODERS)
    assert {name: task.modalities for name, task in PRETEXT_TASKS.items()} == PRETEXT_MODALITIES
    assert {name: task.coupling for name, task in PRETEXT_TASKS.items() if not task.dp_compatible} == COUPLED_PRETEXTS
    assert tuple(sorted(LOADERS)) == KINDS
    assert list(RDP_ORDERS) == RDPAccountant.DEFAULT_ALPHAS


def test_preflight_epsilon_is_the_sites_epsilon():
    from fedssl.privacy.analysis import epsilon_of
    from fedssl.privacy.feasibility import epsilon_at

    for sigma, q, steps in [(0.3, 0.01, 200), (0.8, 1 / 8, 200), (1.2, 0.5, 6), (2.0, 1.0, 1)]:
        assert epsilon_at(sigma, q, steps, 1e-5) == pytest.approx(epsilon_of([(sigma, q, steps)], 1e-5), rel=1e-12)


def test_simulate_stops_at_the_preflight_before_torch_flower_or_a_run_dir(data, tmp_path):
    """The new user's case: the demo config on a folder of their own images answers in one go, nothing started."""
    args = ["simulate", str(DEMO), "--set", f"data.source={data['square']}", "--set", f"run.output_dir={tmp_path}"]
    code = ("import sys, json; from fedssl.cli import main; code = main(" + repr(args) + "); "
            "print(json.dumps([code, sorted(m for m in ('torch', 'flwr', 'ray') if m in sys.modules)]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    code, heavy = json.loads(out.stdout.strip().splitlines()[-1])
    assert (code, heavy) == (2, []), out.stderr
    keys = [line.removeprefix("fedssl: error: ").split(":")[0] for line in out.stderr.strip().splitlines()]
    assert keys == ["data.partition", "evaluation.enabled", "training.batch_size"]
    assert not any(tmp_path.iterdir())  # no run directory, no Flower home
