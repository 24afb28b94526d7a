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


def test_slow_store_bounds_unacked_and_queue(tmp_path: Path, broker_url: str, publisher) -> None:
    metrics = ServiceMetrics()
    storage = SlowStorage()
    pipeline = IngestPipeline(
        storage,
        DeviceRegistry(tmp_path / "registry.db"),
        DeadLetterStore(tmp_path / "dl.db"),
        metrics,
        IngestSettings(write_max_delay_s=0.01),
    )
    sub = Subscriber(
        MQTTSettings(broker=broker_url, client_id="bp", receive_maximum=100, ack_batch=50),
        IngestSettings(queue_max_messages=1000, write_max_delay_s=0.01),
        pipeline,
        metrics,
    )
    sub.start()
    try:
        assert sub.connected.wait(10)
        time.sleep(0.3)
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
        # never more than the receive maximum in our hands, whatever the backlog
        assert 0 < peak_unacked <= 100, peak_unacked
        assert peak_queue <= 100, peak_queue
    finally:
        sub.stop()
