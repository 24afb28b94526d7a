"""Exactly once through a SIGKILL of the cloud, and two workers on one shared subscription."""

from __future__ import annotations

import threading
import time

from tests.cloud.ingest.conftest import NS, batch, stored_count, telemetry_topic, wait_until

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


def test_two_workers_split_the_load_and_store_each_reading_once(make_cloud, publisher, tmp_path):
    data = tmp_path / "shared-data"
    a = make_cloud("cloud-a", data_dir=data)
    b = make_cloud("cloud-b", data_dir=data)
    _publish_stream(publisher, 30)  # 10 devices x 30 messages x 40 = 12,000 readings

    def processed() -> float:
        return a.metric("millstream_ingest_readings_stored_total") + b.metric(
            "millstream_ingest_readings_stored_total"
        )

    wait_until(lambda: processed() >= 12_000, 60, 0.3, "12,000 processed")
    time.sleep(0.5)
    done_a = a.metric("millstream_ingest_readings_stored_total")
    done_b = b.metric("millstream_ingest_readings_stored_total")
    assert done_a > 0 and done_b > 0, (done_a, done_b)
    assert done_a + done_b == 12_000
    assert a.metric("millstream_ingest_duplicate_messages_total") == 0
    assert b.metric("millstream_ingest_duplicate_messages_total") == 0
    for d in DEVICES:  # the registry is shared: either worker answers for every device
        seq = a.get(f"/api/v1/devices/{d}")["sequence"]
        assert seq["last"] == 29 and seq["gaps"] == 0 and seq["duplicates"] == 0
    a.stop()
    b.stop()
    # Read the shared data dir afresh: every reading once, whichever worker wrote it.
    from millstream_cloud.services import Services
    from millstream_cloud.settings import load_settings
    from millstream_cloud.storage.base import TELEMETRY, SeriesQuery

    svc = Services.build(load_settings(overrides={"data_dir": str(data)}), with_subscriber=False)
    try:
        total = 0
        for d in DEVICES:
            for s in svc.storage.query(
                SeriesQuery(TELEMETRY, ["m0", "m1", "m2", "m3"], {"device": d}, 0, 2**62)
            ):
                assert len({t for t, _ in s.points}) == len(s.points)
                total += len(s.points)
        assert total == 12_000
    finally:
        svc.stop()


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
