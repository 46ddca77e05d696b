"""The site agent: a site's own config (site.yaml), preflight, status, app pinning, and
the SuperNode launch for a real deployment.

Everything a site trains with comes from its operator's site.yaml — data location, state
dir, privacy budget, ledger key, device, the allowlist of approved app versions. The
SuperNode passes only the path of that file (``--node-config site-config=...``); the
coordinator's run config is ignored here, so the server can neither raise a site's budget
nor point it at another directory. The server's only input is the TrainPlan.

App pinning: before any training, the ClientApp hashes the code it is actually running
(the ``fedssl`` and ``clients`` packages it imported, plus the app's pyproject.toml) and
refuses unless that hash is in ``apps.allowed_hashes``; refusals go to the log and to
``<state_dir>/site_events.jsonl``. Flower 1.42 has no supported pre-launch hook for this
(``--trusted-entities`` needs a licensed SuperLink), so the check runs inside the app:
it stops an unapproved *fedssl* version (an upgrade the site did not review, edited code)
but not a FAB that is not fedssl at all — see docs/deployment.md.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import signal
import stat
import sys
import time
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


from fedssl.config import PrivacyConfig, check_device
from fedssl.typed_yaml import build_section, check, read_yaml_mapping, resolve_path, validate_sections
from fedssl.data.dataset import SiteDataset
from fedssl.errors import ConfigError, DataError, FedSSLError, PrivacyError
from fedssl.training.local import SiteSettings

log = logging.getLogger(__name__)

EVENTS_FILE = "site_events.jsonl"
SUPERNODE_LOG = "supernode.log"
SUPEREXEC_LOG = "superexec.log"
FLOWER_HOME = "flower"
HASH_PREFIX = "sha256:"
# What "the app" is for pinning: the code a site executes (every .py file of these packages)
# and which components pyproject.toml names.
APP_PACKAGES = ("fedssl", "clients")
APP_MANIFEST = "pyproject.toml"


class AppNotApprovedError(PrivacyError):
    """The app this site was asked to run is not in its allowlist."""


# ---------------------------------------------------------------------------- config


@dataclass
class SiteIdentity:
    name: str = ""
    id: int = -1

    def validate(self) -> None:
        from fedssl.privacy.keys import SITE_NAME

        check(bool(SITE_NAME.match(self.name)), "site.name", "must be 1-64 letters, digits, '.', '_' or '-'", self.name)
        check(self.id >= 0, "site.id", "must be an integer >= 0, unique in the federation (the coordinator reports sites by it)", self.id)


@dataclass
class SiteData:
    path: str = ""
    kind: str = "auto"

    def validate(self) -> None:
        from fedssl.data.loaders import LOADERS

        check(bool(self.path), "data.path", "must name the site's data (image folder, .npy, .npz or .csv)", self.path)
        check(self.kind == "auto" or self.kind in LOADERS, "data.kind", f"valid choices: auto, {', '.join(sorted(LOADERS))}", self.kind)


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
            check(_is_hash(value), f"apps.allowed_hashes[{i}]", "must be 'sha256:<64 hex digits>' as printed by `fedssl site app-hash`", value)


@dataclass
class SupernodeConfig:
    port: int = 0  # the SuperNode's local Runtime API port (127.0.0.1 only); 0 = any free port
    isolation: str = "process"
    connect_timeout: float = 60.0  # give up if the coordinator is unreachable this long
    rejoin_timeout: float = 180.0  # after a crash the coordinator needs up to ~60 s to release the node

    def validate(self) -> None:
        check(0 <= self.port <= 65535, "supernode.port", "must be a port number (0 = pick a free one)", self.port)
        check(self.isolation in ("process", "subprocess"), "supernode.isolation", "valid choices: process, subprocess", self.isolation)
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

    def settings(self) -> SiteSettings:
        return SiteSettings(
            site_id=self.site.id,
            state_dir=self.state_path,
            privacy=self.privacy,
            device=self.device,
            key_path=self.ledger_key_path,
        )


def load_site_config(path: str | Path) -> SiteConfig:
    """Read and validate site.yaml; relative paths are taken relative to the file."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"site config {path} does not exist; write one from configs/deploy/site.yaml")
    raw = read_yaml_mapping(path, "site, data, state_dir, privacy, coordinator, keys, apps")
    config: SiteConfig = build_section(SiteConfig, raw)
    config.validate()
    base = path.parent
    config.data.path = resolve_path(base, config.data.path)
    config.state_dir = resolve_path(base, config.state_dir)
    config.coordinator.root_certificates = resolve_path(base, config.coordinator.root_certificates)
    config.keys.node_key = resolve_path(base, config.keys.node_key)
    if config.keys.ledger_key:
        config.keys.ledger_key = resolve_path(base, config.keys.ledger_key)
    config.apps.allowed_hashes = [h.lower() for h in config.apps.allowed_hashes]
    return config


def _is_hash(value: str) -> bool:
    digest = value.lower().removeprefix(HASH_PREFIX)
    return value.lower().startswith(HASH_PREFIX) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)


# ---------------------------------------------------------------------------- the ClientApp entry


def deployed_site(path: str) -> tuple[SiteDataset, SiteSettings]:
    """What the ClientApp trains with in a deployment: data and settings from site.yaml only.

    Refuses (``AppNotApprovedError``, logged) before anything else when the running app is
    not in the site's allowlist. Config and data are cached per process and reloaded when
    the files change.
    """
    config = _cached_config(*_file_key(Path(path)))
    check_app_approved(config)
    data_key = _file_key(Path(config.data.path)) if Path(config.data.path).exists() else (config.data.path, 0, 0)
    dataset = _cached_dataset(*data_key, config.data.kind)
    return dataset, config.settings()


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
def _cached_dataset(path: str, mtime_ns: int, size: int, kind: str) -> SiteDataset:
    from fedssl.data.loaders import load_site_data

    return load_site_data(path, kind)


# ---------------------------------------------------------------------------- app pinning


def _app_files(root: Path) -> list[tuple[str, Path]]:
    files = []
    for package in APP_PACKAGES:
        pkg = root / package
        if pkg.is_dir():
            files += [(p.relative_to(root).as_posix(), p) for p in pkg.rglob("*.py") if "__pycache__" not in p.parts]
    return sorted(files)


def _components_entry(pyproject: bytes) -> tuple[str, bytes]:
    """Which ClientApp/ServerApp the app runs, canonicalised: `flwr build` rewrites the TOML's layout."""
    import tomllib

    try:
        data = tomllib.loads(pyproject.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{APP_MANIFEST}: not valid TOML ({err})") from None
    components = data.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
    return f"{APP_MANIFEST}#tool.flwr.app.components", json.dumps(components, sort_keys=True).encode()


def _digest(entries: list[tuple[str, bytes]]) -> str:
    """SHA-256 over 'relative path NUL sha256(content) LF' lines, sorted by path."""
    outer = hashlib.sha256()
    for name, content in sorted(entries):
        outer.update(f"{name}\0{hashlib.sha256(content).hexdigest()}\n".encode())
    return HASH_PREFIX + outer.hexdigest()


def app_hash(path: str | Path) -> str:
    """The pinning hash of an app: a project directory, an installed app dir, or a .fab bundle."""
    path = Path(path)
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as bundle:
            names = bundle.namelist()
            entries = [
                (name, bundle.read(name)) for name in names
                if name.split("/", 1)[0] in APP_PACKAGES and name.endswith(".py") and "__pycache__" not in name
            ]
            if APP_MANIFEST in names:
                entries.append(_components_entry(bundle.read(APP_MANIFEST)))
        if not any(name.startswith("fedssl/") for name, _ in entries):
            raise ConfigError(f"{path}: no fedssl app inside (no fedssl/ package)")
        return _digest(entries)
    if not path.is_dir():
        raise ConfigError(f"{path}: not an app directory or .fab file")
    files = _app_files(path)
    if not any(name.startswith("fedssl/") for name, _ in files):
        raise ConfigError(f"{path}: no fedssl package inside; pass the project directory or the .fab the coordinator sent")
    entries = [(name, p.read_bytes()) for name, p in files]
    if (path / APP_MANIFEST).is_file():
        entries.append(_components_entry((path / APP_MANIFEST).read_bytes()))
    return _digest(entries)


def running_app_root() -> Path:
    """The directory the running fedssl (and ClientApp) code was imported from."""
    import fedssl

    root = Path(fedssl.__file__).resolve().parent.parent
    clients = sys.modules.get("clients")
    clients_file = getattr(clients, "__file__", None)
    if clients_file and Path(clients_file).resolve().parent.parent != root:
        raise AppNotApprovedError(
            f"app refused: the ClientApp code ({Path(clients_file).parent}) and fedssl ({root}) come from different trees; "
            "cannot pin what is running"
        )
    return root


@functools.lru_cache(maxsize=4)
def _hash_of_root(root: str) -> str:
    return app_hash(root)


def check_app_approved(config: SiteConfig) -> str:
    """Refuse (and log) unless the code running this ClientApp is in ``apps.allowed_hashes``."""
    root = running_app_root()
    running = _hash_of_root(str(root))
    if running in config.apps.allowed_hashes:
        return running
    reason = (
        f"app refused: running app hash {running} is not in apps.allowed_hashes of site {config.site.name!r} "
        f"(approve it with `fedssl site app-hash <app.fab>` after review)"
    )
    log.error("%s (app dir %s)", reason, root)
    record_event(config, "app_refused", app_hash=running, app_dir=str(root), reason=reason)
    raise AppNotApprovedError(reason)


def record_event(config: SiteConfig, kind: str, **fields: Any) -> None:
    """Append one line to the site's own event log (refusals, starts, rejoins)."""
    state = config.state_path
    state.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "kind": kind, **fields})
    with open(state / EVENTS_FILE, "a") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_events(config: SiteConfig) -> list[dict[str, Any]]:
    path = config.state_path / EVENTS_FILE
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


# ---------------------------------------------------------------------------- budget / status


@dataclass(frozen=True)
class BudgetView:
    enabled: bool
    target_epsilon: float
    delta: float
    spent: float
    steps: int
    rounds: int
    next_round_epsilon: float | None  # ε after one more round like the last one; None before the first

    @property
    def left(self) -> float:
        return max(0.0, self.target_epsilon - self.spent)

    @property
    def exhausted(self) -> bool:
        from fedssl.privacy.budget import EPSILON_SLACK

        if not self.enabled or self.next_round_epsilon is None:
            return False
        return self.next_round_epsilon > self.target_epsilon * (1 + EPSILON_SLACK)


def budget_view(config: SiteConfig) -> BudgetView:
    """The site's budget from its own state (read-only; never writes the ledger)."""
    from fedssl.privacy.accountant import load_accountant

    from fedssl.privacy.analysis import epsilon_of

    p = config.privacy
    state = load_accountant(config.state_path) if config.state_path.exists() else None
    if state is not None:
        history, delta, accountant = list(state.history), state.mechanism.delta, state.mechanism.accountant
    else:
        # No accountant file: the signed write-ahead ledger still says what was spent (the
        # next training round rebuilds the file from it); never report 0 while it holds events.
        from fedssl.privacy.ledger import Ledger

        events = [r["body"] for r in Ledger(config.state_path).records() if r["kind"] == "dp_event"]
        if not events:
            return BudgetView(p.enabled, p.target_epsilon, p.delta, 0.0, 0, 0, None)
        history = [(float(b["noise_multiplier"]), float(b["sample_rate"]), int(b["steps"])) for b in events]
        delta, accountant = float(events[0]["delta"]), str(events[0]["accountant"])
    spent = epsilon_of(history, delta, accountant)
    nxt = epsilon_of([*history, history[-1]], delta, accountant) if history else None
    # The site's own target decides (site.yaml), even if the state was created with another.
    return BudgetView(p.enabled, p.target_epsilon, delta, spent, sum(n for _, _, n in history), len(history), nxt)


def ledger_rounds(config: SiteConfig, last: int = 5) -> tuple[list[dict[str, Any]], str]:
    """The last DP rounds and refusals from the site's ledger, plus its verification status."""
    from fedssl.privacy.keys import load_signing_key
    from fedssl.privacy.ledger import LEDGER_FILE, Ledger

    if not (config.state_path / LEDGER_FILE).exists():
        return [], "no ledger yet (the site has not trained)"
    ledger = Ledger(config.state_path)
    trusted = load_signing_key(config.ledger_key_path).public_key() if config.ledger_key_path and config.ledger_key_path.exists() else None
    report = ledger.verify(trusted_public_key=trusted)
    verdict = "verified" + (" against the site's key" if trusted else " (trust on first use)") if report.ok else (
        f"PROBLEM: {report.problems[0]} ({len(report.problems)} problem(s)); run `fedssl audit {config.state_dir}`"
    )
    records = [r for r in report.records if r["kind"] in ("dp_event", "refusal")]
    return records[-last:], verdict


def status_text(config: SiteConfig, last: int = 5) -> str:
    budget = budget_view(config)
    lines = [f"site {config.site.name} (id {config.site.id}), state {config.state_dir}"]
    if budget.enabled:
        state = "SPENT (the next round would exceed the target)" if budget.exhausted else "available"
        lines.append(
            f"privacy budget: eps spent {budget.spent:.3f} of {budget.target_epsilon:g} (delta {budget.delta:g}), "
            f"left {budget.left:.3f}; {budget.rounds} DP round(s), {budget.steps} steps; {state}"
        )
        if budget.next_round_epsilon is not None:
            lines.append(f"  one more round like the last would bring eps to {budget.next_round_epsilon:.3f}")
    else:
        lines.append("privacy: DISABLED in site.yaml (no differential privacy)")
    records, verdict = ledger_rounds(config, last)
    lines.append(f"ledger: {verdict}")
    for r in records:
        b = r["body"]
        if r["kind"] == "dp_event":
            lines.append(f"  {r['time'][:19]}  run {b['run_id']} round {b['round']}: {b['steps']} steps, eps after {b['epsilon_after']:.3f}")
        else:
            lines.append(f"  {r['time'][:19]}  run {b['run_id']} round {b['round']}: REFUSED ({b['reason']})")
    refusals = [e for e in read_events(config) if e.get("kind") == "app_refused"]
    if refusals:
        e = refusals[-1]
        lines.append(f"app pinning: {len(refusals)} refusal(s); last {e['time']}: {e['app_hash']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- preflight


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    blocking: bool = True


def egress_description() -> str:
    from fedssl.fl import keys

    return (
        f"encoder weights only (record {keys.ARRAYS!r}: exactly the encoder's parameter names and shapes) and the scalar "
        f"metrics {', '.join(sorted(keys.ALLOWED_METRICS))} (record {keys.METRICS!r}). Never raw data, labels, sample ids, "
        "pretext heads or per-sample values (enforced by the egress guard)"
    )


def preflight(config: SiteConfig, *, check_coordinator: bool = True) -> list[Check]:
    """Everything that must hold before this site joins a federation."""
    from fedssl.deploy import pki
    from fedssl.deploy.processes import tls_probe

    checks: list[Check] = []
    # data
    try:
        from fedssl.data.loaders import load_site_data

        dataset = load_site_data(config.data.path, config.data.kind)
        checks.append(Check("data", True, f"{config.data.path}: {len(dataset)} samples, {dataset.modality}, shape {list(dataset.input_shape)}"))
    except (DataError, ConfigError, ValueError) as err:
        checks.append(Check("data", False, f"data.path: {err}"))
    checks.append(Check("leaves the site", True, egress_description(), blocking=False))
    checks.append(_check_state_dir(config.state_path))
    checks.append(_check_budget(config))
    checks.append(_check_ledger_key(config))
    checks.append(_check_node_key(Path(config.keys.node_key)))
    ca = Path(config.coordinator.root_certificates)
    ca_check = pki.check_ca_certificate(ca)
    checks.append(Check("CA certificate", ca_check.ok, ca_check.detail))
    if config.apps.allowed_hashes:
        checks.append(Check("approved apps", True, f"{len(config.apps.allowed_hashes)} hash(es): " + ", ".join(h[:19] + "…" for h in config.apps.allowed_hashes)))
    else:
        checks.append(Check("approved apps", False, "apps.allowed_hashes is empty: every app would be refused; add the hash from `fedssl site app-hash <app.fab>`"))
    if check_coordinator:
        if ca_check.ok:
            ok, detail, days = tls_probe(config.coordinator.address, ca)
            if ok and days is not None and days < pki.EXPIRY_WARNING_DAYS:
                ok, detail = False, f"{config.coordinator.address}: the coordinator's certificate expires in {days:.1f} days; ask it to renew"
            elif ok and days is not None:
                detail += f"; its certificate is valid {days:.0f} more days"
            checks.append(Check("coordinator", ok, detail))
        else:
            checks.append(Check("coordinator", False, "skipped: the CA certificate is not usable"))
    return checks


def _check_state_dir(state: Path) -> Check:
    try:
        state.mkdir(parents=True, exist_ok=True)
        probe = state / f".preflight-{os.getpid()}"
        with open(probe, "wb") as handle:
            handle.write(b"ok")
            handle.flush()
            os.fsync(handle.fileno())
        probe.unlink()
    except OSError as err:
        return Check("state dir", False, f"state_dir {state}: not writable ({err.strerror})")
    return Check("state dir", True, f"{state}: writable")


def _check_budget(config: SiteConfig) -> Check:
    if not config.privacy.enabled:
        return Check("privacy budget", True, "privacy.enabled is false: this site trains WITHOUT differential privacy", blocking=False)
    try:
        b = budget_view(config)
    except (PrivacyError, ValueError) as err:
        return Check("privacy budget", False, str(err))
    if b.exhausted:
        return Check(
            "privacy budget", False,
            f"spent: eps {b.spent:.3f} of {b.target_epsilon:g}; one more round would reach {b.next_round_epsilon:.3f}. "
            "The site refuses to train; raising privacy.target_epsilon is the operator's decision alone",
        )
    return Check("privacy budget", True, f"eps spent {b.spent:.3f} of {b.target_epsilon:g} (delta {b.delta:g}), {b.left:.3f} left")


def _check_ledger_key(config: SiteConfig) -> Check:
    from fedssl.privacy.keys import load_signing_key

    path = config.ledger_key_path
    if path is None:
        return Check("ledger key", True, "keys.ledger_key not set: the ledger key is kept in state_dir (set it to a separate path)", blocking=False)
    try:
        load_signing_key(path)
    except ConfigError as err:
        return Check("ledger key", False, f"keys.ledger_key: {err}")
    return _private_file_check("ledger key", path)


def _check_node_key(path: Path) -> Check:
    from fedssl.deploy.pki import load_node_private_key

    try:
        load_node_private_key(path)
    except ConfigError as err:
        return Check("node key", False, f"keys.node_key: {err}")
    return _private_file_check("node key", path)


def _private_file_check(name: str, path: Path) -> Check:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        return Check(name, False, f"{path}: readable by others (mode {mode:o}); chmod 600 {path}")
    return Check(name, True, f"{path}: ok, mode {mode:o}")


def format_checklist(checks: list[Check]) -> str:
    lines = []
    for c in checks:
        mark = "[ok]  " if c.ok else ("[FAIL]" if c.blocking else "[warn]")
        lines.append(f"  {mark} {c.name}: {c.detail}")
    return "\n".join(lines)


def preflight_passed(checks: list[Check]) -> bool:
    return all(c.ok or not c.blocking for c in checks)


# ---------------------------------------------------------------------------- SuperNode


class SiteStartError(FedSSLError):
    """The site could not join the federation."""


# Flower's SuperNode log: the node joined / the SuperLink refused to activate it. The
# SuperLink gives the same answer (code 2004) for an unregistered key and for a key whose
# previous session it still holds (a crash: it releases the node only after missing two
# 30 s heartbeats), so the agent tells them apart from its own record of the last session.
_JOINED = "SuperNode ID:"
_ACTIVATION_FAILED = "Failed to activate SuperNode"
_LIFECYCLE = ("supernode_joined", "supernode_stop", "supernode_exit")


def previous_session_unclean(config: SiteConfig) -> bool:
    """True when this site's last SuperNode joined and never stopped cleanly (a crash)."""
    lifecycle = [e["kind"] for e in read_events(config) if e.get("kind") in _LIFECYCLE]
    return bool(lifecycle) and lifecycle[-1] == "supernode_joined"


def supernode_commands(config: SiteConfig, config_path: Path, runtime_port: int) -> tuple[list[str], list[str] | None]:
    from fedssl.run.flower_runtime import flower_bin

    node_config = f"site-config='{config_path}'"
    supernode = [
        flower_bin("flower-supernode"),
        "--superlink", config.coordinator.address,
        "--root-certificates", config.coordinator.root_certificates,
        "--auth-supernode-private-key", config.keys.node_key,
        "--isolation", config.supernode.isolation,
        "--host", "127.0.0.1", "--port", str(runtime_port),
        "--max-wait-time", str(config.supernode.connect_timeout),
        "--node-config", node_config,
    ]
    if config.supernode.isolation != "process":
        return supernode, None
    superexec = [flower_bin("flower-superexec"), "--insecure", "--runtime-api-address", f"127.0.0.1:{runtime_port}"]
    return supernode, superexec


def start_site(config_path: str | Path, *, echo=print) -> int:
    """Preflight, then run the SuperNode (and its SuperExec) until stopped; rejoin after a crash.

    Returns the exit code. Blocks; SIGTERM/SIGINT stop the SuperNode cleanly.
    """
    from fedssl.deploy.processes import ManagedProcess
    from fedssl.run.flower_runtime import flower_env, free_port

    config_path = Path(config_path).expanduser().resolve()
    config = load_site_config(config_path)
    echo(f"fedssl: site {config.site.name} preflight")
    checks = preflight(config)
    echo(format_checklist(checks))
    if not preflight_passed(checks):
        failed = [c.name for c in checks if not c.ok and c.blocking]
        raise SiteStartError(f"preflight failed ({', '.join(failed)}); the site did not start")
    state = config.state_path
    env = flower_env(state / FLOWER_HOME)
    (state / FLOWER_HOME).mkdir(parents=True, exist_ok=True)
    stopping = {"now": False}
    rejoining = previous_session_unclean(config)
    if rejoining:
        echo("fedssl: the last session of this site ended without a clean stop (crash?); rejoining")

    def _stop(signum, frame):
        stopping["now"] = True

    previous = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}
    deadline_rejoin = None
    try:
        while True:
            port = config.supernode.port or free_port()
            supernode_cmd, superexec_cmd = supernode_commands(config, config_path, port)
            log_start = _log_size(state / SUPERNODE_LOG)
            node = ManagedProcess("SuperNode", supernode_cmd, state / SUPERNODE_LOG, env, new_group=False)
            execu = None
            record_event(config, "supernode_start", pid=node.pid, coordinator=config.coordinator.address)
            echo(f"fedssl: SuperNode started (pid {node.pid}), connecting to {config.coordinator.address}; log {state / SUPERNODE_LOG}")
            try:
                if superexec_cmd is not None:
                    execu = ManagedProcess("SuperExec", [*superexec_cmd, "--parent-pid", str(node.pid)], state / SUPEREXEC_LOG, env,
                                           new_group=False)
                code, reason = _watch(node, log_start, stopping, echo, lambda: record_event(config, "supernode_joined", pid=node.pid))
            finally:
                node.stop()
                if execu is not None:
                    execu.stop()
            if stopping["now"]:
                record_event(config, "supernode_stop", reason="operator")
                echo("fedssl: site stopped")
                return 0
            if reason == "activation_failed" and rejoining:
                deadline_rejoin = deadline_rejoin or time.monotonic() + config.supernode.rejoin_timeout
                if time.monotonic() < deadline_rejoin:
                    echo("fedssl: the coordinator still holds this site's previous session; it releases it within ~60 s. Retrying in 5 s")
                    _sleep_unless(5, stopping)
                    continue
                record_event(config, "supernode_exit", reason="rejoin timed out")
                raise SiteStartError(f"the coordinator kept this site's previous session for {config.supernode.rejoin_timeout:.0f} s; try again later")
            record_event(config, "supernode_exit", code=code, reason=reason)
            if reason == "activation_failed":
                raise SiteStartError(
                    f"the coordinator refused this site's node key: {config.keys.node_key}.pub is not registered there "
                    "(send it to the coordinator), or a SuperNode with this key is already connected"
                )
            raise SiteStartError(f"SuperNode exited (code {code}): {reason}; see {state / SUPERNODE_LOG}")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _sleep_unless(seconds: float, stopping: dict) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end and not stopping["now"]:
        time.sleep(0.2)


def _watch(node, log_start: int, stopping: dict, echo, on_joined) -> tuple[int | None, str]:
    """Follow the SuperNode's log until it exits or we are asked to stop."""
    from fedssl.run.flower_runtime import failure_reason as last_error

    seen, joined = log_start, False
    while not stopping["now"]:
        data = _read_from(node.log_path, seen)
        seen += len(data.encode())
        for line in data.splitlines():
            if _JOINED in line and not joined:
                joined = True
                on_joined()
            message = _progress(line)
            if message:
                echo(message)
        if not node.alive():
            tail = _read_from(node.log_path, log_start)
            if joined:
                return node.proc.returncode, f"disconnected after joining ({last_error(tail)})"
            if _ACTIVATION_FAILED in tail:
                return node.proc.returncode, "activation_failed"
            return node.proc.returncode, last_error(tail)
        time.sleep(0.3)
    return None, "stopped"


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def _progress(line: str) -> str | None:
    if "SuperNode ID:" in line:
        return "fedssl: joined the federation (" + line.split("SuperNode ID:", 1)[1].strip() + " is this site's node id)"
    if "Receiving:" in line:
        return "fedssl: received a training request"
    if "Sent successfully" in line:
        return "fedssl: reply sent (encoder weights + whitelisted metrics)"
    return None
