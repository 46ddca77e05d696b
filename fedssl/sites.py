"""Which site is this process? Resolve data and settings from Flower's node/run config.

Simulation: the node config carries ``partition-id`` and the run config the resolved
experiment (``config-path``) and ``run-dir``. Deployment: the node config carries
``site-config``, the operator's own site.yaml — the server cannot point it elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedssl.data.dataset import SiteDataset
from fedssl.errors import ConfigError
from fedssl.training.local import SiteSettings

RUN_CONFIG_PATH = "config-path"
RUN_DIR = "run-dir"
NODE_PARTITION_ID = "partition-id"
NODE_SITE_CONFIG = "site-config"


def resolve_site(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> tuple[SiteDataset, SiteSettings]:
    if NODE_SITE_CONFIG in node_config:
        from fedssl.site_agent import deployed_site

        return deployed_site(str(node_config[NODE_SITE_CONFIG]))
    if NODE_PARTITION_ID in node_config:
        from fedssl.experiment import simulated_site

        config_path, run_dir = run_config.get(RUN_CONFIG_PATH), run_config.get(RUN_DIR)
        if not config_path or not run_dir:
            raise ConfigError("run config: config-path and run-dir must be set; start simulations with `fedssl simulate`")
        return simulated_site(str(config_path), str(run_dir), int(node_config[NODE_PARTITION_ID]))
    raise ConfigError(f"node config: set {NODE_SITE_CONFIG}=<path to site.yaml> (deployment) or run under the simulation engine")
