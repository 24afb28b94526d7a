"""Durations and timestamps as people and InfluxDB write them."""

from __future__ import annotations

import re
import time
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


_FRACTION = re.compile(r"(T\d\d:\d\d:\d\d)\.(\d+)")
_RELATIVE = re.compile(r"now(?:\s*([+-])\s*(\S+))?")


def parse_time_ns(text: str, now_ns: int | None = None) -> int:
    """RFC 3339 (any offset; naive means UTC), or a time relative to now as Grafana
    writes it (``now``, ``now-1h``, ``now+30m``), to epoch nanoseconds.

    Fractions are kept to the nanosecond (``datetime`` stops at microseconds), so a time
    the API printed with 9 digits names the same instant when it is sent back.
    ``now_ns``: the caller's now (its clock), else the system's."""
    relative = _RELATIVE.fullmatch(text.strip())
    if relative:
        now = time.time_ns() if now_ns is None else now_ns
        sign, span = relative.groups()
        if sign is None:
            return now
        try:
            delta = parse_duration_ns(span)
        except ValueError as exc:
            raise ValueError(f"{text!r}: {exc}") from None
        return _held(now + delta if sign == "+" else now - delta, text)
    iso = text.strip().replace("Z", "+00:00").replace(" ", "T")
    frac_ns = 0
    m = _FRACTION.search(iso)
    if m:
        digits = m.group(2)
        frac_ns = int(digits[:9].ljust(9, "0"))
        iso = iso[: m.end(1)] + iso[m.end() :]
    try:
        dt = datetime.fromisoformat(iso)
    except ValueError:
        raise ValueError(
            f"{text!r} is not an RFC 3339 time like 2026-01-31T12:00:00Z, "
            "nor one relative to now like now-1h"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return _held(int(dt.timestamp()) * NS + frac_ns, text)


def _held(ns: int, text: str) -> int:
    """``ns`` if a 64-bit nanosecond time holds it (as in InfluxDB), else an error."""
    if not -(2**63) < ns < 2**63:
        raise ValueError(f"{text!r} is out of range: times from 1677-09-22 to 2262-04-11")
    return ns


def rfc3339(time_ns: int) -> str:
    return format_ts(time_ns)
