"""Decode and validate one telemetry message against wire contract v1.

Every rejection raises :class:`DecodeError` with a stable ``reason`` (the label of the
dead-letter counter) and a message that says what and where, e.g.
``readings[3].value: NaN is not a finite number``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import msgspec

from millstream_cloud.model import Reading
from millstream_cloud.protocol import Topic, WireStatus, WireTelemetry, parse_topic, parse_ts_ns

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


@dataclass(slots=True)
class TelemetryBatch:
    site: str
    device: str
    seq: int
    readings: list[Reading]
    arrival_ns: int
    clock_synced: bool = True
    restamped: int = 0  # readings stored at arrival time because their clock was off
    max_skew_s: float = 0.0  # largest |source - arrival| among kept source timestamps
    notes: list[str] = field(default_factory=list)


_telemetry_decoder = msgspec.json.Decoder(WireTelemetry)
_status_decoder = msgspec.json.Decoder(WireStatus)


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
    batch = TelemetryBatch(where.site, where.device, msg.seq, [], arrival_ns, synced)
    future_ns = int(limits.future_bound_s * NS)
    reject_ns = int(limits.max_future_s * NS)
    readings = batch.readings
    for i, r in enumerate(msg.readings):
        value = r.value
        if isinstance(value, bool):
            value = 1.0 if value else 0.0
        elif not math.isfinite(value):
            raise DecodeError("non_finite", f"readings[{i}].value: {value} is not a finite number")
        if len(r.metric) > limits.max_metric_length:
            raise DecodeError(
                "metric_name", f"readings[{i}].metric: longer than {limits.max_metric_length}"
            )
        try:
            ts = parse_ts_ns(r.ts)
        except ValueError:
            raise DecodeError("schema", f"readings[{i}].ts: {r.ts!r} is not a valid date") from None
        ahead = ts - arrival_ns
        if ahead > reject_ns:
            raise DecodeError(
                "timestamp_out_of_range",
                f"readings[{i}].ts: {r.ts} is {ahead / NS / 86400:.0f} days in the future",
            )
        if not synced or ahead > future_ns or ts < PLAUSIBLE_SINCE_NS:
            readings.append(
                Reading(
                    where.device,
                    where.site,
                    r.metric,
                    arrival_ns,
                    float(value),
                    r.unit,
                    r.quality,
                    ts,
                )
            )
            batch.restamped += 1
        else:
            skew = abs(ahead) / NS
            if skew > batch.max_skew_s and ahead > 0:
                batch.max_skew_s = skew
            readings.append(
                Reading(where.device, where.site, r.metric, ts, float(value), r.unit, r.quality)
            )
    return batch


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
