"""From received MQTT messages to stored readings: decode, validate, dedup, route, write.

The pipeline works on groups of messages so storage sees few large writes. A message is
acknowledged only after everything it carried is durably stored (or dead-lettered), so a
crash at any point means redelivery, never loss; redelivered points rewrite the same
(series, time) keys, so nothing is stored twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from millstream_cloud.ingest.deadletters import DeadLetterStore
from millstream_cloud.ingest.decode import (
    DecodeError,
    Limits,
    TelemetryBatch,
    decode_status,
    decode_telemetry,
)
from millstream_cloud.metrics import ServiceMetrics
from millstream_cloud.model import Reading
from millstream_cloud.protocol import WireStatus, parse_topic
from millstream_cloud.registry import Device, DeviceRegistry, RegistryTransaction, SeqVerdict
from millstream_cloud.settings import IngestSettings
from millstream_cloud.storage.base import Point, Storage

log = logging.getLogger("millstream.ingest")

ReadingsHook = Callable[[Sequence[Reading]], None]


class RateLimiter(Protocol):
    """Per-device message rate limit (e.g. a token bucket); False rejects the message."""

    def allow(self, device: str, now: float) -> bool: ...


class RemoteSink(Protocol):
    """Where config/reported and command results go (the remote-config service)."""

    def handle(self, topic: str, payload: bytes, arrival_ns: int) -> None: ...


@dataclass(slots=True)
class Message:
    topic: str
    payload: bytes
    arrival_ns: int
    ack: Callable[[], None] | None = None


@dataclass(slots=True)
class GroupResult:
    stored: int = 0
    rejected: int = 0
    duplicates: int = 0
    readings: list[Reading] = field(default_factory=list)


RESTAMPED = "restamped"


def restamp_points(readings: Sequence[Reading]) -> list[Point]:
    """The original source times of readings stored at arrival time, kept beside them:
    measurement ``restamped``, same tags and time as the stored reading, field = metric,
    value = the source timestamp (epoch ns) the device sent."""
    return [
        Point(
            RESTAMPED, {"site": r.site, "device": r.device}, {r.metric: r.source_time_ns}, r.time_ns
        )
        for r in readings
        if r.source_time_ns is not None
    ]


class IngestPipeline:
    def __init__(
        self,
        storage: Storage,
        registry: DeviceRegistry,
        dead_letters: DeadLetterStore,
        metrics: ServiceMetrics,
        settings: IngestSettings,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.storage = storage
        self.registry = registry
        self.dead_letters = dead_letters
        self.metrics = metrics
        self.settings = settings
        self.limits = Limits.of(settings)
        self.hooks: list[ReadingsHook] = []
        self.limiter = limiter
        self.remote: RemoteSink | None = None
        self.stored_total = 0
        self.rejected_total = 0
        self.duplicates_total = 0
        self.messages_total = 0

    def process(self, messages: Sequence[Message]) -> GroupResult:
        """Handle one group; storage errors propagate (the caller retries, acks nothing).

        Decoding runs first, outside any lock. Then one registry transaction covers the
        sequence checks, the storage write and the dead letters, and commits last: if
        anything fails, nothing of the group counts and the caller retries it whole.
        """
        result = GroupResult()
        rejects: list[tuple[int, str, str, str, bytes]] = []
        work: list[tuple[Message, TelemetryBatch | WireStatus, str]] = []
        by_channel: dict[str, int] = {}
        for msg in messages:
            channel = self._channel(msg.topic)
            by_channel[channel] = by_channel.get(channel, 0) + 1
            try:
                if channel == "telemetry":
                    work.append(
                        (
                            msg,
                            decode_telemetry(msg.topic, msg.payload, msg.arrival_ns, self.limits),
                            "",
                        )
                    )
                elif channel == "status":
                    where, status = decode_status(msg.topic, msg.payload)
                    work.append((msg, status, where.site))
                elif channel == "config/reported" or (
                    channel.startswith("cmd/") and channel.endswith("/result")
                ):
                    # Recorded before the group is acked; idempotent if the group is retried.
                    if self.remote is not None:
                        self.remote.handle(msg.topic, msg.payload, msg.arrival_ns)
                elif channel == "invalid":
                    raise DecodeError(
                        "bad_topic",
                        f"topic {msg.topic!r} is not millstream/v1/<site>/<device>/<channel>",
                    )
                else:
                    raise DecodeError(
                        "unknown_channel", f"topic {msg.topic!r}: unknown channel {channel!r}"
                    )
            except DecodeError as exc:
                rejects.append((msg.arrival_ns, msg.topic, exc.reason, str(exc), msg.payload))
        readings: list[Reading] = []
        duplicates = gaps = late = restamped = skewed = 0
        if work:
            with self.registry.transaction() as txn:
                txn.load({self._device_of(m, item) for m, item, _ in work})
                for msg, item, site in work:
                    try:
                        if isinstance(item, TelemetryBatch):
                            verdict, gap, kept = self._admit(txn, item)
                            if verdict == SeqVerdict.DUPLICATE:
                                duplicates += 1
                                continue
                            gaps += gap
                            late += verdict == SeqVerdict.LATE
                            if kept:
                                readings.extend(kept)
                                restamped += item.restamped
                                if abs(item.skew_s) > self.settings.clock_skew_bound_s:
                                    skewed += 1
                        else:
                            txn.set_status(
                                item.device,
                                site,
                                item.state == "online",
                                msg.arrival_ns,
                                kind=item.kind,
                                agent_version=item.agent_version,
                                metadata=dict(item.metadata) if item.metadata else None,
                            )
                    except DecodeError as exc:
                        rejects.append(
                            (msg.arrival_ns, msg.topic, exc.reason, str(exc), msg.payload)
                        )
                if readings:
                    t0 = time.perf_counter()
                    kinds = {d: dev.kind for d, dev in txn.devices.items() if dev.kind is not None}
                    self.storage.write_readings(readings, kinds)
                    if restamped:
                        self.storage.write_points(restamp_points(readings))
                    self.metrics.write_latency.observe(time.perf_counter() - t0)
                self.dead_letters.add_many(rejects)
        else:
            self.dead_letters.add_many(rejects)
        # Counted only now: a failed group is retried and must not be counted twice.
        for channel, n in by_channel.items():
            self.metrics.messages.labels(channel).inc(n)
        for _, topic, reason, err, _ in rejects:
            self.metrics.rejected.labels(reason).inc()
            log.warning("rejected message on %s: %s: %s", topic, reason, err)
        if duplicates:
            self.metrics.duplicates.inc(duplicates)
        if gaps:
            self.metrics.gaps.inc(gaps)
        if late:
            self.metrics.late.inc(late)
        if restamped:
            self.metrics.restamped.inc(restamped)
        if skewed:
            self.metrics.clock_skewed.inc(skewed)
        result.stored = len(readings)
        result.rejected = len(rejects)
        result.duplicates = duplicates
        result.readings = readings
        self.stored_total += len(readings)
        self.rejected_total += len(rejects)
        self.duplicates_total += duplicates
        self.messages_total += len(messages)
        self.metrics.readings_stored.inc(len(readings))
        if messages:
            self.metrics.lag.set((time.time_ns() - messages[0].arrival_ns) / 1e9)
        for hook in self.hooks:
            try:
                hook(readings)
            except Exception:  # a hook (detector, alerting) must never stop ingest
                log.exception("readings hook %r failed", hook)
        return result

    @staticmethod
    def _channel(topic: str) -> str:
        parsed = parse_topic(topic)
        return parsed.channel if parsed else "invalid"

    @staticmethod
    def _device_of(msg: Message, item: TelemetryBatch | WireStatus) -> str:
        return item.device

    def _admit(
        self, txn: RegistryTransaction, batch: TelemetryBatch
    ) -> tuple[str, int, list[Reading] | None]:
        """Sequence, rate and cardinality checks: (verdict, gap, readings to store).

        The sequence number is consumed before the other checks, so a message rejected
        for its content is not mistaken for a gap, nor stored when it is redelivered.
        """
        dev = txn.get(batch.device)
        if dev is None:
            if self.settings.unknown_devices == "reject":
                raise DecodeError("unknown_device", f"device {batch.device!r} is not registered")
            dev = txn.ensure(batch.device, batch.site, batch.arrival_ns)
        elif dev.site != batch.site:
            raise DecodeError(
                "site_mismatch",
                f"device {batch.device!r} belongs to site {dev.site!r}, not {batch.site!r}",
            )
        verdict, gap = txn.check_seq(dev, batch.seq)
        if verdict == SeqVerdict.DUPLICATE:
            return verdict, 0, None
        if gap:
            log.warning("device %s: sequence gap of %d before seq %d", batch.device, gap, batch.seq)
        txn.seen(dev, batch.arrival_ns)
        try:
            self._check_content(dev, batch)
        except DecodeError:
            dev.rejected += 1
            raise
        if batch.restamped:
            dev.restamped += batch.restamped
        skewed = abs(batch.skew_s) > self.settings.clock_skew_bound_s
        if skewed and not dev.clock_skewed:
            log.warning(
                "device %s: clock off by %.1fs (bound %.1fs)",
                batch.device,
                batch.skew_s,
                self.settings.clock_skew_bound_s,
            )
        if skewed or dev.clock_skewed:
            dev.clock_skewed = skewed
            dev.clock_skew_s = batch.skew_s
        elif abs(batch.skew_s - dev.clock_skew_s) > 0.5:
            dev.clock_skew_s = batch.skew_s
        return verdict, gap, batch.readings

    def _check_content(self, dev: Device, batch: TelemetryBatch) -> None:
        new = check_content(batch, dev.metrics, self.limiter, self.settings.max_metrics_per_device)
        if new:
            dev.metrics |= new
            dev.dirty = True


def check_content(
    batch: TelemetryBatch, metrics: set[str], limiter: RateLimiter | None, max_metrics: int
) -> set[str]:
    """The device's rate and metric cardinality limits on one batch (DecodeError when
    over); the metrics it adds to ``metrics``, the device's so far (empty: none)."""
    if limiter is not None and not limiter.allow(batch.device, time.time()):
        raise DecodeError("rate_limited", f"device {batch.device!r} is over its message rate limit")
    for r in batch.readings:
        if r.metric not in metrics:
            break
    else:
        return set()
    new = {r.metric for r in batch.readings} - metrics
    if len(metrics) + len(new) > max_metrics:
        raise DecodeError(
            "cardinality",
            f"device {batch.device!r} would have {len(metrics) + len(new)} metrics; "
            f"the limit is {max_metrics}",
        )
    return new
