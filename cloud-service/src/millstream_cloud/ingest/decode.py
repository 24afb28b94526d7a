"""Decode and validate one telemetry message against wire contract v1.

Every rejection raises :class:`DecodeError` with a stable ``reason`` (the label of the
dead-letter counter) and a message that says what and where, e.g.
``readings[3].value: NaN is not a finite number``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Literal

import msgspec

from millstream_cloud.model import Reading
from millstream_cloud.protocol import ID_RE, METRIC_RE, Topic, WireStatus, parse_topic, parse_ts_ns

if TYPE_CHECKING:
    from millstream_cloud.settings import IngestSettings

NS = 1_000_000_000
# Before this a device clock is not set (a Pi boots at 1970 until NTP answers).
PLAUSIBLE_SINCE_NS = 946_684_800 * NS  # 2000-01-01T00:00:00Z


class DecodeError(ValueError):
    """A message that breaks the contract; ``reason`` names the rule for counting."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Limits:
    """What one message may carry; see docs/cloud.md for why each default."""

    max_payload_bytes: int = 256 * 1024
    max_readings: int = 10_000
    max_metric_length: int = 128
    future_bound_s: float = 300.0  # further ahead: stored at arrival time, original kept
    max_future_s: float = 365 * 86400.0  # further ahead still: rejected as garbage

    @classmethod
    def of(cls, ingest: IngestSettings) -> Limits:
        """The limits the ``ingest.*`` settings say."""
        return cls(
            max_payload_bytes=ingest.max_payload_bytes,
            max_readings=ingest.max_readings_per_message,
            max_metric_length=ingest.max_metric_length,
            future_bound_s=ingest.future_bound_s,
            max_future_s=ingest.max_future_s,
        )


@dataclass(slots=True)
class TelemetryBatch:
    site: str
    device: str
    seq: int
    readings: list[Reading]
    arrival_ns: int
    clock_synced: bool = True
    restamped: int = 0  # readings stored at arrival time because their clock was off
    # Device clock minus ours (s): from ``sent_at`` when given, else the furthest-ahead
    # reading (readings behind arrival are normal: store-and-forward buffering).
    skew_s: float = 0.0
    notes: list[str] = field(default_factory=list)


# The hot path decodes into Structs without per-string patterns (msgspec checks patterns
# with Python's re, which was 3/4 of the decoding time) and checks timestamps, metric
# names and the device id here, through caches: a fleet repeats a few thousand metric
# names and one timestamp second per reading group. What is accepted is exactly what
# protocol.WireTelemetry (and docs/schemas/telemetry.schema.json) accepts.
class _FastReading(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    ts: str
    metric: str
    value: float | bool
    unit: Annotated[str, msgspec.Meta(max_length=32)] | None = None
    quality: Literal["good", "uncertain", "bad"] = "good"


class _FastTelemetry(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    v: Literal[1]
    device: str
    seq: Annotated[int, msgspec.Meta(ge=0, le=9223372036854775807)]
    readings: Annotated[list[_FastReading], msgspec.Meta(min_length=1, max_length=10000)]
    sent_at: str | None = None
    clock: Literal["synced", "unsynced"] = "synced"


_telemetry_decoder = msgspec.json.Decoder(_FastTelemetry)
_status_decoder = msgspec.json.Decoder(WireStatus)
_TS_HEAD = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\Z")
_METRIC = re.compile(METRIC_RE)
_ID = re.compile(ID_RE)
_good_metrics: set[str] = set()
_ts_cache: dict[str, int] = {}  # whole timestamps: the readings of one time share one


def check_topic(topic_name: str, channel: str | None = None) -> Topic:
    parsed = parse_topic(topic_name)
    if parsed is None:
        raise DecodeError(
            "bad_topic", f"topic {topic_name!r} is not millstream/v1/<site>/<device>/<channel>"
        )
    if channel is not None and parsed.channel != channel:
        raise DecodeError(
            "unknown_channel", f"topic {topic_name!r}: unknown channel {parsed.channel!r}"
        )
    return parsed


_seconds_cache: dict[str, int] = {}


def _ts_ns(ts: str) -> int:
    """RFC 3339 UTC (``YYYY-MM-DDTHH:MM:SS[.f{1,9}]Z``) to epoch ns; ValueError if not.

    The whole-second part is cached: readings of one batch share few distinct seconds,
    and the calendar arithmetic was most of the cost of a reading.
    """
    head = ts[:19]
    secs = _seconds_cache.get(head)
    if secs is None:
        if not _TS_HEAD.match(head):
            raise ValueError(ts)
        secs = parse_ts_ns(head + "Z") // NS
        if len(_seconds_cache) >= 100_000:
            _seconds_cache.clear()
        _seconds_cache[head] = secs
    n = len(ts)
    if n == 20 and ts[19] == "Z":
        return secs * NS
    frac = ts[20:-1]
    if 22 <= n <= 30 and ts[19] == "." and ts[-1] == "Z" and frac.isdigit() and frac.isascii():
        return secs * NS + int(frac.ljust(9, "0"))
    raise ValueError(ts)


_NON_FINITE = re.compile(rb"\bNaN\b|\bInfinity\b")


def _schema_error(
    exc: msgspec.ValidationError | msgspec.DecodeError, payload: bytes
) -> DecodeError:
    text = str(exc)
    if "Number out of range" in text:
        return DecodeError("non_finite", f"{text}: not a finite number")
    if isinstance(exc, msgspec.ValidationError):
        return DecodeError("schema", f"schema: {text}")
    if _NON_FINITE.search(payload):
        return DecodeError("non_finite", f"not JSON: {text} (NaN and Infinity are not allowed)")
    return DecodeError("not_json", f"not JSON: {text}")


def decode_telemetry(
    topic_name: str, payload: bytes, arrival_ns: int, limits: Limits | None = None
) -> TelemetryBatch:
    """Validate a telemetry message and turn it into readings ready to store."""
    limits = limits or Limits()
    if len(payload) > limits.max_payload_bytes:
        raise DecodeError(
            "oversize",
            f"payload of {len(payload)} bytes exceeds the limit of {limits.max_payload_bytes}",
        )
    where = check_topic(topic_name, "telemetry")
    try:
        msg = _telemetry_decoder.decode(payload)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise _schema_error(exc, payload) from None
    if msg.device != where.device:
        if not _ID.match(msg.device):
            raise DecodeError("schema", f"device: {msg.device!r} is not a valid device id")
        raise DecodeError(
            "topic_mismatch",
            f"payload device {msg.device!r} does not match topic device {where.device!r}",
        )
    if len(msg.readings) > limits.max_readings:
        raise DecodeError(
            "too_many_readings",
            f"{len(msg.readings)} readings in one message; the limit is {limits.max_readings}",
        )
    synced = msg.clock == "synced"
    site, device = where.site, where.device
    batch = TelemetryBatch(site, device, msg.seq, [], arrival_ns, synced)
    future_ns = int(limits.future_bound_s * NS)
    reject_ns = int(limits.max_future_s * NS)
    max_len = limits.max_metric_length
    readings = batch.readings
    append = readings.append
    good_metrics = _good_metrics
    ts_cache = _ts_cache
    isfinite = math.isfinite
    max_ahead = 0
    untrusted: list[tuple[int, int]] = []  # (index, source ts) of readings to restamp
    for i, r in enumerate(msg.readings):
        value = r.value
        if value.__class__ is bool:
            value = 1.0 if value else 0.0
        elif not isfinite(value):
            raise DecodeError("non_finite", f"readings[{i}].value: {value} is not a finite number")
        metric = r.metric
        if metric not in good_metrics:
            if not _METRIC.match(metric):
                raise DecodeError(
                    "schema", f"readings[{i}].metric: {metric!r} is not a valid metric name"
                )
            if len(good_metrics) >= 100_000:
                good_metrics.clear()
            good_metrics.add(metric)
        if len(metric) > max_len:
            raise DecodeError("metric_name", f"readings[{i}].metric: longer than {max_len}")
        ts = ts_cache.get(r.ts)
        if ts is None:
            try:
                ts = _ts_ns(r.ts)
            except ValueError:
                raise DecodeError(
                    "schema", f"readings[{i}].ts: {r.ts!r} is not a valid date"
                ) from None
            if len(ts_cache) >= 100_000:
                ts_cache.clear()
            ts_cache[r.ts] = ts
        ahead = ts - arrival_ns
        if ahead > max_ahead:
            if ahead > reject_ns:
                raise DecodeError(
                    "timestamp_out_of_range",
                    f"readings[{i}].ts: {r.ts} is {ahead / NS / 86400:.0f} days in the future",
                )
            if ahead > future_ns:
                untrusted.append((i, ts))
            else:
                max_ahead = ahead
        elif not synced or ts < PLAUSIBLE_SINCE_NS:
            untrusted.append((i, ts))
        append(Reading(device, site, metric, ts, value, r.unit, r.quality))
    if untrusted:
        _restamp(readings, untrusted, arrival_ns)
        batch.restamped = len(untrusted)
    sent_ns = None
    if msg.sent_at is not None:
        try:
            sent_ns = _ts_ns(msg.sent_at)
        except ValueError:
            raise DecodeError("schema", f"sent_at: {msg.sent_at!r} is not a valid date") from None
    if sent_ns is not None and synced:
        batch.skew_s = (sent_ns - arrival_ns) / NS
    else:
        batch.skew_s = max_ahead / NS
    return batch


RESTAMP_MAX_SPAN_NS = 86400 * NS


def _restamp(readings: list[Reading], untrusted: list[tuple[int, int]], arrival_ns: int) -> None:
    """Store untrusted readings at arrival time, keeping their spacing.

    The batch is shifted so its newest untrusted reading lands on the arrival time (the
    readings were taken before they arrived), so readings of one metric stay distinct and
    in order. When the source times span more than a day they are not spacing either:
    then the readings are stored 1 ns apart, in message order, ending at arrival time.
    """
    newest = max(ts for _, ts in untrusted)
    oldest = min(ts for _, ts in untrusted)
    n = len(untrusted)
    for k, (i, ts) in enumerate(untrusted):
        r = readings[i]
        t = (
            arrival_ns - (newest - ts)
            if newest - oldest <= RESTAMP_MAX_SPAN_NS
            else arrival_ns - (n - 1 - k)
        )
        readings[i] = Reading(r.device, r.site, r.metric, t, r.value, r.unit, r.quality, ts)


def decode_status(topic_name: str, payload: bytes) -> tuple[Topic, WireStatus]:
    where = check_topic(topic_name, "status")
    try:
        msg = _status_decoder.decode(payload)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise _schema_error(exc, payload) from None
    if msg.device != where.device:
        raise DecodeError(
            "topic_mismatch",
            f"payload device {msg.device!r} does not match topic device {where.device!r}",
        )
    return where, msg
