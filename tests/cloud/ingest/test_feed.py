"""The detecting worker's own subscription (``detection.feed: all``): every device's
messages once each, in order, whatever the shared group does with them."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from millstream_cloud.ingest.decode import Limits
from millstream_cloud.ingest.feed import DetectionFeed
from millstream_cloud.metrics import ServiceMetrics
from millstream_cloud.model import Reading
from millstream_cloud.registry import DeviceRegistry
from millstream_cloud.security.limits import DeviceRateLimiter
from millstream_cloud.settings import IngestSettings, MQTTSettings
from tests.cloud.ingest.conftest import NS, Publisher, batch, telemetry_topic, ts, wait_until

LIMITS = Limits(
    max_payload_bytes=65536,
    max_readings=1000,
    max_metric_length=128,
    future_bound_s=300,
    max_future_s=86400,
)


class Collected:
    """The sink: what the feed hands to detection, group by group."""

    def __init__(self) -> None:
        self.readings: list[Reading] = []
        self.lock = threading.Lock()

    def __call__(self, readings: Sequence[Reading]) -> None:
        with self.lock:
            self.readings.extend(readings)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[DeviceRegistry]:
    reg = DeviceRegistry(tmp_path / "registry.db")
    yield reg
    reg.close()


def _feed(
    registry: DeviceRegistry, sink: Collected, broker: str = "mqtt://127.0.0.1:1", **ingest: object
) -> DetectionFeed:
    return DetectionFeed(
        MQTTSettings(broker=broker, client_id="cloud-a"),
        IngestSettings(**ingest),  # type: ignore[arg-type]
        LIMITS,
        registry,
        sink,
        ServiceMetrics(),
    )


def _outcomes(feed: DetectionFeed) -> dict[str, float]:
    return {
        o: feed.messages.labels(o)._value.get()  # type: ignore[attr-defined]
        for o in ("scored", "duplicate", "rejected")
    }


def test_the_feed_passes_over_what_the_storing_worker_rejects(registry: DeviceRegistry) -> None:
    feed = _feed(registry, Collected(), unknown_devices="reject", max_metrics_per_device=5)
    t0 = time.time_ns() - 60 * NS
    now = time.time_ns()
    registry.ensure("press-01", "plant1", now)
    take = feed.take
    assert len(take(telemetry_topic("press-01"), batch("press-01", 0, t0), now)) == 40
    # a redelivery (QoS 1) or a device resending after a restart: scored once
    assert take(telemetry_topic("press-01"), batch("press-01", 0, t0), now) == []
    # a late message (filling a gap) is not a duplicate
    assert len(take(telemetry_topic("press-01"), batch("press-01", 5, t0 + 5 * NS), now)) == 40
    assert len(take(telemetry_topic("press-01"), batch("press-01", 3, t0 + 3 * NS), now)) == 40
    # not registered, while unknown devices are rejected; then registered: scored
    assert take(telemetry_topic("stranger"), batch("stranger", 0, t0), now) == []
    registry.ensure("stranger", "plant1", now)
    feed._unknown["stranger"] -= 10  # the next lookup is due (REGISTRY_RECHECK_S)
    assert len(take(telemetry_topic("stranger"), batch("stranger", 1, t0), now)) == 40
    # another site's topic for a registered device
    assert take(telemetry_topic("press-01", "plant2"), batch("press-01", 9, t0), now) == []
    # more metrics than a device may have; malformed; over the payload limit
    assert take(telemetry_topic("press-01"), batch("press-01", 10, t0, metrics=6), now) == []
    assert take(telemetry_topic("press-01"), b'{"v": 1, "device": "press-01"', now) == []
    big = batch("press-01", 11, t0, n=1000)
    assert len(big) > LIMITS.max_payload_bytes
    assert take(telemetry_topic("press-01"), big, now) == []
    # and the device's next good message is scored as before
    assert len(take(telemetry_topic("press-01"), batch("press-01", 12, t0 + 12 * NS), now)) == 40
    assert _outcomes(feed) == {"scored": 5, "duplicate": 1, "rejected": 5}


def test_the_feed_applies_the_device_rate_limit(registry: DeviceRegistry) -> None:
    feed = _feed(registry, Collected())
    feed.limiter = DeviceRateLimiter(1.0, 2.0)
    t0 = time.time_ns() - 60 * NS
    got = [len(feed.take(telemetry_topic("d"), batch("d", s, t0), t0)) for s in range(4)]
    assert got == [40, 40, 0, 0]  # a burst of 2, then 1 a second


def test_every_message_once_in_order_from_a_real_broker(
    registry: DeviceRegistry, broker_url: str
) -> None:
    sink = Collected()
    feed = _feed(registry, sink, broker=broker_url)
    feed.start()
    try:
        assert feed.connected.wait(10)  # set on the SUBACK
        pub = Publisher(broker_url, "feed-publisher")
        t0 = time.time_ns() - 600 * NS
        devices = ["a", "b", "c"]
        for seq in range(20):
            for d in devices:
                pub.publish(telemetry_topic(d), batch(d, seq, t0 + seq * NS, n=4, metrics=2))
            if seq == 7:  # a bad neighbour and a redelivered message mid-stream
                pub.publish(telemetry_topic("a"), b"not json")
                pub.publish(telemetry_topic("b"), batch("b", 7, t0 + 7 * NS, n=4, metrics=2))
        # status and other channels are not telemetry: not on this subscription
        status = {"v": 1, "device": "a", "state": "online"}
        pub.publish("millstream/v1/plant1/a/status", json.dumps(status).encode())
        pub.close()
        wait_until(lambda: len(sink.readings) >= 3 * 20 * 4, 20, 0.1, "240 readings")
        time.sleep(0.5)
        assert len(sink.readings) == 240
        for d in devices:
            values = [r.value for r in sink.readings if r.device == d]
            assert values == [float(i) for i in range(80)]  # each once, in the device's order
        assert _outcomes(feed) == {"scored": 60, "duplicate": 1, "rejected": 1}
        assert {r.site for r in sink.readings} == {"plant1"}
        assert ts(sink.readings[0].time_ns).startswith(ts(t0)[:19])
    finally:
        feed.stop()


def test_a_failing_sink_does_not_stop_the_feed(registry: DeviceRegistry, broker_url: str) -> None:
    calls: list[int] = []

    def sink(readings: Sequence[Reading]) -> None:
        calls.append(len(readings))
        if len(calls) == 1:
            raise RuntimeError("detector exploded")

    feed = _feed(registry, Collected(), broker=broker_url)
    feed.sink = sink
    feed.start()
    try:
        assert feed.connected.wait(10)
        pub = Publisher(broker_url, "feed-publisher-2")
        t0 = time.time_ns() - 60 * NS
        pub.publish(telemetry_topic("x"), batch("x", 0, t0))
        pub.flush()
        wait_until(lambda: len(calls) >= 1, 10, 0.05, "first group")
        pub.publish(telemetry_topic("x"), batch("x", 1, t0 + NS))
        pub.close()
        wait_until(lambda: sum(calls) >= 80, 10, 0.05, "the next group after the failure")
    finally:
        feed.stop()


@pytest.mark.parametrize(
    ("mqtt", "feed", "opened"),
    [
        ({}, "all", True),
        ({}, "stored", False),
        ({"protocol": "3.1.1"}, "all", False),  # no shared subscriptions: it gets everything
        ({"shared_group": None}, "all", False),
    ],
)
def test_the_feed_opens_only_where_the_worker_sees_a_share(
    tmp_path: Path, mqtt: dict[str, object], feed: str, opened: bool
) -> None:
    from millstream_cloud.services import Services
    from millstream_cloud.settings import Settings

    settings = Settings(data_dir=str(tmp_path), mqtt=MQTTSettings(**mqtt), detection={"feed": feed})  # type: ignore[arg-type]
    services = Services.build(settings)
    try:
        assert (services.feed is not None) is opened
        # Detection is fed once: by the feed, or by the worker's stored readings.
        hooked = services.anomalies.on_readings in services.pipeline.hooks
        assert hooked is not opened
    finally:
        services.stop()


def test_an_error_taking_one_message_costs_that_message_only(tmp_path: Path) -> None:
    class Flaky(DeviceRegistry):
        """The shared registry, out of reach for one device's lookups."""

        def get(self, device_id: str):  # type: ignore[no-untyped-def]
            if device_id == "unlucky":
                raise OSError("registry unreachable")
            return super().get(device_id)

    registry = Flaky(tmp_path / "flaky.db")
    sink = Collected()
    feed = _feed(registry, sink)
    acked: list[int] = []
    t0 = time.time_ns() - 60 * NS
    for i, device in enumerate(["a", "unlucky", "b"]):
        payload = batch(device, 0, t0, n=4, metrics=2)
        feed._queue.put((telemetry_topic(device), payload, t0, lambda i=i: acked.append(i)))
    feed._thread.start()
    try:
        wait_until(lambda: len(acked) == 3, 10, 0.05, "the group handled and acked")
        assert sorted({r.device for r in sink.readings}) == ["a", "b"]
        assert feed.messages.labels("failed")._value.get() == 1  # type: ignore[attr-defined]
    finally:
        feed.stop()
        registry.close()
