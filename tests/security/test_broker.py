"""A real Mosquitto configured by the generated TLS config, ACL and CRL (issue 8, must show).

Mosquitto acknowledges a QoS 1 publish that the ACL denies (PUBACK) and drops it, so every
"refused" publish is checked from the other side: a cloud-identity subscriber on
``millstream/v1/#`` never receives it, while a marker the same client sends afterwards on
its own prefix does arrive (so the silence is not just slowness).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest

from millstream_cloud.security.pki import PKI
from tests.security.conftest import CLOUD, MqttProbe, SecureBroker

pytestmark = pytest.mark.integration


def telemetry(device: str, seq: int) -> bytes:
    return json.dumps(
        {
            "v": 1,
            "device": device,
            "seq": seq,
            "readings": [{"ts": "2026-01-01T00:00:00Z", "metric": "current", "value": seq}],
        }
    ).encode()


@pytest.fixture
def cloud(secure_broker: SecureBroker) -> Iterator[MqttProbe]:
    probe = secure_broker.client(CLOUD)
    assert probe.connect(), probe.error
    probe.subscribe("millstream/v1/#")
    yield probe
    probe.close()


def connected(broker: SecureBroker, name: str | None, **kw: object) -> MqttProbe:
    probe = broker.client(name, **kw)
    assert probe.connect(), f"{name} could not connect: {probe.connect_rc} {probe.error}"
    return probe


def test_good_device_readings_flow_both_ways(secure_broker: SecureBroker, cloud: MqttProbe) -> None:
    dev = connected(secure_broker, "dev1")
    try:
        dev.subscribe("millstream/v1/s1/dev1/config/desired")
        dev.subscribe("millstream/v1/s1/dev1/cmd/+")
        for seq in range(5):
            assert dev.publish("millstream/v1/s1/dev1/telemetry", telemetry("dev1", seq))
        assert dev.publish(
            "millstream/v1/s1/dev1/status", b'{"v":1,"device":"dev1","state":"online"}'
        )
        for seq in range(5):
            assert cloud.wait_for(telemetry("dev1", seq))
        assert cloud.wait_for(b'{"v":1,"device":"dev1","state":"online"}')
        # The cloud identity sends desired config and commands; the device gets them.
        assert cloud.publish("millstream/v1/s1/dev1/config/desired", b'{"rate": 2}')
        assert cloud.publish("millstream/v1/s1/dev1/cmd/restart", b'{"id": "c1"}')
        assert dev.wait_for(b'{"rate": 2}')
        assert dev.wait_for(b'{"id": "c1"}')
        assert dev.publish("millstream/v1/s1/dev1/cmd/restart/result", b'{"id": "c1", "ok": true}')
        assert cloud.wait_for(b'{"id": "c1", "ok": true}')
    finally:
        dev.close()


def test_cloud_reads_through_a_shared_subscription(secure_broker: SecureBroker) -> None:
    worker = connected(secure_broker, CLOUD)
    dev = connected(secure_broker, "dev1")
    try:
        worker.subscribe("$share/cloud/millstream/v1/+/+/telemetry")
        assert dev.publish("millstream/v1/s1/dev1/telemetry", telemetry("dev1", 1))
        assert worker.wait_for(telemetry("dev1", 1))
    finally:
        worker.close()
        dev.close()


@pytest.mark.parametrize(
    "topic",
    [
        "millstream/v1/s1/dev2/telemetry",  # another device, same site
        "millstream/v1/s2/dev1/telemetry",  # its own id under another site
        "millstream/v1/s2/dev3/status",  # another device's retained status
        "millstream/v1/s1/dev1/config/desired",  # only the cloud sets desired config
        "millstream/v1/s1/dev1/cmd/restart",  # only the cloud sends commands
        "millstream/v1/s1/dev2/cmd/restart/result",  # forging another device's result
        "millstream/v1/s1/dev1/other",  # unknown channel
        "elsewhere/topic",
    ],
)
def test_device_cannot_publish_outside_its_own_rights(
    secure_broker: SecureBroker, cloud: MqttProbe, topic: str
) -> None:
    dev = connected(secure_broker, "dev1")
    try:
        cloud.subscribe("elsewhere/#")  # denied for the cloud too: it must not see it anyway
        forged = b"forged:" + topic.encode()
        dev.publish(topic, forged)  # PUBACK or not, the broker must drop it
        marker = telemetry("dev1", 99)
        assert dev.publish("millstream/v1/s1/dev1/telemetry", marker)
        assert cloud.wait_for(marker)
        time.sleep(0.2)
        assert forged not in cloud.payloads()
    finally:
        dev.close()


def test_device_cannot_read_another_devices_commands(
    secure_broker: SecureBroker, cloud: MqttProbe
) -> None:
    spy = connected(secure_broker, "dev1")
    victim = connected(secure_broker, "dev2")
    try:
        spy.subscribe("millstream/v1/s1/dev2/cmd/+")
        spy.subscribe("millstream/v1/#")
        victim.subscribe("millstream/v1/s1/dev2/cmd/+")
        assert cloud.publish("millstream/v1/s1/dev2/cmd/unlock", b"secret-command")
        assert victim.wait_for(b"secret-command")
        assert victim.publish("millstream/v1/s1/dev2/telemetry", telemetry("dev2", 1))
        assert cloud.wait_for(telemetry("dev2", 1))
        time.sleep(0.2)
        assert spy.payloads() == []
    finally:
        spy.close()
        victim.close()


def test_anonymous_client_without_certificate_is_refused(secure_broker: SecureBroker) -> None:
    anon = secure_broker.client(None)
    assert not anon.connect()


def test_plaintext_connection_is_refused(secure_broker: SecureBroker) -> None:
    plain = MqttProbe(secure_broker.port, ca=None, tls=False)
    assert not plain.connect()
    # And the raw bytes of an MQTT CONNECT get no CONNACK (0x20) back.
    with socket.create_connection(("127.0.0.1", secure_broker.port), timeout=3) as s:
        s.sendall(bytes.fromhex("101000044d5154540402003c000461626364"))
        try:
            reply = s.recv(4)
        except (ConnectionResetError, TimeoutError):
            reply = b""
        assert not reply.startswith(b"\x20")


def test_only_a_tls_listener_is_configured(secure_broker: SecureBroker) -> None:
    conf = (secure_broker.server.workdir / "mosquitto.conf").read_text()
    listeners = [line for line in conf.splitlines() if line.startswith("listener ")]
    assert len(listeners) == 1
    assert "allow_anonymous false" in conf
    assert "require_certificate true" in conf
    assert "use_identity_as_username true" in conf


def test_certificate_from_another_ca_is_refused(secure_broker: SecureBroker, tmp_path) -> None:  # type: ignore[no-untyped-def]
    rogue = PKI(tmp_path / "rogue")
    rogue.init(common_name="Millstream CA")  # same name, different key
    cert, key = rogue.device_cert("dev1")
    probe = MqttProbe(
        secure_broker.port, ca=str(secure_broker.ca), cert=str(cert), key=str(key), client_id="dev1"
    )
    assert not probe.connect()


def test_server_certificate_is_verified_by_clients(secure_broker: SecureBroker, tmp_path) -> None:  # type: ignore[no-untyped-def]
    other = PKI(tmp_path / "other")
    other.init()
    c, k = secure_broker.provisioner.pki.client_paths("dev1")
    probe = MqttProbe(
        secure_broker.port, ca=str(other.ca_cert_path), cert=str(c), key=str(k), client_id="dev1"
    )
    assert not probe.connect()
    assert probe.error is not None and "CERTIFICATE_VERIFY_FAILED" in probe.error


def test_revoked_device_is_refused_without_a_broker_restart(
    secure_broker: SecureBroker, cloud: MqttProbe
) -> None:
    pid_before = secure_broker.server.proc.pid  # type: ignore[union-attr]
    holder = connected(secure_broker, "dev2")  # a session that stays open across the revoke
    assert holder.publish("millstream/v1/s1/dev2/telemetry", telemetry("dev2", 1))
    assert cloud.wait_for(telemetry("dev2", 1))

    secure_broker.provisioner.revoke("dev2")
    secure_broker.reload()
    assert secure_broker.server.running
    assert secure_broker.server.proc.pid == pid_before  # type: ignore[union-attr]

    # A new connection with the revoked certificate fails the TLS handshake (CRL).
    assert not secure_broker.client("dev2").connect()
    # The session still open has lost every right (ACL re-read on SIGHUP).
    holder.publish("millstream/v1/s1/dev2/telemetry", telemetry("dev2", 2))
    # Other devices are unaffected.
    other = connected(secure_broker, "dev1")
    try:
        assert other.publish("millstream/v1/s1/dev1/telemetry", telemetry("dev1", 7))
        assert cloud.wait_for(telemetry("dev1", 7))
        time.sleep(0.2)
        assert telemetry("dev2", 2) not in cloud.payloads()
    finally:
        other.close()
        holder.close()


def test_reprovisioned_device_gets_a_new_identity(
    secure_broker: SecureBroker, cloud: MqttProbe
) -> None:
    prov = secure_broker.provisioner
    old_cert = prov.pki.client_paths("dev3")[0].read_bytes()
    prov.revoke("dev3")
    prov.add("s2", "dev3")
    secure_broker.reload()
    assert prov.pki.client_paths("dev3")[0].read_bytes() != old_cert
    dev = connected(secure_broker, "dev3")
    try:
        assert dev.publish("millstream/v1/s2/dev3/telemetry", telemetry("dev3", 1))
        assert cloud.wait_for(telemetry("dev3", 1))
    finally:
        dev.close()


def test_oversize_packet_is_refused_by_the_broker(
    secure_broker: SecureBroker, cloud: MqttProbe
) -> None:
    dev = connected(secure_broker, "dev1")
    try:
        big = b"x" * (1_048_576 + 1)
        dev.publish("millstream/v1/s1/dev1/telemetry", big)
        deadline = time.monotonic() + 5
        while dev.client.is_connected() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not dev.client.is_connected(), "the broker should drop the client"
        assert big not in cloud.payloads()
    finally:
        dev.close()
    # Under the broker limit, the message reaches the cloud (which applies its own limit).
    ok = connected(secure_broker, "dev1")
    try:
        medium = b"y" * 300_000
        assert ok.publish("millstream/v1/s1/dev1/telemetry", medium)
        assert cloud.wait_for(medium)
    finally:
        ok.close()
