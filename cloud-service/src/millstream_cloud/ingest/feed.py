"""Every device's telemetry for the detecting worker, on a subscription of its own.

Workers on one shared subscription each store a round-robin share of every device's
messages, so a detector fed by its worker's share learns and judges from every other
batch. With ``detection.feed: all`` the worker that runs detection also subscribes to all
telemetry outside the group (client id ``<client_id>-detect``) and scores that: every
message of every device, in the order each device sent it. It stores nothing (the group
does), so it only repeats the checks that decide what detection may see: decoding and
its limits, a known device on its own site when unknown devices are rejected, the
per-device metric and rate limits, and duplicates (QoS 1 redelivery) by sequence number.
Messages it passes over are counted, not dead-lettered: the storing worker dead-letters
them with the reason.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from prometheus_client import Counter

from millstream_cloud.ingest.decode import DecodeError, Limits, TelemetryBatch, decode_telemetry
from millstream_cloud.ingest.pipeline import RateLimiter, check_content
from millstream_cloud.ingest.subscriber import connect_persistent, make_client, parse_broker_url
from millstream_cloud.metrics import ServiceMetrics
from millstream_cloud.model import Reading
from millstream_cloud.registry import DeviceRegistry
from millstream_cloud.settings import IngestSettings, MQTTSettings

log = logging.getLogger("millstream.detection.feed")

TOPIC = "millstream/v1/+/+/telemetry"
SEQS_KEPT = 1024  # per device: a redelivery comes within the last in-flight window
DEVICES_KEPT = 100_000  # least recently seen forgotten first (forged ids cannot grow memory)
REGISTRY_RECHECK_S = 5.0  # an unknown device is looked up again after this (a known one 12x)


@dataclass
class _Device:
    site: str
    seqs: set[int] = field(default_factory=set)
    order: deque[int] = field(default_factory=deque)
    metrics: set[str] = field(default_factory=set)
    checked: float = 0.0  # time.monotonic() of the last registry lookup

    def first_time(self, seq: int) -> bool:
        """False when ``seq`` was seen lately (a duplicate); records it otherwise."""
        if seq in self.seqs:
            return False
        self.seqs.add(seq)
        self.order.append(seq)
        if len(self.order) > SEQS_KEPT:
            self.seqs.discard(self.order.popleft())
        return True


class DetectionFeed:
    """Decoded telemetry of every device, from a non-shared subscription, handed to
    ``sink`` (the anomaly sink's ``on_readings``) one group at a time."""

    def __init__(
        self,
        mqtt_settings: MQTTSettings,
        ingest_settings: IngestSettings,
        limits: Limits,
        registry: DeviceRegistry,
        sink: Callable[[Sequence[Reading]], None],
        metrics: ServiceMetrics,
        limiter: RateLimiter | None = None,
        owns: Callable[[str], bool] | None = None,
    ) -> None:
        self.settings = mqtt_settings
        self.ingest = ingest_settings
        self.limits = limits
        self.registry = registry
        self.sink = sink
        self.limiter = limiter
        self.owns = owns  # detection.shards: the devices this worker scores
        self.client_id = f"{mqtt_settings.client_id}-detect"
        self.messages = Counter(
            "millstream_detection_feed_messages",
            "Telemetry messages on the detecting worker's own subscription (detection.feed: "
            "all), by outcome: scored, duplicate, rejected (dead-lettered by the storing "
            "worker), failed (an error, logged), elsewhere (a device another detection "
            "shard scores)",
            ["outcome"],
            registry=metrics.registry,
        )
        self.connected = threading.Event()
        self._devices: OrderedDict[str, _Device] = OrderedDict()
        self._unknown: dict[str, float] = {}  # device -> when the registry did not know it
        self._queue: queue.Queue[tuple[str, bytes, int, Callable[[], None]]] = queue.Queue(
            maxsize=ingest_settings.queue_max_messages
        )
        self._stop = threading.Event()
        self._generation = 0
        self._thread = threading.Thread(target=self._loop, name="detection-feed", daemon=True)
        self.client = make_client(mqtt_settings, self.client_id, manual_ack=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    # -- what detection may see --------------------------------------------------------

    def take(self, topic: str, payload: bytes, arrival_ns: int) -> list[Reading]:
        """The readings of one message that detection should score (none for a duplicate
        or a message the storing worker rejects); counts the outcome."""
        if self.owns is not None:
            # Another shard's device: passed over before decoding, which is most of the
            # cost, so each shard's worker pays for its own devices' messages only.
            parts = topic.split("/")
            if len(parts) == 5 and not self.owns(parts[3]):
                self.messages.labels("elsewhere").inc()
                return []
        try:
            batch = decode_telemetry(topic, payload, arrival_ns, self.limits)
            dev = self._device(batch)
            if not dev.first_time(batch.seq):
                self.messages.labels("duplicate").inc()
                return []
            max_metrics = self.ingest.max_metrics_per_device
            dev.metrics |= check_content(batch, dev.metrics, self.limiter, max_metrics)
        except DecodeError as exc:
            self.messages.labels("rejected").inc()
            log.debug("detection feed passes over %s: %s: %s", topic, exc.reason, exc)
            return []
        self.messages.labels("scored").inc()
        return batch.readings

    def _device(self, batch: TelemetryBatch) -> _Device:
        now = time.monotonic()
        dev = self._devices.get(batch.device)
        if dev is None or now - dev.checked > REGISTRY_RECHECK_S * 12:
            dev = self._lookup(batch, dev, now)
        else:
            self._devices.move_to_end(batch.device)
        if dev.site != batch.site:
            raise DecodeError(
                "site_mismatch",
                f"device {batch.device!r} belongs to site {dev.site!r}, not {batch.site!r}",
            )
        return dev

    def _lookup(self, batch: TelemetryBatch, dev: _Device | None, now: float) -> _Device:
        """The shared registry's word on a device, asked again after a while (an operator
        may register it, or the storing worker record it, meanwhile)."""
        refused = self._unknown.get(batch.device)
        reject = self.ingest.unknown_devices == "reject"
        if reject and refused is not None and now - refused < REGISTRY_RECHECK_S:
            raise DecodeError("unknown_device", f"device {batch.device!r} is not registered")
        known = self.registry.get(batch.device)
        if known is None and reject:
            if len(self._unknown) >= DEVICES_KEPT:
                self._unknown.clear()
            self._unknown[batch.device] = now
            self._devices.pop(batch.device, None)
            raise DecodeError("unknown_device", f"device {batch.device!r} is not registered")
        self._unknown.pop(batch.device, None)
        if dev is None:
            dev = self._devices[batch.device] = _Device(known.site if known else batch.site)
            if len(self._devices) > DEVICES_KEPT:
                self._devices.popitem(last=False)
        elif known is not None:
            dev.site = known.site
        dev.checked = now
        return dev

    # -- MQTT --------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        # A persistent session: what arrives while this worker restarts is scored after.
        connect_persistent(self.client, self.settings)

    def stop(self, timeout: float = 10.0) -> None:
        """Hand on and ack what was received, then disconnect (the rest stays queued at
        the broker for this session)."""
        self._stop.set()
        if self._thread.ident is not None:  # started
            self._thread.join(timeout)
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(
        self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object
    ) -> None:
        if getattr(rc, "is_failure", False):
            log.error(
                "detection feed: broker %s refused the connection: %s", self.settings.broker, rc
            )
            return
        self._generation += 1
        client.subscribe([(TOPIC, 1)])

    def _on_subscribe(
        self, client: mqtt.Client, userdata: object, mid: int, codes: list[Any], props: object
    ) -> None:
        if any(getattr(c, "is_failure", False) for c in codes):
            log.error("detection feed: the broker refused the subscription to %s: %s", TOPIC, codes)
            return
        log.info("detection feed: subscribed to %s as %s", TOPIC, self.client_id)
        self.connected.set()  # ready only once messages will come (readyz waits for it)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object
    ) -> None:
        self.connected.clear()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        if self._stop.is_set():
            return  # not acked: the broker keeps it for this session
        mid, qos, generation = msg.mid, msg.qos, self._generation

        def ack() -> None:
            if qos > 0 and generation == self._generation:
                client.ack(mid, qos)

        # Blocks when the feed is behind: the broker then holds the backlog.
        self._queue.put((msg.topic, msg.payload, time.time_ns(), ack))

    def _loop(self) -> None:
        while not (self._stop.is_set() and self._queue.empty()):
            try:
                first = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            group = [first]
            while len(group) < self.settings.ack_batch:
                try:
                    group.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            readings: list[Reading] = []
            for topic, payload, arrival_ns, _ in group:
                try:
                    readings.extend(self.take(topic, payload, arrival_ns))
                except Exception:  # the registry unreachable, say: the next may do
                    self.messages.labels("failed").inc()
                    log.exception("detection feed: taking a message on %s failed", topic)
            try:
                self.sink(readings)
            except Exception:  # detection must never stop the feed
                log.exception("detection feed: scoring %d readings failed", len(readings))
            for *_, ack in group:
                ack()


def delete_session(settings: MQTTSettings, timeout_s: float = 10.0) -> bool:
    """Delete the feed's session of a worker retired for good (``<client_id>-detect``):
    left, the broker would queue every device's telemetry for it until it expires. What
    it holds is lost to detection only: the shared group stores all of it. True once the
    broker has accepted the clean connection."""
    host, port, _ = parse_broker_url(settings.broker)
    client = make_client(settings, f"{settings.client_id}-detect", clean=True)
    accepted = threading.Event()
    client.on_connect = lambda *args: accepted.set()
    if settings.protocol == "3.1.1":
        client.connect(host, port, keepalive=settings.keepalive_s)
    else:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 0
        client.connect(
            host, port, keepalive=settings.keepalive_s, clean_start=True, properties=props
        )
    client.loop_start()
    try:
        return accepted.wait(timeout_s)
    finally:
        client.disconnect()
        client.loop_stop()
