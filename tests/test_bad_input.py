"""Bad input, table-driven: every case runs the real `fedssl` command line (in process, stderr captured) and
must end with exit code 2, exactly ONE line on stderr (never a traceback) naming the field or file, and no
data, key, certificate or state file changed. docs/bad-input.md lists the cases and their counts.

Config cases go through `fedssl check` (the preflight), data cases through `fedssl check` (what a header
probe can see) or `fedssl site preflight --offline` (which loads the site's data in full), keys, certificates
and a site's privacy state through `fedssl site preflight --offline` / `fedssl site status`, and a
coordinator's certificates through `fedssl server start`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from fedssl.cli import main

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "experiments" / "digits-tiny.yaml"
# Settings under which a small file fits: no labels needed, a few sites, a batch any site accepts.
FITS = ["data.partition=iid", "evaluation.enabled=false", "federation.num_sites=2", "training.batch_size=2", "privacy.enabled=false",
        "model.input_shape=[]"]
VECTORS = [*FITS, "model.encoder=mlp", "pretext.name=byol"]


# --------------------------------------------------------------------------- the cases

@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[Path], list[str]]  # writes the bad input under the given dir; returns the command's arguments
    names: tuple[str, ...]  # what the one line must name (field or file)


def _sets(*overrides: str) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


def _config(tmp: Path, body: dict | str) -> Path:
    path = tmp / "experiment.yaml"
    path.write_text(body if isinstance(body, str) else yaml.safe_dump({"include": [str(TINY)], **body}))
    return path


def config_case(id: str, body: dict | str, *names: str) -> Case:
    return Case(id, lambda tmp: ["check", str(_config(tmp, body))], names)


def check_case(id: str, *overrides: str, names: tuple[str, ...]) -> Case:
    return Case(id, lambda tmp: ["check", str(TINY), *_sets(*overrides)], names)


CONFIG_CASES = [
    config_case("unknown-section", {"trainer": {"lr": 0.1}}, "trainer"),
    config_case("unknown-key", {"training": {"learning_rate": 0.1}}, "training.learning_rate"),
    config_case("wrong-type-int", {"federation": {"rounds": "ten"}}, "federation.rounds"),
    config_case("wrong-type-list", {"evaluation": {"label_fractions": 0.1}}, "evaluation.label_fractions"),
    config_case("wrong-type-bool", {"privacy": {"enabled": "maybe"}}, "privacy.enabled"),
    config_case("zero-rounds", {"federation": {"rounds": 0}}, "federation.rounds"),
    config_case("negative-sites", {"federation": {"num_sites": -1}}, "federation.num_sites"),
    config_case("zero-batch", {"training": {"batch_size": 0}}, "training.batch_size"),
    config_case("negative-lr", {"training": {"lr": -0.1}}, "training.lr"),
    config_case("negative-parallel-sites", {"simulation": {"max_parallel_sites": -1}}, "simulation.max_parallel_sites"),
    config_case("fractional-ray-cpus", {"simulation": {"max_parallel_sites": 1, "client_cpus": 0.5}},
                "simulation.max_parallel_sites"),
    config_case("epsilon-zero", {"privacy": {"target_epsilon": 0}}, "privacy.target_epsilon"),
    config_case("epsilon-negative", {"privacy": {"target_epsilon": -1.0}}, "privacy.target_epsilon"),
    config_case("delta-one", {"privacy": {"delta": 1.0}}, "privacy.delta"),
    config_case("delta-above-1-over-n", {"privacy": {"delta": 0.01}}, "privacy.delta"),
    config_case("clip-norm-zero", {"privacy": {"max_grad_norm": 0}}, "privacy.max_grad_norm"),
    config_case("steps-above-policy", {"training": {"local_steps": 5000}}, "training.local_steps"),
    config_case("rounds-above-policy", {"federation": {"rounds": 500}}, "federation.rounds"),
    config_case("budget-too-big-for-steps", {"privacy": {"target_epsilon": 500.0, "min_noise_multiplier": 0.8}},
                "privacy.min_noise_multiplier"),
    config_case("test-fraction-above-1", {"data": {"test_fraction": 1.5}}, "data.test_fraction"),
    config_case("unknown-pretext", {"pretext": {"name": "colorize"}}, "pretext.name"),
    config_case("unknown-encoder", {"model": {"encoder": "vgg"}}, "model.encoder"),
    config_case("readout-grid-too-fine", {"model": {"readout": 16}}, "model.readout"),
    config_case("unknown-partition", {"data": {"partition": "random"}}, "data.partition"),
    config_case("unknown-device", {"run": {"device": "tpu"}}, "run.device"),
    config_case("unknown-score-on", {"evaluation": {"score_on": "holdout"}}, "evaluation.score_on"),
    config_case("validation-too-small", {"evaluation": {"score_on": "validation", "validation_fraction": 0.01}},
                "evaluation.validation_fraction"),
    config_case("yaml-syntax", "run: {name: [unclosed\n", "experiment.yaml"),
    config_case("missing-include", {"include": ["nowhere.yaml"]}, "nowhere.yaml"),
    Case("missing-config", lambda tmp: ["check", str(tmp / "absent.yaml")], ("absent.yaml",)),
    check_case("override-unknown-key", "federation.sites=3", names=("federation.sites",)),
    check_case("override-without-equals", "federation.rounds", names=("federation.rounds",)),
]


def _pngs(folder: Path, sizes: list[tuple[int, int]]) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (height, width) in enumerate(sizes):
        Image.fromarray((rng.random((height, width)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    return folder


def data_case(id: str, write: Callable[[Path], Path], *names: str, vectors: bool = False, load: bool = False) -> Case:
    """``load``: a problem in the values or in a file past the first, which `fedssl check --load` reads."""

    def make(tmp: Path) -> list[str]:
        return ["check", str(TINY), *(["--load"] if load else []), *_sets(f"data.source={write(tmp)}", *(VECTORS if vectors else FITS))]

    return Case(id, make, names)


def _write(name: str, content: bytes | str) -> Callable[[Path], Path]:
    def write(tmp: Path) -> Path:
        path = tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    return write


def _npy(name: str, array: np.ndarray) -> Callable[[Path], Path]:
    def write(tmp: Path) -> Path:
        np.save(tmp / name, array)
        return tmp / name

    return write


def _folder(files: dict[str, bytes], sizes: list[tuple[int, int]] = ()) -> Callable[[Path], Path]:
    def write(tmp: Path) -> Path:
        folder = _pngs(tmp / "images", list(sizes))
        for name, content in files.items():
            (folder / name).write_bytes(content)
        return folder

    return write


def _truncated_png(tmp: Path) -> Path:
    folder = _pngs(tmp / "images", [(8, 8)] * 6)
    whole = (folder / "5.png").read_bytes()
    (folder / "5.png").write_bytes(whole[: len(whole) // 2])
    return folder


CSV_HEADER = "id,a,b,c\n"
DATA_CASES = [
    data_case("missing-source", lambda tmp: tmp / "nowhere.npy", "nowhere.npy"),
    data_case("empty-dir", lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "empty"),
    data_case("zero-byte-npy", _write("empty.npy", b""), "empty.npy"),
    data_case("zero-byte-csv", _write("empty.csv", b""), "empty.csv", vectors=True),
    data_case("header-only-csv", _write("header.csv", CSV_HEADER), "header.csv", vectors=True),
    data_case("not-npy", _write("fake.npy", b"this is not numpy"), "fake.npy"),
    data_case("unknown-extension", _write("data.bin", b"\x00" * 64), "data.bin"),
    data_case("wrong-dims-npy", _npy("flat.npy", np.zeros(40, dtype=np.float32)), "flat.npy"),
    data_case("five-dims-npy", _npy("deep.npy", np.zeros((4, 2, 2, 2, 2), dtype=np.float32)), "deep.npy"),
    data_case("ragged-csv", _write("ragged.csv", CSV_HEADER + "".join(f"r{i},1,2,3\n" for i in range(8)) + "r8,1,2\n"),
              "ragged.csv", vectors=True, load=True),
    data_case("text-in-numeric-csv", _write("text.csv", CSV_HEADER + "".join(f"r{i},1,two,3\n" for i in range(8))),
              "text.csv", vectors=True),
    data_case("nan-column-csv", _write("nan.csv", CSV_HEADER + "".join(f"r{i},1,nan,3\n" for i in range(8))),
              "nan.csv", vectors=True, load=True),
    data_case("corrupt-image", _folder({"9.png": b"\x89PNG\r\n\x1a\n garbage"}, [(8, 8)] * 4), "9.png", load=True),
    data_case("truncated-image", _truncated_png, "5.png", load=True),
    data_case("nan-in-npy", _npy("nan.npy", np.full((20, 6), np.nan, dtype=np.float32)), "nan.npy", vectors=True, load=True),
]


# --------------------------------------------------------------------------- a deployed site, valid, then broken once

def _expired_ca(path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "expired CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=30))
            .not_valid_after(now - dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _site(tmp: Path) -> Path:
    """A site that passes `fedssl site preflight --offline`: data, CA, node and ledger keys, an approved app."""
    from fedssl.deploy import pki
    from site_layout import write_site_yaml

    np.save(tmp / "data.npy", np.random.default_rng(0).random((40, 1, 8, 8)).astype(np.float32))
    pki.init_ca(tmp / "ca")
    pki.init_node_key(tmp / "keys", "site-a")
    return write_site_yaml(tmp, target_epsilon=8.0, root_certificates="ca/ca.crt", allowed_hashes=["sha256:" + "0" * 64])


def _edit_site(tmp: Path, section: str, key: str, value) -> Path:
    path = tmp / "site.yaml"
    config = yaml.safe_load(path.read_text())
    config[section][key] = value
    path.write_text(yaml.safe_dump(config))
    return path


def site_case(id: str, breaks: Callable[[Path], None], *names: str, command: str = "preflight") -> Case:
    def make(tmp: Path) -> list[str]:
        _site(tmp)
        breaks(tmp)
        return ["site", command, "--config", str(tmp / "site.yaml"), *(["--offline"] if command == "preflight" else [])]

    return Case(id, make, names)


def _server_cert_from_other_ca(tmp: Path) -> None:
    from fedssl.deploy import pki

    pki.init_ca(tmp / "other-ca")
    pki.server_cert(tmp / "other-ca", ["127.0.0.1"], tmp / "server")
    _edit_site(tmp, "coordinator", "root_certificates", str(tmp / "server" / "server.pem"))


KEY_CASES = [
    site_case("node-key-missing", lambda tmp: (tmp / "keys" / "site-a.node").unlink(), "keys.node_key"),
    site_case("node-key-readable-by-others", lambda tmp: (tmp / "keys" / "site-a.node").chmod(0o644), "site-a.node", "chmod 600"),
    site_case("node-key-garbage", lambda tmp: (tmp / "keys" / "site-a.node").write_text("not a key"), "keys.node_key"),
    site_case("ledger-key-missing", lambda tmp: (tmp / "keys" / "site-a.ed25519").unlink(), "keys.ledger_key"),
    site_case("ledger-key-readable-by-others", lambda tmp: (tmp / "keys" / "site-a.ed25519").chmod(0o640), "site-a.ed25519",
              "chmod 600"),
    site_case("ca-missing", lambda tmp: (tmp / "ca" / "ca.crt").unlink(), "ca.crt"),
    site_case("ca-not-pem", lambda tmp: (tmp / "ca" / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\nxx\n"), "ca.crt"),
    site_case("ca-expired", lambda tmp: _expired_ca(tmp / "ca" / "ca.crt"), "ca.crt", "expired"),
    site_case("ca-expiring-soon", lambda tmp: __import__("fedssl.deploy.pki", fromlist=["init_ca"]).init_ca(
        tmp / "ca", days=5, overwrite=True), "ca.crt", "expires"),
    site_case("wrong-ca-not-a-ca", _server_cert_from_other_ca, "server.pem", "not a CA"),
    site_case("no-approved-apps", lambda tmp: _edit_site(tmp, "apps", "allowed_hashes", []), "apps.allowed_hashes"),
    site_case("site-yaml-unknown-key", lambda tmp: _edit_site(tmp, "privacy", "epsilon", 8.0), "privacy.epsilon"),
    site_case("site-data-missing", lambda tmp: (tmp / "data.npy").unlink(), "data.npy"),
]


def server_case(id: str, breaks: Callable[[Path], None], *names: str) -> Case:
    """`fedssl server start` on a laid-out local federation with one credential broken: refused before
    the run dir, the warm start or any Flower process exists."""

    def make(tmp: Path) -> list[str]:
        from fedssl.deploy.localfed import make_local_federation

        fed = make_local_federation(tmp, sites=["site-a", "site-b"], allowed_hashes=["sha256:" + "0" * 64])
        breaks(fed.root / "coordinator" / "certs")
        return ["server", "start", "--config", str(fed.server_yaml)]

    return Case(id, make, names)


def _reissue(certs: Path, ca_dir: Path, **options) -> None:
    from fedssl.deploy import pki

    pki.server_cert(ca_dir, ["127.0.0.1", "localhost"], certs, overwrite=True, **options)


def _from_other_ca(certs: Path) -> None:
    from fedssl.deploy import pki

    pki.init_ca(certs.parent / "other-ca")
    _reissue(certs, certs.parent / "other-ca")


SERVER_CASES = [
    server_case("server-cert-wrong-ca", _from_other_ca, "tls.server_cert", "not signed by"),
    server_case("server-cert-expiring", lambda certs: _reissue(certs, certs, days=3), "tls.server_cert", "expires"),
    server_case("site-public-key-missing", lambda certs: (certs.parents[1] / "site-b" / "keys" / "site-b.node.pub").unlink(),
                "sites[site-b].public_key"),
]


# --------------------------------------------------------------------------- a site's privacy state, corrupted

def _trained_site(tmp: Path, trained: Path) -> None:
    """The site above holding a real trained state dir (2 DP rounds), sealed: it passes the preflight."""
    _site(tmp)
    shutil.copytree(trained, tmp / "state")
    shutil.copy(trained / "site.ed25519", tmp / "keys" / "site-a.ed25519")
    shutil.copy(trained / "site.ed25519.pub", tmp / "keys" / "site-a.ed25519.pub")
    assert main(["site", "seal", "--config", str(tmp / "site.yaml")]) == 0


def _truncate(name: str, keep: float = 0.5) -> Callable[[Path], None]:
    def breaks(tmp: Path) -> None:
        path = tmp / "state" / name
        content = path.read_bytes()
        path.write_bytes(content[: int(len(content) * keep)])

    return breaks


def _flip_in_ledger(tmp: Path) -> None:
    path = tmp / "state" / "ledger.jsonl"
    text = path.read_text()
    assert '"round":1' in text
    path.write_text(text.replace('"round":1', '"round":7', 1))


@dataclass(frozen=True)
class StateCase:
    id: str
    breaks: Callable[[Path], None]
    names: tuple[str, ...]
    command: str = "preflight"


STATE_CASES = [
    StateCase("accountant-truncated", _truncate("accountant.json"), ("accountant.json",)),
    StateCase("accountant-not-json", lambda tmp: (tmp / "state" / "accountant.json").write_text("{]"), ("accountant.json",)),
    StateCase("accountant-empty", lambda tmp: (tmp / "state" / "accountant.json").write_bytes(b""), ("accountant.json",)),
    StateCase("ledger-truncated", _truncate("ledger.jsonl", 0.6), ("ledger",)),
    StateCase("ledger-edited", _flip_in_ledger, ("ledger",)),
    StateCase("ledger-head-corrupt", lambda tmp: (tmp / "state" / "ledger.head").write_text("garbage"), ("ledger",)),
    StateCase("accountant-truncated-status", _truncate("accountant.json"), ("accountant.json",), command="status"),
]


# --------------------------------------------------------------------------- the checks every case must pass

def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() + oct(p.stat().st_mode)
            for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line_refusal(tmp: Path, capsys, argv: list[str], names: tuple[str, ...]) -> None:
    capsys.readouterr()
    before = _snapshot(tmp)
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, f"exit {code}; stderr: {err}"
    assert "Traceback" not in err
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{err}"
    assert lines[0].startswith("fedssl: error: "), lines[0]
    for name in names:
        assert name in lines[0], f"{name!r} not named in: {lines[0]}"
    assert _snapshot(tmp) == before, "a file was written or changed"


@pytest.mark.parametrize("case", CONFIG_CASES + DATA_CASES + KEY_CASES + SERVER_CASES, ids=lambda c: c.id)
def test_bad_input_is_one_line(case: Case, tmp_path, capsys):
    argv = case.make(tmp_path)
    _one_line_refusal(tmp_path, capsys, argv, case.names)


@pytest.mark.parametrize("case", STATE_CASES, ids=lambda c: c.id)
def test_corrupt_privacy_state_is_one_line_and_kept(case: StateCase, trained_site, tmp_path, capsys):
    _trained_site(tmp_path, trained_site.after_round2)
    case.breaks(tmp_path)
    extra = ["--offline"] if case.command == "preflight" else []
    _one_line_refusal(tmp_path, capsys, ["site", case.command, "--config", str(tmp_path / "site.yaml"), *extra], case.names)


def test_the_valid_inputs_pass(trained_site, tmp_path, capsys):
    """The baselines the cases break: a tiny config, a small CSV and a trained, sealed site all pass."""
    assert main(["check", str(TINY)]) == 0
    csv = tmp_path / "ok.csv"
    csv.write_text(CSV_HEADER + "".join(f"r{i},1,2,3\n" for i in range(8)))
    assert main(["check", str(TINY), *_sets(f"data.source={csv}", *VECTORS)]) == 0
    site = tmp_path / "site"
    site.mkdir()
    _trained_site(site, trained_site.after_round2)
    assert main(["site", "preflight", "--config", str(site / "site.yaml"), "--offline"]) == 0, capsys.readouterr()


def test_at_least_forty_cases():
    assert len(CONFIG_CASES + DATA_CASES + KEY_CASES + SERVER_CASES + STATE_CASES) >= 40
