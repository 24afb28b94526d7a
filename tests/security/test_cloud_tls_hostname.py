"""The cloud's subscriber verifies the broker against ``mqtt.tls.server_hostname`` when set.

A broker reached by IP address (or through a tunnel) often holds a certificate for another
name. Here the real Mosquitto's certificate names only ``broker.plant.example``; the cloud
connects to 127.0.0.1.
"""

from __future__ import annotations

import ssl
import threading
from pathlib import Path

import pytest

from millstream_cloud.ingest.subscriber import make_client
from millstream_cloud.security.devices import DeviceProvisioner, SecurityPaths
from millstream_cloud.settings import MQTTSettings, TLSSettings
from tests.security.conftest import CLOUD, SecureBroker

pytestmark = pytest.mark.integration
NAME = "broker.plant.example"


@pytest.fixture
def provisioner(tmp_path: Path) -> DeviceProvisioner:
    """Like the shared fixture, but the broker's certificate has no IP address in it."""
    prov = DeviceProvisioner(SecurityPaths(tmp_path / "data"), cloud_identities=(CLOUD,))
    prov.pki.init()
    prov.pki.server_cert([NAME], [])
    prov.pki.client_cert(CLOUD, kind="client")
    return prov


def _settings(broker: SecureBroker, server_hostname: str | None) -> MQTTSettings:
    cert, key = broker.provisioner.pki.client_paths(CLOUD)
    tls = TLSSettings(
        ca=str(broker.ca), cert=str(cert), key=str(key), server_hostname=server_hostname
    )
    return MQTTSettings(broker=f"mqtts://127.0.0.1:{broker.port}", client_id="t", tls=tls)


def test_server_hostname_is_what_the_certificate_is_checked_against(
    secure_broker: SecureBroker,
) -> None:
    client = make_client(_settings(secure_broker, NAME), "tls-name-ok")
    connected = threading.Event()
    client.on_connect = lambda c, u, f, rc, p=None: rc == 0 and connected.set()
    client.connect("127.0.0.1", secure_broker.port)
    client.loop_start()
    try:
        assert connected.wait(5.0), "no CONNACK with server_hostname set"
    finally:
        client.loop_stop()
        client.disconnect()


def test_without_it_a_certificate_for_another_name_is_refused(
    secure_broker: SecureBroker,
) -> None:
    client = make_client(_settings(secure_broker, None), "tls-name-missing")
    with pytest.raises(ssl.SSLCertVerificationError, match=r"mismatch|match"):
        client.connect("127.0.0.1", secure_broker.port)
