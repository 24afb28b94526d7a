"""A small private PKI for one Millstream installation: a CA, server and client certificates, a CRL.

Layout of the PKI directory (default ``<data-dir>/pki``)::

    ca.crt  ca.key            the private certificate authority (key mode 0600)
    server.crt server.key     the broker's (and API's) certificate, with SANs
    clients/<name>.crt .key   one per device (CN = device id) and one for the cloud service
    crl.pem                   revoked client certificates, read by Mosquitto's ``crlfile``
    index.json                every certificate issued: serial, CN, kind, expiry, revocation

Keys are ECDSA P-256: small, fast to generate in tests, and accepted by Mosquitto/OpenSSL
and paho-mqtt. Every private key is written with mode 0600 and never printed.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
SERVER_DAYS = 825
CLIENT_DAYS = 365
# The CRL is re-signed on every revocation. OpenSSL refuses *every* client once the CRL's
# nextUpdate has passed, so it is long-lived; `pki status` warns well before it ends.
CRL_DAYS = 3650
EXPIRY_WARNING_DAYS = 30

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class PKIError(RuntimeError):
    """A PKI operation could not be done; the message says why and what to run."""


@dataclass
class CertRecord:
    """One certificate in ``index.json``."""

    serial: str  # hex
    name: str  # CN
    kind: str  # ca | server | device | client
    cert: str  # path relative to the PKI directory
    key: str
    not_after: str  # RFC 3339 UTC
    revoked_at: str | None = None

    def expires(self) -> dt.datetime:
        return dt.datetime.fromisoformat(self.not_after.replace("Z", "+00:00"))


@dataclass
class CertStatus:
    name: str
    kind: str
    serial: str
    not_after: str
    days_left: int
    state: str  # valid | expiring | expired | revoked


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _rfc3339(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_private(path: Path, data: bytes) -> None:
    """Write a secret file readable by its owner only (mode 0600), replacing any old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise PKIError(
            f"invalid name {name!r}: use 1-64 characters from A-Z a-z 0-9 _ . - "
            "(the wire contract's device id rule)"
        )
    return name


class PKI:
    """The PKI in one directory. Create with :meth:`init`, then issue and revoke."""

    def __init__(self, directory: Path | str, ca_key: Path | str | None = None) -> None:
        self.dir = Path(directory)
        # The CA key may live apart from everything the broker and services mount (the
        # compose stack keeps it in a volume only the setup job sees).
        self._ca_key = Path(ca_key) if ca_key else None

    # -- paths -------------------------------------------------------------------------------
    @property
    def ca_cert_path(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def ca_key_path(self) -> Path:
        return self._ca_key or self.dir / "ca.key"

    @property
    def crl_path(self) -> Path:
        return self.dir / "crl.pem"

    @property
    def index_path(self) -> Path:
        return self.dir / "index.json"

    def server_paths(self, name: str = "server") -> tuple[Path, Path]:
        return self.dir / f"{name}.crt", self.dir / f"{name}.key"

    def client_paths(self, name: str) -> tuple[Path, Path]:
        return self.dir / "clients" / f"{name}.crt", self.dir / "clients" / f"{name}.key"

    @property
    def initialised(self) -> bool:
        return self.ca_cert_path.exists() and self.ca_key_path.exists()

    # -- index -------------------------------------------------------------------------------
    def records(self) -> list[CertRecord]:
        if not self.index_path.exists():
            return []
        raw = json.loads(self.index_path.read_text())
        return [CertRecord(**r) for r in raw.get("certificates", [])]

    def _save_records(self, records: Sequence[CertRecord]) -> None:
        body = json.dumps({"certificates": [asdict(r) for r in records]}, indent=2) + "\n"
        write_public(self.index_path, body.encode())

    def _add_record(self, record: CertRecord) -> None:
        records = self.records()
        records.append(record)
        self._save_records(records)

    # -- CA ----------------------------------------------------------------------------------
    def init(
        self, common_name: str = "Millstream CA", days: int = CA_DAYS, force: bool = False
    ) -> Path:
        """Create the CA key and self-signed certificate, and an empty CRL."""
        if self.initialised and not force:
            raise PKIError(f"a CA already exists in {self.dir} (use --force to replace it)")
        self.dir.mkdir(parents=True, exist_ok=True)
        if self._ca_key is None:
            os.chmod(self.dir, 0o700)  # it holds the CA key
        key = _new_key()
        now = _now()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        write_private(self.ca_key_path, _key_pem(key))
        write_public(self.ca_cert_path, cert.public_bytes(serialization.Encoding.PEM))
        self._save_records(
            [
                CertRecord(
                    serial=format(cert.serial_number, "x"),
                    name=common_name,
                    kind="ca",
                    cert="ca.crt",
                    key="ca.key" if self._ca_key is None else str(self._ca_key),
                    not_after=_rfc3339(cert.not_valid_after_utc),
                )
            ]
        )
        self.write_crl()
        return self.ca_cert_path

    def _load_ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        if not self.initialised:
            raise PKIError(f"no CA in {self.dir}: run `millstream-cloud pki init` first")
        cert = x509.load_pem_x509_certificate(self.ca_cert_path.read_bytes())
        key = serialization.load_pem_private_key(self.ca_key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PKIError(f"{self.ca_key_path} is not an EC private key")
        return cert, key

    def ca_certificate(self) -> x509.Certificate:
        return self._load_ca()[0]

    # -- issuing -----------------------------------------------------------------------------
    def _issue(
        self,
        cn: str,
        kind: str,
        cert_path: Path,
        key_path: Path,
        days: int,
        eku: Sequence[x509.ObjectIdentifier],
        sans: Sequence[x509.GeneralName] = (),
    ) -> x509.Certificate:
        ca_cert, ca_key = self._load_ca()
        key = _new_key()
        now = _now()
        not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        write_private(key_path, _key_pem(key))
        write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        self._add_record(
            CertRecord(
                serial=format(cert.serial_number, "x"),
                name=cn,
                kind=kind,
                cert=str(cert_path.relative_to(self.dir)),
                key=str(key_path.relative_to(self.dir)),
                not_after=_rfc3339(cert.not_valid_after_utc),
            )
        )
        return cert

    def server_cert(
        self,
        dns_names: Iterable[str] = ("localhost",),
        ips: Iterable[str] = ("127.0.0.1",),
        name: str = "server",
        days: int = SERVER_DAYS,
    ) -> tuple[Path, Path]:
        """A TLS server certificate for the broker and the API. CN = the first DNS name."""
        check_name(name)
        dns = [d for d in dns_names if d]
        ip_list = [i for i in ips if i]
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        for ip in ip_list:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
            except ValueError as exc:
                raise PKIError(f"invalid IP address for the server certificate: {ip!r}") from exc
        if not sans:
            raise PKIError("a server certificate needs at least one DNS name or IP address")
        cn = dns[0] if dns else ip_list[0]
        cert_path, key_path = self.server_paths(name)
        self._issue(
            cn, "server", cert_path, key_path, days, [ExtendedKeyUsageOID.SERVER_AUTH], sans
        )
        return cert_path, key_path

    def client_cert(
        self, name: str, kind: str = "device", days: int = CLIENT_DAYS
    ) -> tuple[Path, Path]:
        """A TLS client certificate whose CN is ``name`` (Mosquitto's username with
        ``use_identity_as_username``). Re-issuing for a name revokes the older one."""
        check_name(name)
        old = [r for r in self.records() if r.name == name and r.kind == kind and not r.revoked_at]
        cert_path, key_path = self.client_paths(name)
        self._issue(name, kind, cert_path, key_path, days, [ExtendedKeyUsageOID.CLIENT_AUTH])
        if old:
            self.revoke(name, serials={r.serial for r in old})
        return cert_path, key_path

    def device_cert(self, device: str, days: int = CLIENT_DAYS) -> tuple[Path, Path]:
        return self.client_cert(device, kind="device", days=days)

    # -- revocation --------------------------------------------------------------------------
    def revoke(self, name: str, serials: set[str] | None = None) -> list[str]:
        """Revoke the client certificates of ``name`` (or only ``serials``); rewrite the CRL.

        Returns the revoked serials. The broker sees the new CRL when it next reads its
        ``crlfile`` (see docs/security.md for what Mosquitto reloads without a restart).
        """
        records = self.records()
        revoked: list[str] = []
        stamp = _rfc3339(_now())
        for r in records:
            if r.name != name or r.kind in ("ca", "server") or r.revoked_at:
                continue
            if serials is not None and r.serial not in serials:
                continue
            r.revoked_at = stamp
            revoked.append(r.serial)
        if revoked:
            self._save_records(records)
            self.write_crl()
        return revoked

    def write_crl(self, days: int = CRL_DAYS) -> Path:
        ca_cert, ca_key = self._load_ca()
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca_cert.subject)
            .last_update(now - dt.timedelta(minutes=5))
            .next_update(now + dt.timedelta(days=days))
        )
        for r in self.records():
            if r.revoked_at:
                revoked_at = dt.datetime.fromisoformat(r.revoked_at.replace("Z", "+00:00"))
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder()
                    .serial_number(int(r.serial, 16))
                    .revocation_date(revoked_at)
                    .build()
                )
        crl = builder.sign(ca_key, hashes.SHA256())
        write_public(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))
        return self.crl_path

    def crl_next_update(self) -> dt.datetime | None:
        if not self.crl_path.exists():
            return None
        crl = x509.load_pem_x509_crl(self.crl_path.read_bytes())
        return crl.next_update_utc

    def is_revoked(self, cert_path: Path) -> bool:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        crl = x509.load_pem_x509_crl(self.crl_path.read_bytes())
        return crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None

    # -- reporting ---------------------------------------------------------------------------
    def status(
        self, now: dt.datetime | None = None, include_revoked: bool = False
    ) -> list[CertStatus]:
        now = now or _now()
        out: list[CertStatus] = []
        for r in self.records():
            if r.revoked_at and not include_revoked:
                continue
            days_left = (r.expires() - now).days
            if r.revoked_at:
                state = "revoked"
            elif r.expires() <= now:
                state = "expired"
            elif days_left < EXPIRY_WARNING_DAYS:
                state = "expiring"
            else:
                state = "valid"
            out.append(CertStatus(r.name, r.kind, r.serial, r.not_after, days_left, state))
        return out
