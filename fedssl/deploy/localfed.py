"""A complete deployment laid out in one directory on 127.0.0.1, for tests and benchmarks.

``make_local_federation(root, ["site-a", "site-b"])`` writes what a real deployment has —
CA and SuperLink certificate, per-site key pairs, per-site data files (disjoint digits
partitions as .npy), one site.yaml per site and the coordinator's server.yaml — by the
same functions the `fedssl keys` commands use. Nothing is started.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from fedssl.deploy import pki
from fedssl.privacy.keys import init_site_key, private_key_path
from fedssl.run.flower_runtime import PROJECT_ROOT, free_port


@dataclass
class LocalFederation:
    root: Path
    port: int
    server_yaml: Path
    site_yamls: dict[str, Path] = field(default_factory=dict)

    def site_dir(self, name: str) -> Path:
        return self.root / name


def make_local_federation(
    root: Path,
    sites: list[str],
    *,
    registered: list[str] | None = None,
    rounds: int = 2,
    local_steps: int = 3,
    target_epsilon: float = 8.0,
    allowed_hashes: list[str] | None = None,
    experiment_overrides: list[str] | None = None,
    samples_per_site: int = 300,
) -> LocalFederation:
    """Lay out a federation: ``sites`` get keys/data/site.yaml; ``registered`` (default: all) go in server.yaml."""
    from fedssl.data.loaders import load_digits_labeled
    from fedssl.deploy.site.pinning import app_hash

    root = Path(root)
    certs = root / "coordinator" / "certs"
    pki.init_ca(certs)
    pki.server_cert(certs, ["127.0.0.1", "localhost"], certs)
    digits, _ = load_digits_labeled()
    hashes = allowed_hashes if allowed_hashes is not None else [app_hash(PROJECT_ROOT)]
    fed = LocalFederation(root=root, port=free_port(), server_yaml=root / "coordinator" / "server.yaml")
    for index, name in enumerate(sites):
        rows = digits.inputs[index * samples_per_site : (index + 1) * samples_per_site].numpy()
        fed.site_yamls[name] = _write_site(fed, name, index, rows, certs / pki.CA_CERT, target_epsilon, hashes)
    listed = sites if registered is None else registered
    overrides = [f"federation.rounds={rounds}", f"training.local_steps={local_steps}", *(experiment_overrides or [])]
    _write_server(fed, listed, overrides)
    return fed


def _write_site(fed: LocalFederation, name: str, index: int, rows: np.ndarray, ca_cert: Path, target_epsilon: float,
                hashes: list[str]) -> Path:
    """One site's keys, data file and site.yaml, as `fedssl keys init-site` and an operator would make them."""
    site_dir = fed.site_dir(name)
    keys = site_dir / "keys"
    init_site_key(keys, name)
    pki.init_node_key(keys, name)
    (site_dir / "data").mkdir(parents=True)
    np.save(site_dir / "data" / f"{name}.npy", rows)
    site = {
        "site": {"name": name, "id": index},
        "data": {"path": f"data/{name}.npy"},
        "state_dir": "state",
        # The test plans are a few steps long, which calibrates σ below the default floor of 0.8.
        "privacy": {"enabled": True, "target_epsilon": target_epsilon, "delta": 1e-5, "max_grad_norm": 1.0, "min_noise_multiplier": 0.3},
        "coordinator": {"address": f"127.0.0.1:{fed.port}", "root_certificates": str(ca_cert)},
        "keys": {"node_key": f"keys/{name}{pki.NODE_SUFFIX}", "ledger_key": str(private_key_path(keys, name).relative_to(site_dir))},
        "apps": {"allowed_hashes": list(hashes)},
        "device": "cpu",
        "supernode": {"port": 0, "isolation": "process", "connect_timeout": 30, "rejoin_timeout": 180},
    }
    path = site_dir / "site.yaml"
    path.write_text(yaml.safe_dump(site, sort_keys=False))
    return path


def _write_server(fed: LocalFederation, listed: list[str], overrides: list[str]) -> None:
    """The coordinator's server.yaml, registering the ``listed`` sites' node keys."""
    root = fed.root
    server = {
        "experiment": str(PROJECT_ROOT / "configs" / "deploy" / "experiment.yaml"),
        "set": [
            f"run.name=deploy-{root.name}", f"run.output_dir={root / 'runs'}",
            f"federation.num_sites={len(listed)}", f"federation.min_sites={min(2, len(listed))}",
            "federation.round_timeout=90", *overrides,
        ],
        "listen": {"host": "127.0.0.1", "port": fed.port, "superlink_port": free_port()},
        "tls": {"ca_cert": "certs/ca.crt", "server_cert": "certs/server.pem", "server_key": "certs/server.key"},
        "sites": [{"name": n, "public_key": str(root / n / "keys" / f"{n}{pki.NODE_PUB_SUFFIX}")} for n in listed],
        "state_dir": "state",
        "evaluate": False,
        "run_timeout": 900,
    }
    fed.server_yaml.write_text(yaml.safe_dump(server, sort_keys=False))
