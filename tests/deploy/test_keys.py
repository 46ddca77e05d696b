"""Deployment keys without Flower processes: the CA, the server's TLS certificate, each site's node keys, their
file modes and checks, and `fedssl keys` (tests/deploy/test_deploy.py has the rest of the building blocks)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from fedssl.cli import main as cli_main
from fedssl.deploy import pki
from fedssl.errors import ConfigError


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ca_server_cert_and_node_keys(tmp_path):
    ca = pki.init_ca(tmp_path / "ca")
    cert_path = pki.server_cert(tmp_path / "ca", ["127.0.0.1", "fl.example.org"], tmp_path / "srv")
    assert mode(tmp_path / "ca" / pki.CA_KEY) == 0o600 and mode(tmp_path / "srv" / pki.SERVER_KEY) == 0o600
    cert, ca_cert = pki.load_certificate(cert_path), pki.load_certificate(ca)
    assert pki.verify_signed_by(cert, ca_cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["fl.example.org"]
    assert pki.check_ca_certificate(ca).ok and pki.check_server_certificate(cert_path, ca).ok
    assert not pki.check_ca_certificate(cert_path).ok  # a leaf is not a CA

    other = pki.init_ca(tmp_path / "other")
    assert not pki.check_server_certificate(cert_path, other).ok

    private = pki.init_node_key(tmp_path / "keys", "site-a")
    public = pki.node_pub_path(tmp_path / "keys", "site-a")
    assert mode(private) == 0o600 and mode(public) == 0o644
    assert public.read_text().startswith("ecdsa-sha2-nistp256 ")
    assert isinstance(pki.load_node_private_key(private), ec.EllipticCurvePrivateKey)
    assert pki.load_node_public_key(public).public_numbers() == pki.load_node_private_key(private).public_key().public_numbers()


def test_keys_refuse_to_overwrite(tmp_path):
    pki.init_ca(tmp_path)
    with pytest.raises(ConfigError, match="already exists"):
        pki.init_ca(tmp_path)
    pki.init_node_key(tmp_path, "s")
    with pytest.raises(ConfigError, match="already exists"):
        pki.init_node_key(tmp_path, "s")


def test_expiring_certificate_is_flagged(tmp_path):
    pki.init_ca(tmp_path, days=3)
    check = pki.check_ca_certificate(tmp_path / pki.CA_CERT)
    assert not check.ok and "expires in" in check.detail


def test_cli_keys_commands(tmp_path, capsys):
    assert cli_main(["keys", "init-ca", "--out", str(tmp_path / "certs")]) == 0
    assert cli_main(["keys", "server-cert", "--ca", str(tmp_path / "certs"), "--host", "127.0.0.1", "--out", str(tmp_path / "certs")]) == 0
    assert cli_main(["keys", "init-site", "site-a", "--out", str(tmp_path / "keys")]) == 0
    names = sorted(p.name for p in (tmp_path / "keys").iterdir())
    assert names == ["site-a.ed25519", "site-a.ed25519.pub", "site-a.node", "site-a.node.pub"]
    assert mode(tmp_path / "keys" / "site-a.node") == 0o600 and mode(tmp_path / "keys" / "site-a.ed25519") == 0o600
    assert cli_main(["keys", "init-site", "site-a", "--out", str(tmp_path / "keys")]) == 2
    assert "already exists" in capsys.readouterr().err
