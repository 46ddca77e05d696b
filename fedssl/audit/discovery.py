"""What `fedssl audit` audits, and against which keys: site state dirs and a run's server ledger,
registered public keys, and how the server's site numbers match the sites' names."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedssl.errors import ConfigError
from fedssl.layout import SERVER_LEDGER_FILE, SITES_DIR, RunDir
from fedssl.privacy.keys import PUBLIC_SUFFIX, load_verify_key
from fedssl.privacy.ledger import LEDGER_FILE


class AuditUsageError(ConfigError):
    """Bad command-line input: exit code 2, one line, no traceback."""



def discover(path: Path) -> tuple[list[Path], Path | None]:
    """Site state dirs to audit and the run's server ledger (None for a single site)."""
    if path.is_file() and path.name == LEDGER_FILE:
        return [path.parent], None
    if not path.is_dir():
        raise AuditUsageError(f"{path}: no such directory (give a site state dir or a run dir)")
    if (path / LEDGER_FILE).exists():
        return [path], None
    sites = sorted(p.parent for p in path.glob(f"{SITES_DIR}/*/{LEDGER_FILE}"))
    server = RunDir(path).server_ledger
    if not sites and not server.exists():
        raise AuditUsageError(f"{path}: no {LEDGER_FILE} here nor under {SITES_DIR}/*/, and no {SERVER_LEDGER_FILE}; nothing to audit")
    return sites, server if server.exists() else None


def load_trusted_keys(key_dir: Path) -> dict[str, Ed25519PublicKey]:
    """``<name>.ed25519.pub`` files → {name: key}."""
    if not key_dir.is_dir():
        raise AuditUsageError(f"--trusted-keys {key_dir}: not a directory")
    return {p.name[: -len(PUBLIC_SUFFIX)]: load_verify_key(p) for p in sorted(key_dir.glob(f"*{PUBLIC_SUFFIX}"))}


_SITE_NUMBER = re.compile(r"^(?:site-?)?0*(\d+)$")


def same_site(a: object, b: object) -> bool:
    """Server reports name a site by number (0), state dirs and ledgers by name ("site-000")."""
    if str(a) == str(b):
        return True
    ma, mb = _SITE_NUMBER.match(str(a)), _SITE_NUMBER.match(str(b))
    return bool(ma and mb and int(ma.group(1)) == int(mb.group(1)))


def trusted_key_for(names: Sequence[str], trusted: Mapping[str, Ed25519PublicKey]) -> Ed25519PublicKey | None:
    return next((trusted[n] for n in names if n in trusted), None)
