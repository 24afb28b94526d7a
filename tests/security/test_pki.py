"""PKI: certificates that verify, keys readable by their owner only, expiry reported, CRL."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from millstream_cloud.security.pki import PKI, PKIError


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    p = PKI(tmp_path / "pki")
    p.init()
    return p


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_creates_ca_with_private_key_mode_0600(pki: PKI) -> None:
    ca = load(pki.ca_cert_path)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert mode(pki.ca_key_path) == 0o600
    assert mode(pki.dir) == 0o700
    assert pki.crl_path.exists()
    with pytest.raises(PKIError, match="already exists"):
        pki.init()


def test_server_cert_has_sans_and_verifies_against_the_ca(pki: PKI) -> None:
    cert_path, key_path = pki.server_cert(["mosquitto", "broker.example"], ["127.0.0.1", "::1"])
    cert = load(cert_path)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mosquitto", "broker.example"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    cert.verify_directly_issued_by(load(pki.ca_cert_path))
    assert mode(key_path) == 0o600


def test_device_cert_cn_is_the_device_id(pki: PKI) -> None:
    cert_path, key_path = pki.device_cert("press-01")
    cert = load(cert_path)
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "press-01"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    cert.verify_directly_issued_by(load(pki.ca_cert_path))
    assert mode(key_path) == 0o600


@pytest.mark.parametrize("bad", ["", "../etc/passwd", "a b", "x" * 65, "-lead"])
def test_names_are_checked(pki: PKI, bad: str) -> None:
    with pytest.raises(PKIError, match="invalid name"):
        pki.device_cert(bad)


def test_status_reports_expiry(pki: PKI) -> None:
    pki.device_cert("short", days=10)
    pki.device_cert("long", days=365)
    states = {s.name: s for s in pki.status()}
    assert states["short"].state == "expiring" and states["short"].days_left in (9, 10)
    assert states["long"].state == "valid"
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=30)
    assert {s.name: s.state for s in pki.status(now=later)}["short"] == "expired"


def test_revoke_puts_the_serial_in_the_crl(pki: PKI) -> None:
    cert_path, _ = pki.device_cert("dev1")
    other, _ = pki.device_cert("dev2")
    assert not pki.is_revoked(cert_path)
    assert pki.revoke("dev1")
    assert pki.is_revoked(cert_path)
    assert not pki.is_revoked(other)
    crl = x509.load_pem_x509_crl(pki.crl_path.read_bytes())
    assert crl.is_signature_valid(load(pki.ca_cert_path).public_key())  # type: ignore[arg-type]
    assert {s.name: s.state for s in pki.status(include_revoked=True)}["dev1"] == "revoked"


def test_reissuing_revokes_the_old_certificate(pki: PKI) -> None:
    first, _ = pki.device_cert("dev1")
    old = first.read_bytes()
    second, _ = pki.device_cert("dev1")
    old_serial = x509.load_pem_x509_certificate(old).serial_number
    crl = x509.load_pem_x509_crl(pki.crl_path.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(old_serial) is not None
    assert not pki.is_revoked(second)


def test_issuing_without_a_ca_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="pki init"):
        PKI(tmp_path / "none").device_cert("dev1")
