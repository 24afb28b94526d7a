"""End to end over TLS, every part real: a provisioned device (the agent's simulator with
its own certificate) -> Mosquitto with the generated TLS config, ACL and CRL -> the cloud
service (`millstream-cloud serve`, cloud identity) -> store -> API with an API token.

A second agent holding another device's certificate tries to publish as a device it is
not: the broker's ACL drops its messages, so nothing of it is ever stored.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from millstream_cloud.security.tokens import TokenStore
from tests.security.conftest import CLOUD, SecureBroker
from tests.support.cloud import cloud_server, metric_value
from tests.support.servers import ServerProcess

BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def cloud_tls(tmp_path: Path, secure_broker: SecureBroker) -> Iterator[tuple[ServerProcess, str]]:
    """`millstream-cloud serve` connected to the secure broker as ``millstream-cloud``,
    with a read token in its token file (the API requires it once the factory installs
    auth; before that, the header is simply ignored)."""
    workdir = tmp_path / "cloud"
    store = TokenStore(workdir / "data" / "security" / "tokens.sqlite3")
    _, token = store.create("e2e", "read")
    store.close()
    cert, key = secure_broker.provisioner.pki.client_paths(CLOUD)
    server = cloud_server(
        workdir,
        f"mqtts://127.0.0.1:{secure_broker.port}",
        env={
            "MILLSTREAM_MQTT__TLS__CA": str(secure_broker.ca),
            "MILLSTREAM_MQTT__TLS__CERT": str(cert),
            "MILLSTREAM_MQTT__TLS__KEY": str(key),
        },
    ).start()
    try:
        yield server, token
    finally:
        server.stop()


def get(port: int, path: str, token: str | None) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def simulate(broker: SecureBroker, prefix: str, cert_of: str, tmp_path: Path) -> dict[str, int]:
    cert, key = broker.provisioner.pki.client_paths(cert_of)
    proc = subprocess.run(
        [str(BIN / "millstream-agent"), "simulate", "--devices", "1", "--rate", "5",
         "--metrics", "3", "--duration", "2", "--site", "s1", "--prefix", prefix,
         "--broker", f"mqtts://127.0.0.1:{broker.port}", "--ca", str(broker.ca),
         "--cert", str(cert), "--key", str(key), "--server-hostname", "localhost"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts: dict[str, int] = json.loads(proc.stdout.strip().splitlines()[-1])
    return counts


def test_provisioned_device_readings_reach_the_api_over_tls(
    secure_broker: SecureBroker, cloud_tls: tuple[ServerProcess, str], tmp_path: Path
) -> None:
    if not (BIN / "millstream-agent").exists():
        pytest.skip("millstream-agent is not installed in this environment")
    server, token = cloud_tls
    secure_broker.provisioner.add("s1", "e2e-0001")
    secure_broker.reload()

    deadline = time.monotonic() + 30
    while True:
        status, body = get(server.port, "/readyz", token)
        if status == 200 and json.loads(body).get("broker"):
            break
        assert time.monotonic() < deadline, f"cloud never connected to the TLS broker: {body!r}"
        time.sleep(0.3)

    good = simulate(secure_broker, "e2e", "e2e-0001", tmp_path)
    assert good["acknowledged"] == good["generated"] > 0
    # dev1's certificate, publishing as device e2e-0001's neighbour "spy-0001": dropped.
    forged = simulate(secure_broker, "spy", "dev1", tmp_path)
    assert forged["generated"] > 0

    def stored() -> float:
        status, body = get(server.port, "/metrics", token)
        assert status == 200, body
        return metric_value(body.decode(), "millstream_ingest_readings_stored_total")

    deadline = time.monotonic() + 30
    while stored() < good["acknowledged"] and time.monotonic() < deadline:
        time.sleep(0.3)
    time.sleep(1.0)  # anything forged would have arrived by now
    assert stored() == good["acknowledged"]
    status, body = get(server.port, "/api/v1/devices/e2e-0001/latest", token)
    assert status == 200 and json.loads(body)["metrics"], body
    status, body = get(server.port, "/api/v1/devices", token)
    ids = {d["id"] for d in json.loads(body)["devices"]}
    assert "e2e-0001" in ids and "spy-0001" not in ids
