"""Fixtures for the security tests: a PKI in a temp dir and a real Mosquitto configured with
the TLS config, ACL and CRL that ``millstream_cloud.security`` generates."""

from __future__ import annotations

import os
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from millstream_cloud.security.acl import render_mosquitto_conf
from millstream_cloud.security.devices import DeviceProvisioner, SecurityPaths
from tests.support.servers import ServerProcess, find_binary, free_port

CLOUD = "millstream-cloud"


@dataclass
class SecureBroker:
    server: ServerProcess
    provisioner: DeviceProvisioner
    port: int

    @property
    def pki_dir(self) -> Path:
        return self.provisioner.pki.dir

    @property
    def ca(self) -> Path:
        return self.provisioner.pki.ca_cert_path

    def reload(self) -> None:
        assert self.server.proc is not None
        self.provisioner.reload_broker(self.server.proc.pid)
        time.sleep(0.3)  # Mosquitto handles the signal in its next loop iteration

    def client(self, name: str | None, **kw: object) -> MqttProbe:
        """A probe that connects with the client certificate ``name`` (None: no cert)."""
        cert = key = None
        if name is not None:
            c, k = self.provisioner.pki.client_paths(name)
            cert, key = str(c), str(k)
        return MqttProbe(self.port, ca=str(self.ca), cert=cert, key=key, client_id=name, **kw)  # type: ignore[arg-type]


@dataclass
class MqttProbe:
    """A paho-mqtt 2.x client that records what happens, for assertions."""

    port: int
    ca: str | None
    cert: str | None = None
    key: str | None = None
    client_id: str | None = None
    tls: bool = True
    received: list[mqtt.MQTTMessage] = field(default_factory=list)
    suback: list[object] = field(default_factory=list)
    connect_rc: object = None
    error: str | None = None

    def __post_init__(self) -> None:
        self._connected = threading.Event()
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"{self.client_id or 'anon'}-{os.getpid()}-{id(self)}",
        )
        if self.tls:
            self.client.tls_set(
                ca_certs=self.ca,
                certfile=self.cert,
                keyfile=self.key,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    def _on_connect(self, client, userdata, flags, rc, props=None):  # type: ignore[no-untyped-def]
        self.connect_rc = rc
        if not rc.is_failure:
            self._connected.set()

    def _on_message(self, client, userdata, msg):  # type: ignore[no-untyped-def]
        with self._lock:
            self.received.append(msg)

    def _on_subscribe(self, client, userdata, mid, rcs, props=None):  # type: ignore[no-untyped-def]
        self.suback.extend(rcs)

    def connect(self, timeout: float = 3.0) -> bool:
        """True when the broker accepted the connection (CONNACK success) within timeout."""
        try:
            self.client.connect("127.0.0.1", self.port, keepalive=30)
        except (OSError, ssl.SSLError) as exc:
            self.error = repr(exc)
            return False
        self.client.loop_start()
        ok = self._connected.wait(timeout)
        if ok:
            # TLS 1.3: a rejected client certificate surfaces after the handshake, so a
            # broker that refuses us may look connected for an instant; make sure it stays.
            time.sleep(0.2)
            ok = self.client.is_connected()
        if not ok:
            self.client.loop_stop()
        return ok

    def subscribe(self, topic: str, qos: int = 1) -> None:
        before = len(self.suback)
        self.client.subscribe(topic, qos)
        deadline = time.monotonic() + 3
        while len(self.suback) == before and time.monotonic() < deadline:
            time.sleep(0.02)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        """Publish and wait for the PUBACK; True when the broker acknowledged it."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        try:
            info.wait_for_publish(timeout=3)
        except (RuntimeError, ValueError):
            return False
        return info.is_published()

    def payloads(self) -> list[bytes]:
        with self._lock:
            return [m.payload for m in self.received]

    def wait_for(self, payload: bytes, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if payload in self.payloads():
                return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


@pytest.fixture
def provisioner(tmp_path: Path) -> DeviceProvisioner:
    paths = SecurityPaths(tmp_path / "data")
    prov = DeviceProvisioner(paths, cloud_identities=(CLOUD,))
    prov.pki.init()
    prov.pki.server_cert(["localhost"], ["127.0.0.1"])
    prov.pki.client_cert(CLOUD, kind="client")
    return prov


@pytest.fixture
def secure_broker(tmp_path: Path, provisioner: DeviceProvisioner) -> Iterator[SecureBroker]:
    """Mosquitto with only a TLS listener, client certificates, the generated ACL and CRL."""
    binary = find_binary("mosquitto")
    if binary is None:
        pytest.skip("mosquitto not installed (make test installs it)")
    for site, device in (("s1", "dev1"), ("s1", "dev2"), ("s2", "dev3")):
        provisioner.add(site, device, broker_host="localhost")
    acl = provisioner.write_acl()
    pki = provisioner.pki
    port = free_port()
    workdir = tmp_path / "mosquitto"
    workdir.mkdir()
    server_crt, server_key = pki.server_paths()
    conf = render_mosquitto_conf(
        port=port,
        bind="127.0.0.1",
        cafile=str(pki.ca_cert_path),
        certfile=str(server_crt),
        keyfile=str(server_key),
        crlfile=str(pki.crl_path),
        acl_file=str(acl),
    )
    if os.geteuid() == 0:
        # Mosquitto drops root to user "mosquitto", which could not read the 0600 keys and
        # the files it re-reads on SIGHUP in this temp dir.
        conf = "user root\n" + conf
    (workdir / "mosquitto.conf").write_text(conf)
    server = ServerProcess(
        [binary, "-c", str(workdir / "mosquitto.conf")], port, workdir, workdir / "mosquitto.log"
    ).start()
    try:
        yield SecureBroker(server, provisioner, port)
    finally:
        server.stop()
