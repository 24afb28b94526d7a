"""Edge -> Mosquitto -> cloud -> store -> API, with every part real."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from millstream_cloud.timeutil import parse_time_ns
from tests.support.cloud import API, metric_value
from tests.support.servers import ServerProcess

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.integration


def publish(broker: ServerProcess, messages: list[tuple[str, bytes]]) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-publisher")
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        infos = [client.publish(t, p, qos=1) for t, p in messages]
        for info in infos:
            info.wait_for_publish(10)
    finally:
        client.loop_stop()
        client.disconnect()


def simulate(
    broker: ServerProcess,
    tmp_path: Path,
    devices: int,
    rate: float,
    metrics: int,
    duration: float,
    site: str,
) -> dict[str, int]:
    proc = subprocess.run(
        [
            str(BIN / "millstream-agent"),
            "simulate",
            "--devices",
            str(devices),
            "--rate",
            str(rate),
            "--metrics",
            str(metrics),
            "--duration",
            str(duration),
            "--site",
            site,
            "--broker",
            f"mqtt://127.0.0.1:{broker.port}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts: dict[str, int] = json.loads(proc.stdout.strip().splitlines()[-1])
    return counts


def stored_readings(api: API) -> float:
    return metric_value(api.text("/metrics"), "millstream_ingest_readings_stored_total")


def test_fleet_readings_stored_exactly_once_and_bad_messages_rejected(
    mosquitto: ServerProcess, api: API, tmp_path: Path
) -> None:
    api.wait_for(lambda a: a.get("/readyz")["broker"], timeout=20)
    bad = [
        (
            "millstream/v1/line-1/sim-bad/telemetry",
            b'{"v":1,"device":"sim-bad","seq":1,"readings":[{"ts":',
        ),
        (
            "millstream/v1/line-1/sim-bad/telemetry",
            b'{"v":1,"device":"sim-bad","seq":2,"readings":[{"ts":"2026-01-01T00:00:00Z","metric":"t","value":"hot"}]}',
        ),
    ]
    publish(mosquitto, bad[:1])
    counts = simulate(
        mosquitto, tmp_path, devices=5, rate=10, metrics=10, duration=2, site="line-1"
    )
    publish(mosquitto, bad[1:])
    assert counts["generated"] == counts["published"] == counts["acknowledged"] == 1000

    api.wait_for(lambda a: stored_readings(a) >= 1000, timeout=30)
    metrics = api.text("/metrics")
    assert stored_readings(api) == 1000
    assert (
        metric_value(metrics, "millstream_ingest_rejected_messages_total", 'reason="not_json"') == 1
    )
    assert (
        metric_value(metrics, "millstream_ingest_rejected_messages_total", 'reason="schema"') == 1
    )

    dead = api.get("/api/v1/dead-letters")["dead_letters"]
    assert {d["reason"] for d in dead} == {"not_json", "schema"}
    assert all(d["topic"].endswith("/sim-bad/telemetry") and d["error"] for d in dead)

    devices = api.get("/api/v1/devices")
    assert devices["next"] is None
    sims = [d for d in devices["devices"] if d["id"] != "sim-bad"]
    assert len(sims) == 5 and all(d["site"] == "line-1" for d in sims)

    total = 0
    for dev in sims:
        latest = api.get(f"/api/v1/devices/{dev['id']}/latest")["metrics"]
        assert len(latest) == 10
        answer = api.get(
            f"/api/v1/devices/{dev['id']}/telemetry?"
            + "&".join(f"metric={m}" for m in latest)
            + "&start=2000-01-01T00:00:00Z"
        )
        for series in answer:
            times = [parse_time_ns(p["time"]) for p in series["points"]]
            assert times == sorted(set(times)), "each reading once, in time order"
            total += len(times)
    assert total == 1000
    assert api.get("/healthz") == {"status": "ok"}
