"""Certificates and node keys for a deployment, made with ``cryptography``.

Files (all private keys mode 0600, written via a private temp file and never replaced
silently):

- ``fedssl keys init-ca --out DIR``: ``ca.key`` + ``ca.crt`` (self-signed, ECDSA P-256).
  ``ca.crt`` goes to every site; ``ca.key`` stays with whoever issues certificates.
- ``fedssl keys server-cert --ca DIR --host H [--host H2] --out DIR``: ``server.key`` +
  ``server.pem`` signed by the CA, with every host as a SAN (IP or DNS name), and always
  127.0.0.1: the coordinator reaches its loopback-only SuperLink there over TLS.
- ``fedssl keys init-site NAME --out DIR`` writes, besides the Ed25519 ledger key,
  ``NAME.node`` (ECDSA P-256 private key, OpenSSH format) and ``NAME.node.pub`` (one line
  ``ecdsa-sha2-nistp256 AAAA... fedssl-node:NAME``): the form ``flower-supernode
  --auth-supernode-private-key`` and ``flwr supernode register`` expect. The site sends
  the ``.pub`` to the coordinator, who lists it in server.yaml.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedssl.errors import ConfigError
from fedssl.privacy.keys import write_key_file

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
SERVER_KEY = "server.key"
SERVER_CERT = "server.pem"
NODE_SUFFIX = ".node"
NODE_PUB_SUFFIX = ".node.pub"
CA_DAYS = 3650
SERVER_DAYS = 825
EXPIRY_WARNING_DAYS = 14
LOOPBACK = "127.0.0.1"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


# ---------------------------------------------------------------------------- CA


def init_ca(out_dir: Path, *, name: str = "fedssl federation CA", days: int = CA_DAYS, overwrite: bool = False) -> Path:
    """Create ``ca.key`` (0600) and ``ca.crt``; return the certificate's path."""
    out_dir = Path(out_dir)
    for existing in (out_dir / CA_KEY, out_dir / CA_CERT):
        if existing.exists() and not overwrite:
            raise ConfigError(f"{existing} already exists: a new CA would invalidate every certificate it signed; pass --overwrite to replace it")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_key_file(out_dir / CA_KEY, _key_pem(key), mode=0o600, overwrite=overwrite)
    write_key_file(out_dir / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), mode=0o644, overwrite=overwrite)
    return out_dir / CA_CERT


def _load_ca(ca_dir: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    ca_dir = Path(ca_dir)
    try:
        key = serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate((ca_dir / CA_CERT).read_bytes())
    except FileNotFoundError as err:
        raise ConfigError(f"{err.filename}: CA file missing; create the CA with `fedssl keys init-ca --out {ca_dir}`") from None
    except (ValueError, UnsupportedAlgorithm) as err:
        raise ConfigError(f"{ca_dir}: cannot read the CA key/certificate ({err})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{ca_dir / CA_KEY}: expected an ECDSA key, found {type(key).__name__}")
    return key, cert


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def server_cert(ca_dir: Path, hosts: list[str], out_dir: Path, *, days: int = SERVER_DAYS, overwrite: bool = False) -> Path:
    """Issue the SuperLink's TLS certificate (``server.pem`` + ``server.key``) for ``hosts``."""
    if not hosts:
        raise ConfigError("--host: give at least one address the sites will connect to (an IP or DNS name)")
    # The coordinator reaches its own SuperLink (bound to loopback only) over TLS at 127.0.0.1.
    hosts = list(dict.fromkeys([*hosts, LOOPBACK]))
    ca_key, ca_cert = _load_ca(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    out_dir = Path(out_dir)
    write_key_file(out_dir / SERVER_KEY, _key_pem(key), mode=0o600, overwrite=overwrite)
    write_key_file(out_dir / SERVER_CERT, cert.public_bytes(serialization.Encoding.PEM), mode=0o644, overwrite=overwrite)
    return out_dir / SERVER_CERT


# ---------------------------------------------------------------------------- node keys


def node_key_path(key_dir: Path, site_name: str) -> Path:
    return Path(key_dir) / f"{site_name}{NODE_SUFFIX}"


def node_pub_path(key_dir: Path, site_name: str) -> Path:
    return Path(key_dir) / f"{site_name}{NODE_PUB_SUFFIX}"


def init_node_key(key_dir: Path, site_name: str, *, overwrite: bool = False) -> Path:
    """ECDSA P-256 key pair for SuperNode authentication, OpenSSH format; return the private path."""
    private_path, public_path = node_key_path(key_dir, site_name), node_pub_path(key_dir, site_name)
    if not overwrite and (private_path.exists() or public_path.exists()):
        raise ConfigError(f"{private_path}: a node key for site {site_name!r} already exists; keep it, or pass --overwrite to replace it")
    key = ec.generate_private_key(ec.SECP256R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    write_key_file(private_path, private, mode=0o600, overwrite=overwrite)
    write_key_file(public_path, public + f" fedssl-node:{site_name}\n".encode(), mode=0o644, overwrite=overwrite)
    return private_path


def load_node_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    path = Path(path)
    try:
        key = serialization.load_ssh_public_key(path.read_bytes().strip())
    except FileNotFoundError:
        raise ConfigError(f"{path}: node public key not found; the site creates it with `fedssl keys init-site NAME`") from None
    except (ValueError, UnsupportedAlgorithm) as err:
        raise ConfigError(f"{path}: not an OpenSSH public key ({err})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ConfigError(f"{path}: node keys must be ECDSA (ecdsa-sha2-nistp256), found {type(key).__name__}")
    return key


def load_node_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    path = Path(path)
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise ConfigError(f"{path}: node private key not found; create it with `fedssl keys init-site NAME`") from None
    except (ValueError, UnsupportedAlgorithm) as err:
        raise ConfigError(f"{path}: not an unencrypted OpenSSH private key ({err})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path}: node keys must be ECDSA, found {type(key).__name__}")
    return key


# ---------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class CertCheck:
    ok: bool
    detail: str
    days_left: float = 0.0


def load_certificate(path: Path) -> x509.Certificate:
    path = Path(path)
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"{path}: certificate not found") from None
    except ValueError as err:
        raise ConfigError(f"{path}: not a PEM certificate ({err})") from None


def check_ca_certificate(path: Path, *, warn_days: int = EXPIRY_WARNING_DAYS) -> CertCheck:
    """A CA certificate: parseable, a CA, currently valid and not expiring within ``warn_days``."""
    try:
        cert = load_certificate(path)
    except ConfigError as err:
        return CertCheck(False, str(err))
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        return CertCheck(False, f"{path}: not a CA certificate (BasicConstraints ca=false); use the federation's ca.crt")
    return _validity(cert, path, warn_days)


def _validity(cert: x509.Certificate, path: Path, warn_days: int) -> CertCheck:
    now = _now()
    if now < cert.not_valid_before_utc:
        return CertCheck(False, f"{path}: not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; check the clock")
    days_left = (cert.not_valid_after_utc - now).total_seconds() / 86400
    if days_left <= 0:
        return CertCheck(False, f"{path}: expired on {cert.not_valid_after_utc:%Y-%m-%d}; ask the coordinator for a new one", days_left)
    if days_left < warn_days:
        return CertCheck(False, f"{path}: expires in {days_left:.1f} days (< {warn_days}); renew it before joining", days_left)
    return CertCheck(True, f"{path.name}: valid for {days_left:.0f} more days", days_left)


def check_server_certificate(cert_path: Path, ca_path: Path, *, warn_days: int = EXPIRY_WARNING_DAYS) -> CertCheck:
    """The SuperLink's certificate: valid, not expiring soon, and signed by the CA."""
    try:
        cert, ca = load_certificate(cert_path), load_certificate(ca_path)
    except ConfigError as err:
        return CertCheck(False, str(err))
    if not verify_signed_by(cert, ca):
        return CertCheck(False, f"{cert_path}: not signed by {ca_path}; issue it with `fedssl keys server-cert --ca <dir of {ca_path.name}>`")
    return _validity(cert, Path(cert_path), warn_days)


def covers_ip(cert_path: Path, ip: str) -> bool:
    """Whether the certificate's SAN lists ``ip`` (what TLS hostname checking against an IP requires)."""
    cert = load_certificate(cert_path)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return ipaddress.ip_address(ip) in san.get_values_for_type(x509.IPAddress)


def verify_signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
