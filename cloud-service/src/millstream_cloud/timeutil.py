"""Durations and timestamps as people and InfluxDB write them."""

from __future__ import annotations

import re
from datetime import datetime, timezone

from millstream_cloud.protocol import format_ts

NS = 1_000_000_000
_UNITS = {
    "ns": 1,
    "u": 1_000,
    "µs": 1_000,
    "us": 1_000,
    "ms": 1_000_000,
    "s": NS,
    "m": 60 * NS,
    "h": 3600 * NS,
    "d": 86400 * NS,
    "w": 7 * 86400 * NS,
}
_DURATION = re.compile(r"(\d+)(ns|us|µs|u|ms|s|m|h|d|w)")


def parse_duration_ns(text: str) -> int:
    """InfluxDB-style duration (``10s``, ``1m``, ``1h30m``, ``1d``) to nanoseconds."""
    text = text.strip()
    pos, total = 0, 0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            break
        total += int(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or total <= 0:
        raise ValueError(f"{text!r} is not a duration like 10s, 1m, 1h or 1d")
    return total


def parse_time_ns(text: str) -> int:
    """RFC 3339 (any offset; naive means UTC) to epoch nanoseconds."""
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace(" ", "T"))
    except ValueError:
        raise ValueError(f"{text!r} is not an RFC 3339 time like 2026-01-31T12:00:00Z") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    whole = int(dt.replace(microsecond=0).timestamp())
    return whole * NS + dt.microsecond * 1000


def rfc3339(time_ns: int) -> str:
    return format_ts(time_ns)
