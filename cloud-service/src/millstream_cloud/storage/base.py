"""The storage interface every backend implements, and the query model it answers.

The logical model is InfluxDB's, so one model serves the embedded store, InfluxDB 1.x,
2.x and 3.x, and the InfluxQL ``/query`` endpoint Grafana talks to:

* measurement ``telemetry``: tags ``site``, ``device``, ``kind``; one field per metric;
* measurement ``anomalies``: tags ``site``, ``device``, ``metric``, ``detector``;
  fields ``score``, ``likelihood``, ``explanation``;
* measurement ``alerts``: tags ``alertname``, ``site``, ``device``, ``severity``, ``state``;
  fields ``value``, ``summary``.
* measurement ``anomaly_feedback``: the tags and time of the anomaly judged; fields
  ``verdict``, ``comment``, ``author``.
* measurement ``missed_faults``: tags ``site``, ``device``, ``metric`` (optional), at the
  fault's start; fields ``end_ns``, ``comment``, ``author``.

Writes are idempotent per (measurement, tag set, time): writing the same point twice
stores it once (last write wins), as in InfluxDB. That is what lets a redelivered MQTT
message be written again safely.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from millstream_cloud.model import Reading

FieldValue = float | int | bool | str

TELEMETRY = "telemetry"
ANOMALIES = "anomalies"
ALERTS = "alerts"
DETECTION_EVENTS = "detection_events"  # e.g. a device re-baselined (relearn)
ANOMALY_FEEDBACK = "anomaly_feedback"  # an operator's verdict on an anomaly
MISSED_FAULTS = "missed_faults"  # a fault an operator saw and no detector raised

AGGREGATES = ("mean", "min", "max", "last", "first", "count", "sum")


@dataclass(slots=True, frozen=True)
class Point:
    """One point in InfluxDB's model: measurement, tags, fields, time (UTC ns)."""

    measurement: str
    tags: Mapping[str, str]
    fields: Mapping[str, FieldValue]
    time_ns: int


@dataclass(slots=True)
class SeriesQuery:
    """A range query over one measurement.

    ``tags`` are equality filters (all must match). With ``every_ns`` and ``agg`` the
    points are grouped into buckets aligned to the epoch (InfluxDB's ``GROUP BY time``);
    a bucket's time is its start, and empty buckets are left out (``fill(none)``).
    ``group_by`` splits the result into one series per distinct value of those tags.
    """

    measurement: str
    fields: Sequence[str]
    tags: Mapping[str, str] = field(default_factory=dict)
    start_ns: int | None = None  # inclusive
    end_ns: int | None = None  # exclusive
    every_ns: int | None = None
    agg: str | None = None
    group_by: Sequence[str] = ()
    limit: int | None = None


@dataclass(slots=True)
class Series:
    """The answer for one field and one group of tags, points in time order."""

    field: str
    tags: dict[str, str]
    points: list[tuple[int, FieldValue]]


class Storage(abc.ABC):
    """A storage backend. Implementations register themselves by ``name``."""

    name: ClassVar[str]

    @abc.abstractmethod
    def write_points(self, points: Sequence[Point]) -> None:
        """Store the points durably before returning (the caller then acks the broker)."""

    def write_readings(
        self, readings: Sequence[Reading], kinds: Mapping[str, str] | None = None
    ) -> None:
        """Store telemetry readings: one point per reading in ``telemetry``."""
        self.write_points(readings_to_points(readings, kinds or {}))

    @abc.abstractmethod
    def query(self, query: SeriesQuery) -> list[Series]:
        """Answer a range query; see :class:`SeriesQuery`."""

    @abc.abstractmethod
    def latest(
        self, measurement: str, tags: Mapping[str, str]
    ) -> dict[str, tuple[int, FieldValue]]:
        """The newest (time, value) of every field of the series matching ``tags``."""

    @abc.abstractmethod
    def measurements(self) -> list[str]: ...

    @abc.abstractmethod
    def field_keys(self, measurement: str) -> dict[str, str]:
        """Field name -> InfluxDB type name (``float``, ``integer``, ``boolean``, ``string``)."""

    @abc.abstractmethod
    def tag_keys(self, measurement: str) -> list[str]: ...

    @abc.abstractmethod
    def tag_values(
        self, measurement: str, key: str, tags: Mapping[str, str] | None = None
    ) -> list[str]:
        """Distinct values of tag ``key`` among series matching ``tags``."""

    def ping(self) -> bool:
        """True when the backend can take writes now (used by ``/readyz``)."""
        return True

    def stats(self) -> dict[str, float]:
        """Backend counters and gauges for ``/metrics`` (name -> value); none by default."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Flush and release resources."""


def device_readings(
    storage: Storage, device: str, site: str, start_ns: int, end_ns: int
) -> list[Reading]:
    """The device's numeric telemetry in [start, end), in time order (a replay's input)."""
    metrics = sorted(storage.field_keys(TELEMETRY))
    if not metrics:
        return []
    series = storage.query(SeriesQuery(TELEMETRY, metrics, {"device": device}, start_ns, end_ns))
    out = [
        Reading(device, site, s.field, t, float(v))
        for s in series
        for t, v in s.points
        if isinstance(v, int | float) and not isinstance(v, bool)
    ]
    out.sort(key=lambda r: (r.time_ns, r.metric))
    return out


def row_batches(readings: Sequence[Reading], size: int) -> Iterator[Sequence[Reading]]:
    """Time-ordered readings in slices of about ``size``, never splitting one timestamp's
    readings (a device row) between two detector calls."""
    begin = 0
    while begin < len(readings):
        cut = min(begin + size, len(readings))
        while cut < len(readings) and readings[cut].time_ns == readings[cut - 1].time_ns:
            cut += 1
        yield readings[begin:cut]
        begin = cut


def readings_to_points(readings: Iterable[Reading], kinds: Mapping[str, str]) -> list[Point]:
    """Telemetry readings as points; ``kinds`` maps device id to its machine kind."""
    points = []
    for r in readings:
        tags = {"site": r.site, "device": r.device}
        kind = kinds.get(r.device)
        if kind:
            tags["kind"] = kind
        points.append(Point(TELEMETRY, tags, {r.metric: r.value}, r.time_ns))
    return points


_BACKENDS: dict[str, type[Storage]] = {}


def register(cls: type[Storage]) -> type[Storage]:
    """Class decorator: make a backend selectable by ``storage.backend: <name>``."""
    _BACKENDS[cls.name] = cls
    return cls


def backend_names() -> list[str]:
    """The names ``storage.backend`` may take: the built-in two, and any registered."""
    return sorted({"embedded", "influxdb", *_BACKENDS})


def backend_class(name: str) -> type[Storage]:
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown storage backend {name!r}; known: {', '.join(sorted(_BACKENDS))}"
        ) from None
