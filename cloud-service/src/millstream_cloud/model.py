"""The data every stage of the cloud passes along: readings in, anomalies out."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec


class Reading(msgspec.Struct, frozen=True, gc=False):
    """One validated reading, as the ingest pipeline hands it to storage and detectors.

    ``time_ns`` is the source timestamp in UTC nanoseconds (InfluxDB's native precision),
    or the arrival time when the device's clock could not be trusted (then
    ``source_time_ns`` keeps the original).

    A msgspec Struct rather than a frozen dataclass: same constructor, attributes,
    equality and hashing, but built about ten times faster (0.2 against 2.9 us), and
    ingest builds one per reading (bench/ingest_throughput.py).
    """

    device: str
    site: str
    metric: str
    time_ns: int
    value: float
    unit: str | None = None
    quality: str = "good"
    source_time_ns: int | None = None


@dataclass(slots=True)
class Contribution:
    """How far one metric was from its normal level when an anomaly was raised."""

    metric: str
    value: float
    expected: float
    sigma: float  # signed distance from normal in robust standard deviations


@dataclass(slots=True)
class Anomaly:
    """A detector's verdict that a device (or one of its metrics) left its normal behaviour."""

    device: str
    site: str
    time_ns: int
    detector: str
    score: float  # detector's raw score, higher is more anomalous
    likelihood: float  # calibrated, 0..1
    metric: str | None = None  # None for a multivariate (whole-device) anomaly
    explanation: str = ""
    contributions: list[Contribution] = field(default_factory=list)
