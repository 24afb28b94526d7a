"""A slow store slows the subscriber down; memory stays bounded by the in-flight window."""

from __future__ import annotations

import time
from pathlib import Path

from millstream_cloud.ingest.deadletters import DeadLetterStore
from millstream_cloud.ingest.pipeline import IngestPipeline
from millstream_cloud.ingest.subscriber import Subscriber
from millstream_cloud.metrics import ServiceMetrics
from millstream_cloud.registry import DeviceRegistry
from millstream_cloud.settings import IngestSettings, MQTTSettings
from tests.cloud.ingest.conftest import NS, batch, telemetry_topic, wait_until
from tests.cloud.ingest.test_registry_shared import CountingStorage


class SlowStorage(CountingStorage):
    def write_readings(self, readings, kinds=None):  # type: ignore[no-untyped-def]
        time.sleep(0.25)
        super().write_readings(readings, kinds)


def _subscriber(
    tmp_path: Path,
    storage: CountingStorage,
    mqtt: MQTTSettings,
    ingest: IngestSettings,
    pipeline_settings: IngestSettings | None = None,
) -> Subscriber:
    """A started subscriber writing to ``storage`` through a real pipeline, connected."""
    metrics = ServiceMetrics()
    pipeline = IngestPipeline(
        storage,
        DeviceRegistry(tmp_path / "registry.db"),
        DeadLetterStore(tmp_path / "dl.db"),
        metrics,
        pipeline_settings or IngestSettings(write_max_delay_s=0.01),
    )
    sub = Subscriber(mqtt, ingest, pipeline, metrics)
    sub.start()
    if not sub.connected.wait(10):
        sub.stop()
        raise AssertionError(f"the subscriber did not connect to {mqtt.broker}")
    time.sleep(0.3)
    return sub


def test_slow_store_bounds_what_is_held(tmp_path: Path, broker_url: str, publisher) -> None:
    storage = SlowStorage()
    sub = _subscriber(
        tmp_path,
        storage,
        MQTTSettings(broker=broker_url, client_id="bp", receive_maximum=100, ack_batch=50),
        IngestSettings(queue_max_messages=150, write_max_delay_s=0.01),
    )
    try:
        t0 = time.time_ns() - 600 * NS
        for seq in range(600):
            publisher.publish(telemetry_topic("bp-1"), batch("bp-1", seq, t0 + seq * NS, n=2))
        publisher.flush()  # the broker has them all; the cloud is far behind
        peak_queue = peak_unacked = 0
        deadline = time.monotonic() + 60
        while storage.written < 1200 and time.monotonic() < deadline:
            peak_queue = max(peak_queue, sub.queue.qsize())
            peak_unacked = max(peak_unacked, sub._unacked)
            time.sleep(0.01)
        wait_until(lambda: storage.written == 1200, 30)
        # Mosquitto 2.0 honours the receive maximum (100) only until the first acks, then
        # sends the whole backlog: the bound that holds is ours, the queue (150) plus
        # the group being written (50) plus the message paho is handing over.
        assert 100 < peak_unacked <= 150 + 50 + 1, peak_unacked
        assert peak_queue <= 150, peak_queue
    finally:
        sub.stop()


def test_byte_bound_holds_back_large_messages(tmp_path: Path, broker_url: str, publisher) -> None:
    storage = SlowStorage()
    sub = _subscriber(
        tmp_path,
        storage,
        MQTTSettings(broker=broker_url, client_id="bp2", ack_batch=20),
        IngestSettings(queue_max_bytes=1024 * 1024, write_max_delay_s=0.01),
        IngestSettings(),
    )
    try:
        t0 = time.time_ns() - 600 * NS
        for seq in range(200):  # ~100 KB each: 20 MB in all
            publisher.publish(telemetry_topic("bp-2"), batch("bp-2", seq, t0 + seq * NS, n=1000))
        publisher.flush()
        peak = 0
        deadline = time.monotonic() + 60
        while storage.written < 200_000 and time.monotonic() < deadline:
            peak = max(peak, sub._held_bytes)
            time.sleep(0.01)
        assert storage.written == 200_000
        # at most the bound plus the one message that crossed it
        assert 0 < peak <= 1024 * 1024 + 110_000, peak
    finally:
        sub.stop()


def test_ingest_is_busy_under_a_burst_not_under_a_fleets_trickle(
    tmp_path: Path, broker_url: str, publisher
) -> None:
    """Detection paces itself while ``receiving()`` (AnomalySink): a fleet's live messages,
    one a device a second, leave it free to score at full speed (else it would skip an
    agent's replayed backlog); a burst of messages is busy."""
    storage = CountingStorage()
    sub = _subscriber(
        tmp_path,
        storage,
        MQTTSettings(broker=broker_url, client_id="busy"),
        IngestSettings(write_max_delay_s=0.01),
    )
    try:
        t0 = time.time_ns() - 3600 * NS
        samples = []
        for seq in range(20):  # ten devices' live messages: 10 a second
            publisher.publish(telemetry_topic("trickle-1"), batch("trickle-1", seq, t0 + seq * NS))
            for _ in range(10):
                samples.append(sub.receiving())
                time.sleep(0.01)
        wait_until(lambda: storage.written == 20 * 40, 10)
        assert samples.count(True) <= len(samples) // 10, samples
        busy = False
        for seq in range(400):  # a backlog replayed as fast as the broker takes it
            publisher.publish(telemetry_topic("burst-1"), batch("burst-1", seq, t0 + seq * NS))
            busy = busy or sub.receiving()
        publisher.flush()
        deadline = time.monotonic() + 10
        while not busy and time.monotonic() < deadline and storage.written < 800 + 16_000:
            busy = sub.receiving()
        assert busy
        wait_until(lambda: storage.written == 800 + 16_000, 30)
    finally:
        sub.stop()
