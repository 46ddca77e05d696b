"""App pinning: a site runs a round only for an app bundle its operator approved.

The app hash is the hash of the app bundle (FAB) itself: every file in it counts, so a bundle
with one extra file (say a top-level ``opacus/`` package that would shadow the site's own) is a
different app. For a project directory it is the hash of the bundle `flwr run` builds from it
(Flower's own builder), so `fedssl site app-hash <dir>` and the bundle a coordinator ships agree.

The check runs in the fedssl site runner (runner.py) on the bundle's bytes, before anything is
unpacked or imported; the runner then executes the site's own installed ClientApp, never code
from the bundle. A check inside the bundle could not protect the site from the bundle.
"""

from __future__ import annotations

import hashlib
import io
import logging
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from fedssl.deploy.site.events import record_event
from fedssl.errors import ConfigError, PrivacyError

if TYPE_CHECKING:
    from fedssl.deploy.site.config import SiteConfig

log = logging.getLogger(__name__)

HASH_PREFIX = "sha256:"
APP_REFUSED = "app_refused"  # the site event a refusal records


class AppNotApprovedError(PrivacyError):
    """The app this site was asked to run is not in its allowlist."""


def is_app_hash(value: str) -> bool:
    """Whether ``value`` is written like a pinning hash: 'sha256:<64 hex digits>' (any case)."""
    digest = value.lower().removeprefix(HASH_PREFIX)
    return value.lower().startswith(HASH_PREFIX) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)


def _digest(entries: list[tuple[str, bytes]]) -> str:
    """SHA-256 over 'relative path NUL sha256(content) LF' lines, sorted by path."""
    outer = hashlib.sha256()
    for name, content in sorted(entries):
        outer.update(f"{name}\0{hashlib.sha256(content).hexdigest()}\n".encode())
    return HASH_PREFIX + outer.hexdigest()


def _bundle_files(fab: bytes) -> list[tuple[str, bytes]]:
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as bundle:
            return [(info.filename, bundle.read(info)) for info in bundle.infolist() if not info.is_dir()]
    except (zipfile.BadZipFile, ValueError, OSError) as err:
        raise ConfigError(f"app bundle: not a readable .fab (zip) file ({err})") from None


def bundle_hash(fab: bytes) -> str:
    """The pinning hash of an app bundle's bytes: every file in it, by name and content."""
    return _digest(_bundle_files(fab))


def app_hash(path: str | Path) -> str:
    """The pinning hash of an app: a .fab bundle, or the bundle `flwr run` would build from a project directory."""
    path = Path(path)
    if path.is_file():
        fab = path.read_bytes()
    elif path.is_dir():
        fab = _build_bundle(path)
    else:
        raise ConfigError(f"{path}: not an app directory or .fab file")
    try:
        files = _bundle_files(fab)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    if not any(name.startswith("fedssl/") for name, _ in files):
        raise ConfigError(f"{path}: no fedssl app inside (no fedssl/ package); pass the project directory or the .fab the coordinator sent")
    return _digest(files)


def _build_bundle(path: Path) -> bytes:
    """The bundle `flwr run <path>` ships: Flower's own builder, so the file selection cannot drift."""
    from fedssl.run.app_stage import build_app_bundle

    try:
        return build_app_bundle(path)
    except (ValueError, OSError) as err:
        raise ConfigError(f"{path}: cannot build its app bundle ({str(err).splitlines()[0]}); is pyproject.toml there?") from None


def check_bundle_approved(config: SiteConfig, fab: bytes, *, run_id: int) -> str:
    """Refuse (log one line, record a site event) unless the bundle's hash is in ``apps.allowed_hashes``.

    Runs on the bundle's bytes only: nothing from the bundle is unpacked or imported here.
    """
    try:
        digest = bundle_hash(fab)
    except ConfigError as err:
        digest, problem = "", str(err)
    else:
        if digest in config.apps.allowed_hashes:
            return digest
        problem = f"app hash {digest} is not in apps.allowed_hashes"
    reason = (
        f"app refused: run {run_id}: {problem} of site {config.site.name!r} "
        f"(approve it with `fedssl site app-hash <app.fab>` after review)"
    )
    log.error("%s", reason)
    record_event(config, APP_REFUSED, app_hash=digest, run_id=run_id, reason=reason)
    raise AppNotApprovedError(reason)
