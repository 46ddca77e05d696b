"""A deployed site's site.yaml as an operator writes it, for tests that need one on disk.

The ledger key is made here (the site's own, under keys/); data, certificates and the node key are
the caller's, and relative paths resolve against ``root`` as in a real deployment.
"""

from __future__ import annotations

from pathlib import Path

import yaml


def write_site_yaml(root: Path, *, target_epsilon: float, site_id: int = 0, data_path: str = "data.npy",
                    root_certificates: str = "ca.crt", allowed_hashes: list[str] | None = None,
                    data_kind: str = "auto") -> Path:
    from fedssl.privacy.keys import init_site_key

    init_site_key(root / "keys", "site-a")
    config = {
        "site": {"name": "site-a", "id": site_id},
        "data": {"path": data_path, "kind": data_kind},
        "state_dir": "state",
        "privacy": {"enabled": True, "target_epsilon": target_epsilon, "delta": 1e-5},
        "coordinator": {"address": "127.0.0.1:1", "root_certificates": root_certificates},
        "keys": {"node_key": "keys/site-a.node", "ledger_key": "keys/site-a.ed25519"},
    }
    if allowed_hashes is not None:
        config["apps"] = {"allowed_hashes": allowed_hashes}
    (root / "site.yaml").write_text(yaml.safe_dump(config))
    return root / "site.yaml"
