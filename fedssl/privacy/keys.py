"""Ed25519 keys that sign a site's privacy ledger.

`fedssl keys init-site` writes ``<dir>/<site>.ed25519`` (PKCS#8 PEM, mode 0600) and
``<dir>/<site>.ed25519.pub`` (SubjectPublicKeyInfo PEM). The public half is what a site
registers with whoever will audit it (`fedssl audit --trusted-keys DIR`): a ledger
rewritten end to end with another key then fails verification.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedssl.errors import ConfigError

PRIVATE_SUFFIX = ".ed25519"
PUBLIC_SUFFIX = ".ed25519.pub"
# A site name becomes a file name: keep it to characters that cannot escape key_dir.
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def private_key_path(key_dir: Path, site_name: str) -> Path:
    return Path(key_dir) / f"{site_name}{PRIVATE_SUFFIX}"


def public_key_path(key_dir: Path, site_name: str) -> Path:
    return Path(key_dir) / f"{site_name}{PUBLIC_SUFFIX}"


def init_site_key(key_dir: Path, site_name: str, *, overwrite: bool = False) -> Path:
    """Create a site's signing key pair; return the private key's path.

    Refuses to replace an existing key unless ``overwrite``: a new key orphans the
    ledger signed with the old one (its auditor would see a foreign signer).
    """
    if not SITE_NAME.match(site_name):
        raise ConfigError(f"site name {site_name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    key_dir = Path(key_dir)
    key_dir.mkdir(parents=True, exist_ok=True)
    private_path, public_path = private_key_path(key_dir, site_name), public_key_path(key_dir, site_name)
    if not overwrite and (private_path.exists() or public_path.exists()):
        raise ConfigError(f"{private_path}: a key for site {site_name!r} already exists; keep it, or pass --overwrite to replace it")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    write_key_file(private_path, private_pem, mode=0o600, overwrite=overwrite)
    write_key_file(public_path, public_pem, mode=0o644, overwrite=overwrite)
    return private_path


def write_key_file(path: Path, data: bytes, *, mode: int, overwrite: bool = False) -> None:
    """Write a key or certificate with exactly ``mode``, durably, refusing to replace one unless ``overwrite``.

    Written via a temp file created with that mode, so a private key is never readable by others, even briefly."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} already exists; keep it, or pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode is masked by umask; the key must be exactly 0600
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    path = Path(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no signing key; create one with `fedssl keys init-site`") from None
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise ConfigError(f"{path}: not an unencrypted PEM private key ({err})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: expected an Ed25519 key, found {type(key).__name__}")
    return key


def load_verify_key(path: Path) -> Ed25519PublicKey:
    """A public key from a PEM file or a file holding the base64 of the 32 raw bytes."""
    path = Path(path)
    try:
        data = path.read_bytes().strip()
    except FileNotFoundError:
        raise ConfigError(f"{path}: public key file not found") from None
    try:
        if data.startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
            if not isinstance(key, Ed25519PublicKey):
                raise ConfigError(f"{path}: expected an Ed25519 public key, found {type(key).__name__}")
            return key
        return public_key_from_b64(data.decode("ascii"))
    except (ValueError, UnsupportedAlgorithm) as err:
        raise ConfigError(f"{path}: not an Ed25519 public key ({err})") from None


def public_key_raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_b64(key: Ed25519PublicKey) -> str:
    return base64.b64encode(public_key_raw(key)).decode("ascii")


def public_key_from_b64(text: str) -> Ed25519PublicKey:
    raw = base64.b64decode(text, validate=True)
    return Ed25519PublicKey.from_public_bytes(raw)


def public_key_fingerprint(key: Ed25519PublicKey) -> str:
    """First 16 hex digits of SHA-256 over the raw key: short enough to read aloud, 64 bits to collide."""
    return hashlib.sha256(public_key_raw(key)).hexdigest()[:16]
