"""Exactly once through a SIGKILL of the cloud, and two workers on one shared subscription."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cloud.ingest.conftest import NS, batch, stored_count, telemetry_topic, wait_until
from tests.support.influxdb import influxdb_available, influxdb_server

DEVICES = [f"press-{i:02d}" for i in range(10)]


def _publish_stream(publisher, messages_per_device: int, pause_every: int = 0, pause: float = 0.0):
    t0 = time.time_ns() - 3600 * NS
    n = 0
    for seq in range(messages_per_device):
        for d in DEVICES:
            publisher.publish(telemetry_topic(d), batch(d, seq, t0 + seq * NS))
            n += 1
            if pause_every and n % pause_every == 0:
                time.sleep(pause)
    publisher.flush()


def test_sigkill_mid_stream_then_restart_stores_all_exactly_once(make_cloud, publisher):
    # 10 devices x 25 messages x 40 readings = 10,000 readings
    cloud = make_cloud("cloud-k")
    sender = threading.Thread(target=_publish_stream, args=(publisher, 25, 10, 0.02))
    sender.start()
    wait_until(lambda: cloud.metric("millstream_ingest_readings_stored_total") >= 1000, 30, 0.02)
    cloud.kill()  # SIGKILL: no drain, no acks, no clean disconnect
    stored_before = stored_count_direct(cloud)
    assert stored_before < 10_000, "the kill came too late to prove anything"
    sender.join(60)
    cloud.start()  # same client id: the broker resumes the persistent session
    wait_until(lambda: stored_count(cloud, DEVICES) >= 10_000, 60, 0.3, "10,000 stored")
    time.sleep(1.0)
    assert stored_count(cloud, DEVICES) == 10_000
    for d in DEVICES:
        dev = cloud.get(f"/api/v1/devices/{d}")
        assert dev["sequence"]["last"] == 24 and dev["sequence"]["gaps"] == 0
        pts = cloud.get(
            f"/api/v1/devices/{d}/telemetry", metric="m0",
            start="2000-01-01T00:00:00Z", end="2100-01-01T00:00:00Z",
        )["points"]  # fmt: skip
        assert len(pts) == 250 and len({p["time"] for p in pts}) == 250


def stored_count_direct(cloud) -> int:
    import sqlite3

    db = sqlite3.connect(cloud.data_dir / "registry.db")
    try:
        return sum(r[0] + 1 for r in db.execute("SELECT last_seq FROM devices")) * 40
    finally:
        db.close()


@pytest.fixture
def influxdb(tmp_path: Path) -> Iterator[Any]:
    if not influxdb_available():
        pytest.skip("Debian package influxdb not installed (make test installs it)")
    server = influxdb_server(tmp_path / "influxdb").start()
    try:
        yield server
    finally:
        server.stop()


def _influx_env(server: Any, worker: str, tmp_path: Path) -> dict[str, str]:
    return {
        "MILLSTREAM_STORAGE__BACKEND": "influxdb",
        "MILLSTREAM_STORAGE__INFLUXDB__URL": server.url,
        "MILLSTREAM_STORAGE__INFLUXDB__API": "v1",
        "MILLSTREAM_STORAGE__INFLUXDB__SPOOL_DIR": str(tmp_path / f"spool-{worker}"),
    }


def test_two_workers_split_the_load_and_store_each_reading_once(
    make_cloud, publisher, tmp_path, influxdb
):
    """The scale path of DESIGN.md: stateless workers, one shared subscription, a shared
    registry (same data dir) and a shared store (InfluxDB 1.x)."""
    data = tmp_path / "shared-data"
    a = make_cloud("cloud-a", data_dir=data, env=_influx_env(influxdb, "a", tmp_path))
    b = make_cloud("cloud-b", data_dir=data, env=_influx_env(influxdb, "b", tmp_path))
    _check_two_workers(a, b, publisher, DEVICES_ODD)
    # Detection runs in the first (detection.lock) and, fed by its worker, sees that
    # worker's share of each device's messages only: what detection.feed: all is for.
    scored = "millstream_detection_scored_readings_total"
    share = a.metric("millstream_ingest_readings_stored_total")
    wait_until(lambda: a.metric(scored) >= share, 20, 0.2, "a's share scored")
    assert a.metric(scored) == share < len(DEVICES_ODD) * 30 * 40
    assert b.metric(scored) == 0


def test_with_feed_all_the_detecting_worker_scores_every_message(
    make_cloud, publisher, tmp_path, influxdb
):
    data = tmp_path / "shared-data"
    feed = {"MILLSTREAM_DETECTION__FEED": "all"}
    a = make_cloud("cloud-a", data_dir=data, env={**_influx_env(influxdb, "a", tmp_path), **feed})
    b = make_cloud("cloud-b", data_dir=data, env={**_influx_env(influxdb, "b", tmp_path), **feed})
    _check_two_workers(a, b, publisher, DEVICES_ODD)
    expect = len(DEVICES_ODD) * 30 * 40
    scored = "millstream_detection_scored_readings_total"
    wait_until(lambda: a.metric(scored) >= expect, 30, 0.2, "every reading scored")
    time.sleep(0.5)
    assert a.metric(scored) == expect  # all of them, once, though a stored only its share
    assert a.metric("millstream_ingest_readings_stored_total") < expect
    feed_messages = "millstream_detection_feed_messages_total"
    assert a.metric(feed_messages, 'outcome="scored"') == len(DEVICES_ODD) * 30
    # b stores its share and runs no detection, so it opens no feed either
    assert b.metric(scored) == 0 and b.metric(feed_messages, 'outcome="scored"') == 0
    log = a.log_path.read_text()
    assert "detection feed: subscribed to millstream/v1/+/+/telemetry as cloud-a-detect" in log


def test_two_sharded_workers_each_score_every_message_of_their_own_devices(
    make_cloud, publisher, tmp_path, influxdb
):
    """detection.shards: both workers detect, each on its shard of the devices, from every
    message of them (its own feed), on one data dir as on two hosts."""
    import httpx

    from millstream_cloud.detection.engine import device_partition

    data = tmp_path / "shared-data"

    def env(worker: str, shard: int) -> dict[str, str]:
        return {
            **_influx_env(influxdb, worker, tmp_path),
            "MILLSTREAM_DETECTION__FEED": "all",
            "MILLSTREAM_DETECTION__SHARDS": "2",
            "MILLSTREAM_DETECTION__SHARD": str(shard),
        }

    a = make_cloud("cloud-a", data_dir=data, env=env("a", 0))
    b = make_cloud("cloud-b", data_dir=data, env=env("b", 1))
    _check_two_workers(a, b, publisher, DEVICES_ODD)
    owner = {d: device_partition(d, 2) for d in DEVICES_ODD}
    per_shard = [list(owner.values()).count(k) for k in range(2)]
    assert all(per_shard), per_shard
    scored = "millstream_detection_scored_readings_total"
    feed = "millstream_detection_feed_messages_total"
    for cloud, k in ((a, 0), (b, 1)):
        expect = per_shard[k] * 30 * 40
        wait_until(lambda c=cloud, e=expect: c.metric(scored) >= e, 30, 0.2, f"shard {k}")
    time.sleep(0.5)
    for cloud, k in ((a, 0), (b, 1)):
        assert cloud.metric(scored) == per_shard[k] * 30 * 40  # all of its devices', once
        assert cloud.metric(feed, 'outcome="scored"') == per_shard[k] * 30
        assert cloud.metric(feed, 'outcome="elsewhere"') == per_shard[1 - k] * 30
        for d in DEVICES_ODD:
            res = httpx.get(f"{cloud.url}/api/v1/devices/{d}/detection", timeout=10)
            if owner[d] == k:
                assert res.status_code == 200 and res.json()["shard"]["shard"] == k
            else:
                assert res.status_code == 404
                assert f"scored by detection shard {1 - k} of 2" in res.json()["detail"]
        assert "detection scores the devices of shard" in cloud.log_path.read_text()
        assert cloud.metric("millstream_detection_shard", f'shard="{k}",shards="2"') == 1


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh database on the server of MILLSTREAM_TEST_POSTGRES_URL, dropped after."""
    import os

    base = os.environ.get("MILLSTREAM_TEST_POSTGRES_URL")
    if not base:
        pytest.skip("MILLSTREAM_TEST_POSTGRES_URL not set")
    psycopg = pytest.importorskip("psycopg")
    name = f"millstream_test_{time.time_ns()}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield base.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_two_workers_with_a_postgresql_registry(
    make_cloud, publisher, tmp_path, influxdb, postgres_url
):
    """Workers on different data dirs (as on different hosts): registry in PostgreSQL."""
    envs = [
        {**_influx_env(influxdb, w, tmp_path), "MILLSTREAM_REGISTRY__URL": postgres_url}
        for w in ("a", "b")
    ]
    a = make_cloud("cloud-a", data_dir=tmp_path / "host-a", env=envs[0])
    b = make_cloud("cloud-b", data_dir=tmp_path / "host-b", env=envs[1])
    _check_two_workers(a, b, publisher, DEVICES_ODD)


# An odd number of devices: Mosquitto's round robin then hands each device's messages to
# both workers in turn, so sequence state really is shared.
DEVICES_ODD = [f"press-{i:02d}" for i in range(11)]


def _check_two_workers(a, b, publisher, devices, timeout: float = 60) -> None:
    t0 = time.time_ns() - 3600 * NS
    for seq in range(30):
        for d in devices:
            publisher.publish(telemetry_topic(d), batch(d, seq, t0 + seq * NS))
    publisher.flush()
    expect = len(devices) * 30 * 40

    def processed() -> float:
        return a.metric("millstream_ingest_readings_stored_total") + b.metric(
            "millstream_ingest_readings_stored_total"
        )

    wait_until(lambda: processed() >= expect, timeout, 0.3, f"{expect} processed")
    time.sleep(0.5)
    done_a = a.metric("millstream_ingest_readings_stored_total")
    done_b = b.metric("millstream_ingest_readings_stored_total")
    assert done_a > 0 and done_b > 0, (done_a, done_b)
    assert done_a + done_b == expect
    assert a.metric("millstream_ingest_duplicate_messages_total") == 0
    assert b.metric("millstream_ingest_duplicate_messages_total") == 0
    for d in devices:  # the registry is shared: either worker answers for every device
        seq = a.get(f"/api/v1/devices/{d}")["sequence"]
        assert seq["last"] == 29 and seq["missing_seqs"] == [] and seq["duplicates"] == 0
    # every reading once, whichever worker wrote it, seen through either worker's API
    assert stored_count(a, devices) == expect
    assert stored_count(b, devices) == expect


def test_broker_outage_is_logged_counted_and_survived(make_cloud, mosquitto, broker_url):
    from tests.cloud.ingest.conftest import Publisher

    cloud = make_cloud("cloud-o")
    pub = Publisher(broker_url, "pub-1")
    t0 = time.time_ns() - 600 * NS
    for seq in range(5):
        pub.publish(telemetry_topic("o-1"), batch("o-1", seq, t0 + seq * NS))
    pub.close()
    wait_until(lambda: stored_count(cloud, ["o-1"]) == 200)
    mosquitto.stop()
    wait_until(lambda: _not_ready(cloud), 20, 0.2, "readyz 503 while the broker is down")
    time.sleep(2)
    mosquitto.start()
    wait_until(lambda: cloud.metric("millstream_broker_connected") == 1, 40, 0.3, "reconnect")
    pub = Publisher(broker_url, "pub-2")
    for seq in range(5, 10):
        pub.publish(telemetry_topic("o-1"), batch("o-1", seq, t0 + seq * NS))
    pub.close()
    wait_until(lambda: stored_count(cloud, ["o-1"]) == 400, 30, 0.3, "stored after outage")
    assert cloud.metric("millstream_broker_disconnects_total") >= 1
    assert cloud.metric("millstream_broker_outage_seconds_total") >= 2
    assert "disconnected from broker" in cloud.log() and "reconnected to" in cloud.log()


def _not_ready(cloud) -> bool:
    import httpx

    return httpx.get(cloud.url + "/readyz", timeout=5).status_code == 503


def test_second_writer_of_one_embedded_store_refuses_to_start(make_cloud, tmp_path):
    data = tmp_path / "data"
    make_cloud("cloud-a", data_dir=data)
    b = make_cloud("cloud-b", data_dir=data, start=False)
    with pytest.raises(RuntimeError, match="cloud exited"):
        b.start()
    assert "another millstream-cloud ingest process writes the embedded store" in b.log()


def test_retire_drains_the_queued_share_and_deletes_the_session(
    make_cloud, publisher, broker_url, tmp_path
):
    import subprocess
    import sys

    # With detection.feed: all it also has a session of its own for detection.
    cloud = make_cloud("cloud-r", env={"MILLSTREAM_DETECTION__FEED": "all"})
    cloud.stop()  # offline, but its persistent session stays in the group
    t0 = time.time_ns() - 600 * NS
    for seq in range(20):
        publisher.publish(telemetry_topic("r-1"), batch("r-1", seq, t0 + seq * NS))
    publisher.flush()  # all 20 queued at the broker for cloud-r
    out = subprocess.run(
        [sys.executable, "-m", "millstream_cloud.cli", "retire", "--client-id", "cloud-r",
         "--broker", broker_url, "--data-dir", str(cloud.data_dir), "--idle", "1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "20 queued messages stored and acked" in out.stdout
    # the sessions are gone: resuming them finds nothing
    assert not _session_present(broker_url, "cloud-r")
    assert not _session_present(broker_url, "cloud-r-detect")
    cloud.start()  # a fresh worker on that data dir finds the drained readings stored
    assert stored_count(cloud, ["r-1"]) == 800


def _session_present(broker_url: str, client_id: str) -> bool:
    """Whether the broker still keeps a session for ``client_id`` (resuming it, as MQTT 5
    lets a client ask)."""
    import paho.mqtt.client as mqtt

    seen: dict[str, bool] = {}
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.on_connect = lambda cl, u, flags, rc, p: seen.setdefault("present", flags.session_present)
    c.connect("127.0.0.1", int(broker_url.rsplit(":", 1)[1]), clean_start=False)
    c.loop_start()
    wait_until(lambda: "present" in seen, 10)
    c.disconnect()
    c.loop_stop()
    return seen["present"]
