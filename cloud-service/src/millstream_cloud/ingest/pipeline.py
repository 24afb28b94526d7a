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
from millstream_cloud.protocol import parse_topic
from millstream_cloud.registry import DeviceRegistry, SeqVerdict
from millstream_cloud.settings import IngestSettings
from millstream_cloud.storage.base import Storage

log = logging.getLogger("millstream.ingest")

ReadingsHook = Callable[[Sequence[Reading]], None]


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


class IngestPipeline:
    def __init__(
        self,
        storage: Storage,
        registry: DeviceRegistry,
        dead_letters: DeadLetterStore,
        metrics: ServiceMetrics,
        settings: IngestSettings,
    ) -> None:
        self.storage = storage
        self.registry = registry
        self.dead_letters = dead_letters
        self.metrics = metrics
        self.settings = settings
        self.limits = Limits(
            max_payload_bytes=settings.max_payload_bytes,
            max_readings=settings.max_readings_per_message,
            max_metric_length=settings.max_metric_length,
            future_bound_s=settings.future_bound_s,
            max_future_s=settings.max_future_s,
        )
        self.hooks: list[ReadingsHook] = []
        self.stored_total = 0
        self.rejected_total = 0

    def process(self, messages: Sequence[Message]) -> GroupResult:
        """Handle one group; storage errors propagate (the caller retries, acks nothing)."""
        result = GroupResult()
        rejects: list[tuple[int, str, str, str, bytes]] = []
        touched = {}
        readings: list[Reading] = []
        for msg in messages:
            channel = self._channel(msg.topic)
            self.metrics.messages.labels(channel).inc()
            try:
                if channel == "telemetry":
                    batch = decode_telemetry(msg.topic, msg.payload, msg.arrival_ns, self.limits)
                    kept = self._admit(batch)
                    if kept is None:
                        result.duplicates += 1
                        continue
                    readings.extend(kept)
                    touched[batch.device] = self.registry.get(batch.device)
                elif channel == "status":
                    self._status(msg)
                elif channel in ("config/reported",) or channel.startswith("cmd/"):
                    continue  # handled by the remote-config service when present
                else:
                    raise DecodeError(
                        "unknown_channel", f"topic {msg.topic!r}: unknown channel {channel!r}"
                    )
            except DecodeError as exc:
                rejects.append((msg.arrival_ns, msg.topic, exc.reason, str(exc), msg.payload))
                self.metrics.rejected.labels(exc.reason).inc()
                log.warning("rejected message on %s: %s: %s", msg.topic, exc.reason, exc)
        if readings:
            t0 = time.perf_counter()
            kinds = {d: dev.kind for d, dev in touched.items() if dev is not None and dev.kind}
            self.storage.write_readings(readings, kinds)
            self.metrics.write_latency.observe(time.perf_counter() - t0)
        self.registry.flush([d for d in touched.values() if d is not None])
        self.dead_letters.add_many(rejects)
        result.stored = len(readings)
        result.rejected = len(rejects)
        result.readings = readings
        self.stored_total += len(readings)
        self.rejected_total += len(rejects)
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

    def _admit(self, batch: TelemetryBatch) -> list[Reading] | None:
        """Sequence and cardinality checks; None when the message is a duplicate."""
        dev = self.registry.get(batch.device)
        if dev is None:
            if self.settings.unknown_devices == "reject":
                raise DecodeError("unknown_device", f"device {batch.device!r} is not registered")
            dev = self.registry.ensure(batch.device, batch.site, batch.arrival_ns)
        elif dev.site != batch.site:
            raise DecodeError(
                "site_mismatch",
                f"device {batch.device!r} belongs to site {dev.site!r}, not {batch.site!r}",
            )
        new_metrics = {r.metric for r in batch.readings} - dev.metrics
        if new_metrics:
            if len(dev.metrics) + len(new_metrics) > self.settings.max_metrics_per_device:
                raise DecodeError(
                    "cardinality",
                    f"device {batch.device!r} would have {len(dev.metrics) + len(new_metrics)} metrics; "
                    f"the limit is {self.settings.max_metrics_per_device}",
                )
            dev.metrics |= new_metrics
        verdict, gap = self.registry.check_seq(dev, batch.seq)
        if verdict == SeqVerdict.DUPLICATE:
            self.metrics.duplicates.inc()
            return None
        if gap:
            self.metrics.gaps.inc(gap)
            log.warning("device %s: sequence gap of %d before seq %d", batch.device, gap, batch.seq)
        if batch.restamped:
            dev.restamped += batch.restamped
            self.metrics.restamped.inc(batch.restamped)
        if batch.max_skew_s > self.settings.clock_skew_bound_s:
            if dev.clock_skew_s <= self.settings.clock_skew_bound_s:
                log.warning(
                    "device %s: clock %.1fs ahead of arrival", batch.device, batch.max_skew_s
                )
            dev.clock_skew_s = batch.max_skew_s
        self.registry.seen(dev, batch.arrival_ns)
        return batch.readings

    def _status(self, msg: Message) -> None:
        where, status = decode_status(msg.topic, msg.payload)
        self.registry.set_status(
            where.device,
            where.site,
            status.state == "online",
            msg.arrival_ns,
            kind=status.kind,
            agent_version=status.agent_version,
            metadata=dict(status.metadata) if status.metadata else None,
        )
