"""Credentials and TLS: good ones connect; bad ones are reported clearly and retried slowly."""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import pytest

from tests.agent.conftest import (
    AgentProcess,
    Recorder,
    agent_config,
    custom_mosquitto,
    password_line,
    wait_until,
)
from tests.support.servers import free_port

pytestmark = pytest.mark.integration
x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def make_ca(
    directory: Path, name: str
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    path = directory / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, path


def issue(directory: Path, ca: tuple, cn: str, dns: list[str], client: bool) -> tuple[Path, Path]:
    ca_key, ca_cert, _ = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.ExtendedKeyUsage(
                [
                    x509.ExtendedKeyUsageOID.CLIENT_AUTH
                    if client
                    else x509.ExtendedKeyUsageOID.SERVER_AUTH
                ]
            ),
            critical=False,
        )
    )
    if dns:
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_path, key_path = directory / f"{cn}.crt", directory / f"{cn}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, key_path)
    return cert_path, key_path


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """A test CA, a broker certificate for broker.test, a device certificate and a
    second, unrelated CA; generated now, never committed."""
    d = tmp_path / "pki"
    d.mkdir()
    ca = make_ca(d, "millstream-test-ca")
    _, _, other_ca = make_ca(d, "some-other-ca")
    server_cert, server_key = issue(d, ca, "broker.test", ["broker.test"], client=False)
    client_cert, client_key = issue(d, ca, "press-01", [], client=True)
    return {
        "ca": ca[2],
        "other_ca": other_ca,
        "server_cert": server_cert,
        "server_key": server_key,
        "client_cert": client_cert,
        "client_key": client_key,
    }


@pytest.fixture
def tls_broker(tmp_path: Path, pki: dict[str, Path]):
    """Plain listener (for the recorder) plus a mutual-TLS listener."""
    tls_port = free_port()
    server = custom_mosquitto(
        tmp_path / "mosquitto",
        f"listener {tls_port} 127.0.0.1\n"
        f"cafile {pki['ca']}\ncertfile {pki['server_cert']}\nkeyfile {pki['server_key']}\n"
        "require_certificate true\n",
    ).start()
    server.tls_port = tls_port  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        server.stop()


def refusals(agent: AgentProcess) -> int:
    return agent.log().count("connection refused:")


def test_mutual_tls_with_test_ca_connects(
    tmp_path: Path, pki: dict[str, Path], tls_broker, agents: list[AgentProcess]
) -> None:
    recorder = Recorder(tls_broker.port).start()
    try:
        config = agent_config(
            tmp_path,
            f"mqtts://127.0.0.1:{tls_broker.tls_port}",
            mqtt={
                "broker": f"mqtts://127.0.0.1:{tls_broker.tls_port}",
                "tls": {
                    "ca": str(pki["ca"]),
                    "cert": str(pki["client_cert"]),
                    "key": str(pki["client_key"]),
                    "server_hostname": "broker.test",
                },
            },
        )
        agent = AgentProcess(tmp_path, config)
        agents.append(agent.start())
        wait_until(lambda: len(recorder.telemetry().get("press-01", [])) >= 5, timeout=20)
    finally:
        recorder.stop()


def test_wrong_ca_refused_clearly_without_hot_loop(
    tmp_path: Path, pki: dict[str, Path], tls_broker, agents: list[AgentProcess]
) -> None:
    config = agent_config(
        tmp_path,
        "mqtts://x",
        mqtt={
            "broker": f"mqtts://127.0.0.1:{tls_broker.tls_port}",
            "tls": {
                "ca": str(pki["other_ca"]),
                "cert": str(pki["client_cert"]),
                "key": str(pki["client_key"]),
                "server_hostname": "broker.test",
            },
            "refused_retry": "30s",
        },
    )
    agent = AgentProcess(tmp_path, config)
    agents.append(agent.start())
    wait_until(lambda: refusals(agent) >= 1, timeout=15)
    time.sleep(4)
    assert refusals(agent) == 1, agent.log()
    assert "TLS: broker certificate not trusted" in agent.log()
    assert agent.alive


def test_wrong_password_refused_clearly_without_hot_loop(
    tmp_path: Path, agents: list[AgentProcess]
) -> None:
    passwords = tmp_path / "passwords"
    passwords.write_text(password_line("press-01", "right-secret"))
    broker = custom_mosquitto(
        tmp_path / "mosquitto", f"allow_anonymous false\npassword_file {passwords}\n"
    ).start()
    try:
        url = f"mqtt://127.0.0.1:{broker.port}"
        bad = AgentProcess(
            tmp_path,
            agent_config(
                tmp_path,
                url,
                mqtt={
                    "broker": url,
                    "username": "press-01",
                    "password": "wrong",
                    "refused_retry": "30s",
                },
            ),
            name="bad",
        )
        agents.append(bad.start())
        wait_until(lambda: refusals(bad) >= 1, timeout=15)
        time.sleep(4)
        assert refusals(bad) == 1, bad.log()
        assert "Bad user name or password" in bad.log() or "Not authorized" in bad.log()
        assert bad.alive
        bad.kill()

        # the right secret from the environment (never the file) gets in
        good = AgentProcess(
            tmp_path,
            agent_config(
                tmp_path, url, mqtt={"broker": url, "username": "press-01", "password": "wrong"}
            ),
            name="good",
            env={"MILLSTREAM_MQTT_PASSWORD": "right-secret"},
        )
        agents.append(good.start())
        wait_until(lambda: "connected to 127.0.0.1" in good.log(), timeout=15)
        assert refusals(good) == 0
    finally:
        broker.stop()
