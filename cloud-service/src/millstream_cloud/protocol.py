"""Wire contract v1 (docs/protocol.md), the cloud's side: topics and message shapes.

Decoding is done by msgspec (C speed, and it rejects NaN/Infinity tokens, unknown keys and
wrong types itself); the extra rules JSON Schema states (patterns, finiteness, limits)
are checked here so the decoder accepts exactly what docs/schemas/ accepts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Literal

import msgspec

VERSION = 1
TOPIC_ROOT = "millstream/v1"
ID_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
METRIC_RE = r"^[A-Za-z][A-Za-z0-9_.-]{0,127}$"
TS_RE = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?Z$"
ID_PATTERN = re.compile(ID_RE)

Id = Annotated[str, msgspec.Meta(pattern=ID_RE)]
Timestamp = Annotated[str, msgspec.Meta(pattern=TS_RE)]
MetricName = Annotated[str, msgspec.Meta(pattern=METRIC_RE)]

# Channels a device may publish on (the cloud subscribes to these).
DEVICE_CHANNELS = frozenset({"telemetry", "status", "config/reported"})


class WireReading(msgspec.Struct, forbid_unknown_fields=True):
    ts: Timestamp
    metric: MetricName
    value: float | bool
    unit: Annotated[str, msgspec.Meta(max_length=32)] | None = None
    quality: Literal["good", "uncertain", "bad"] = "good"


class WireTelemetry(msgspec.Struct, forbid_unknown_fields=True):
    v: Literal[1]
    device: Id
    seq: Annotated[int, msgspec.Meta(ge=0, le=9223372036854775807)]
    readings: Annotated[list[WireReading], msgspec.Meta(min_length=1, max_length=10000)]
    sent_at: Timestamp | None = None
    clock: Literal["synced", "unsynced"] = "synced"


class WireStatus(msgspec.Struct, forbid_unknown_fields=True):
    v: Literal[1]
    device: Id
    state: Literal["online", "offline"]
    reason: Literal["connected", "shutdown", "connection-lost"] | None = None
    ts: Timestamp | None = None
    agent_version: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    kind: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    metadata: dict[str, str | float | bool] | None = None


class WireConfigDesired(msgspec.Struct, forbid_unknown_fields=True):
    v: Literal[1]
    revision: Annotated[int, msgspec.Meta(ge=1)]
    config: dict[str, object]


class WireConfigReported(msgspec.Struct, forbid_unknown_fields=True):
    v: Literal[1]
    revision: Annotated[int, msgspec.Meta(ge=0)]
    status: Literal["accepted", "rejected"]
    reason: str | None = None
    config: dict[str, object] | None = None
    ts: str | None = None


class WireCommand(msgspec.Struct, forbid_unknown_fields=True):
    v: Literal[1]
    id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    args: dict[str, object] | None = None


class WireCommandResult(msgspec.Struct, forbid_unknown_fields=True):
    v: Literal[1]
    id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    ok: bool
    result: object = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Topic:
    site: str
    device: str
    channel: str


def topic(site: str, device: str, channel: str) -> str:
    return f"{TOPIC_ROOT}/{site}/{device}/{channel}"


def parse_topic(name: str) -> Topic | None:
    """Split ``millstream/v1/<site>/<device>/<channel>``; None if it is not one of ours."""
    parts = name.split("/", 4)
    if len(parts) != 5 or parts[0] != "millstream" or parts[1] != "v1":
        return None
    site, device, channel = parts[2], parts[3], parts[4]
    if not ID_PATTERN.match(site) or not ID_PATTERN.match(device):
        return None
    return Topic(site, device, channel)


def parse_ts_ns(ts: str) -> int:
    """RFC 3339 UTC (``...Z``, up to ns) to epoch nanoseconds, without float rounding."""
    from calendar import timegm

    date, _, clock = ts[:-1].partition("T")
    secs_part, _, frac = clock.partition(".")
    y, mo, d = int(date[0:4]), int(date[5:7]), int(date[8:10])
    h, mi, s = int(secs_part[0:2]), int(secs_part[3:5]), int(secs_part[6:8])
    if not (1 <= mo <= 12 and 1 <= d <= 31 and h <= 23 and mi <= 59 and s <= 60):
        raise ValueError(f"invalid timestamp {ts!r}")
    seconds = timegm((y, mo, d, h, mi, s, 0, 0, 0))
    return seconds * 1_000_000_000 + (int(frac.ljust(9, "0")) if frac else 0)


def format_ts(time_ns: int) -> str:
    """Epoch ns as RFC 3339 UTC with the precision the value has (s, ms, us or ns)."""
    import time as _time

    secs, frac = divmod(time_ns, 1_000_000_000)
    base = _time.strftime("%Y-%m-%dT%H:%M:%S", _time.gmtime(secs))
    if frac == 0:
        return base + "Z"
    digits = f"{frac:09d}".rstrip("0")
    width = 3 if len(digits) <= 3 else 6 if len(digits) <= 6 else 9
    return f"{base}.{digits.ljust(width, '0')}Z"
