"""A site's own config (site.yaml), and the ClientApp's entry in a deployment.

Everything a site trains with comes from its operator's site.yaml — data location, state
dir, privacy budget, ledger key, device, the allowlist of approved app versions. The
SuperNode passes only the path of that file (``--node-config site-config=...``); the
coordinator's run config is ignored here, so the server can neither raise a site's budget
nor point it at another directory. The server's only input is the TrainPlan.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from fedssl.config import PrivacyConfig, check_device
from fedssl.data.dataset import SiteDataset
from fedssl.deploy.site.pinning import is_app_hash
from fedssl.errors import ConfigError
from fedssl.sample_format import SampleFormat
from fedssl.training.local import SiteSettings
from fedssl.typed_yaml import check, load_config_file, resolve_path, validate_sections


@dataclass
class SiteIdentity:
    name: str = ""
    id: int = -1

    def validate(self) -> None:
        from fedssl.privacy.keys import SITE_NAME

        check(bool(SITE_NAME.match(self.name)), "site.name", "must be 1-64 letters, digits, '.', '_' or '-'", self.name)
        check(self.id >= 0, "site.id", "must be an integer >= 0, unique in the federation (the coordinator reports sites by it)", self.id)


@dataclass
class SiteData(SampleFormat):
    """Where the site's data is; how its samples are read (image_size, max_length, categorical, categories,
    hash_buckets, series_length) is the experiment's own ``data:`` type, so a site reads as a simulation does.
    They must give the experiment's model.input_shape; the categorical schema is the one every site shares."""

    path: str = ""
    kind: str = "auto"

    def validate(self) -> None:
        from fedssl.data.loaders import LOADERS

        super().validate()
        check(bool(self.path), "data.path", "must name the site's data (image folder, .npy, .npz, .csv or IDX)", self.path)
        check(self.kind == "auto" or self.kind in LOADERS, "data.kind", f"valid choices: auto, {', '.join(sorted(LOADERS))}", self.kind)
        self.check_kind(self.kind)


@dataclass
class CoordinatorConfig:
    address: str = ""
    root_certificates: str = ""

    def validate(self) -> None:
        host, _, port = self.address.rpartition(":")
        check(bool(host) and port.isdigit(), "coordinator.address", "must be host:port of the SuperLink, e.g. fl.example.org:9092", self.address)
        check(bool(self.root_certificates), "coordinator.root_certificates", "must be the federation's ca.crt (TLS is required)", self.root_certificates)


@dataclass
class SiteKeys:
    node_key: str = ""
    ledger_key: str = ""

    def validate(self) -> None:
        check(bool(self.node_key), "keys.node_key", "must be the site's node key (NAME.node from `fedssl keys init-site NAME`)", self.node_key)


@dataclass
class AppsConfig:
    allowed_hashes: list[str] = field(default_factory=list)

    def validate(self) -> None:
        for i, value in enumerate(self.allowed_hashes):
            check(is_app_hash(value), f"apps.allowed_hashes[{i}]", "must be 'sha256:<64 hex digits>' as printed by `fedssl site app-hash`", value)


@dataclass
class SupernodeConfig:
    port: int = 0  # the SuperNode's local Runtime API port (127.0.0.1 only); 0 = any free port
    # Always "process": the SuperNode holds each task for the fedssl site runner (runner.py), which
    # checks the app bundle and runs the site's own ClientApp. "subprocess" would let Flower
    # install and run the coordinator's bundle itself.
    isolation: str = "process"
    connect_timeout: float = 60.0  # give up if the coordinator is unreachable this long
    rejoin_timeout: float = 180.0  # after a crash the coordinator needs up to ~60 s to release the node

    def validate(self) -> None:
        check(0 <= self.port <= 65535, "supernode.port", "must be a port number (0 = pick a free one)", self.port)
        check(self.isolation == "process", "supernode.isolation",
              "valid choices: process (the fedssl site runner executes the site's own app)", self.isolation)
        check(self.connect_timeout > 0, "supernode.connect_timeout", "must be > 0 seconds", self.connect_timeout)
        check(self.rejoin_timeout >= 0, "supernode.rejoin_timeout", "must be >= 0 seconds", self.rejoin_timeout)


@dataclass
class SiteConfig:
    site: SiteIdentity = field(default_factory=SiteIdentity)
    data: SiteData = field(default_factory=SiteData)
    state_dir: str = ""
    # The same validated section as an experiment's `privacy:` (one definition, so the
    # site's rules cannot drift from the simulation's, e.g. on which accountants are sound).
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)
    keys: SiteKeys = field(default_factory=SiteKeys)
    apps: AppsConfig = field(default_factory=AppsConfig)
    device: str = "cpu"
    supernode: SupernodeConfig = field(default_factory=SupernodeConfig)

    def validate(self) -> None:
        validate_sections(self)
        check(bool(self.state_dir), "state_dir", "must be a directory for the site's ledger and privacy state", self.state_dir)
        check_device("device", self.device)

    # Paths, resolved against the directory of site.yaml by load_site_config.
    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)

    @property
    def ledger_key_path(self) -> Path | None:
        return Path(self.keys.ledger_key) if self.keys.ledger_key else None

    @property
    def highwater_path(self) -> Path | None:
        """``<ledger key>.highwater``: outside the state dir, so losing or rolling back that is caught."""
        from fedssl.privacy.highwater import highwater_path

        return highwater_path(self.ledger_key_path) if self.ledger_key_path else None

    def settings(self) -> SiteSettings:
        return SiteSettings(
            site_id=self.site.id,
            state_dir=self.state_path,
            privacy=self.privacy,
            device=self.device,
            key_path=self.ledger_key_path,
            highwater_path=self.highwater_path,
        )


def load_site_config(path: str | Path) -> SiteConfig:
    """Read and validate site.yaml; relative paths are taken relative to the file."""
    config, base = load_config_file(SiteConfig, path, what="site config", example="configs/deploy/site.yaml",
                                    sections="site, data, state_dir, privacy, coordinator, keys, apps")
    config.data.path = resolve_path(base, config.data.path)
    config.state_dir = resolve_path(base, config.state_dir)
    config.coordinator.root_certificates = resolve_path(base, config.coordinator.root_certificates)
    config.keys.node_key = resolve_path(base, config.keys.node_key)
    if config.keys.ledger_key:
        config.keys.ledger_key = resolve_path(base, config.keys.ledger_key)
    config.apps.allowed_hashes = [h.lower() for h in config.apps.allowed_hashes]
    return config



def deployed_site(path: str) -> tuple[SiteDataset, SiteSettings]:
    """What the ClientApp trains with in a deployment: data and settings from site.yaml only.

    Which app may run was decided before this, by the site runner on the bundle's bytes
    (pinning.py, runner.py). Config and data are cached per process and reloaded when the
    files change.
    """
    config = current_site_config(path)
    data_key = _file_key(Path(config.data.path)) if Path(config.data.path).exists() else (config.data.path, 0, 0)
    dataset = _cached_dataset(*data_key, config.data.kind, config.data.sample_format)
    return dataset, config.settings()


def current_site_config(path: str | Path) -> SiteConfig:
    """site.yaml as it is on disk now (cached while the file is unchanged)."""
    return _cached_config(*_file_key(Path(path)))


def _file_key(path: Path) -> tuple[str, int, int]:
    path = path.expanduser().resolve()
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"node config site-config: {path} does not exist; restart the site with `fedssl site start --config <site.yaml>`") from None
    return str(path), st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=4)
def _cached_config(path: str, mtime_ns: int, size: int) -> SiteConfig:
    return load_site_config(path)


@functools.lru_cache(maxsize=2)
def _cached_dataset(path: str, mtime_ns: int, size: int, kind: str, options: SampleFormat | None = None) -> SiteDataset:
    from fedssl.data.loaders import load_site_data

    return load_site_data(path, kind, options)
