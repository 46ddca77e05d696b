"""App pinning: a site trains only with app versions its operator approved.

Before any training, the ClientApp hashes the code it is actually running (the ``fedssl``
and ``clients`` packages it imported, plus the app's pyproject.toml) and refuses unless
that hash is in ``apps.allowed_hashes``; refusals go to the log and to
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
import sys
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from fedssl.deploy.site.events import record_event
from fedssl.errors import ConfigError, PrivacyError

if TYPE_CHECKING:
    from fedssl.deploy.site.config import SiteConfig

log = logging.getLogger(__name__)

HASH_PREFIX = "sha256:"
# What "the app" is for pinning: the code a site executes (every .py file of these packages)
# and which components pyproject.toml names.
APP_PACKAGES = ("fedssl", "clients")
APP_MANIFEST = "pyproject.toml"
APP_REFUSED = "app_refused"  # the site event a refusal records


class AppNotApprovedError(PrivacyError):
    """The app this site was asked to run is not in its allowlist."""


def is_app_hash(value: str) -> bool:
    """Whether ``value`` is written like a pinning hash: 'sha256:<64 hex digits>' (any case)."""
    digest = value.lower().removeprefix(HASH_PREFIX)
    return value.lower().startswith(HASH_PREFIX) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)


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
    record_event(config, APP_REFUSED, app_hash=running, app_dir=str(root), reason=reason)
    raise AppNotApprovedError(reason)
