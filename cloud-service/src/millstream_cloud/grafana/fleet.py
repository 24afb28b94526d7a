"""The fleet measurements the fleet dashboard reads: ``devices`` and ``ingest``.

Telemetry cannot say that a device is offline (a silent device writes nothing), nor how
fast the service ingests; so the service writes that state itself, periodically:

* ``devices`` (tags ``site``, ``device``, ``kind``; fields ``online`` and ``offline``,
  integers 1/0) every 30 s, for every device of the registry;
* ``ingest`` (tag ``instance``; fields ``readings``, ``rejected``, ``duplicates``,
  integers counted over the period, and ``rate``, readings per second) every 10 s, per
  ingest worker.

Timestamps are truncated to the period, so each device has exactly one point per 30 s
bucket (``sum("online")`` per ``time(30s)`` is the number of devices online) and a
rewrite after a restart replaces rather than duplicates.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from millstream_cloud.storage.base import Point, Storage

log = logging.getLogger("millstream.grafana.fleet")

DEVICES = "devices"
INGEST = "ingest"
S = 1_000_000_000
DEVICES_PERIOD_NS = 30 * S
INGEST_PERIOD_NS = 10 * S


def device_points(
    devices: Iterable[Any], now_ns: int, period_ns: int = DEVICES_PERIOD_NS
) -> list[Point]:
    """One ``devices`` point per registry device (``id``, ``site``, ``kind``, ``online``)."""
    t = now_ns - now_ns % period_ns
    points = []
    for d in devices:
        tags = {"site": d.site, "device": d.id}
        if d.kind:
            tags["kind"] = d.kind
        on = bool(d.online)
        points.append(Point(DEVICES, tags, {"online": int(on), "offline": int(not on)}, t))
    return points


def _counter_total(counter: Any) -> float:
    """The sum of a prometheus_client Counter over all its labels."""
    total = 0.0
    for metric in counter.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                total += sample.value
    return total


class IngestSampler:
    """Turns the service's ingest counters into ``ingest`` points (deltas per period)."""

    def __init__(self, metrics: Any, instance: str) -> None:
        self.metrics = metrics
        self.instance = instance
        self._last: tuple[int, float, float, float] | None = None

    def _totals(self) -> tuple[float, float, float]:
        m = self.metrics
        return (
            _counter_total(m.readings_stored),
            _counter_total(m.rejected),
            _counter_total(m.duplicates),
        )

    def sample(self, now_ns: int, period_ns: int = INGEST_PERIOD_NS) -> Point | None:
        """The point for the period ending now; None on the first call (no baseline)."""
        readings, rejected, duplicates = self._totals()
        last, self._last = self._last, (now_ns, readings, rejected, duplicates)
        if last is None:
            return None
        elapsed_s = max((now_ns - last[0]) / S, 1e-9)
        n = int(readings - last[1])
        return Point(
            INGEST,
            {"instance": self.instance},
            {
                "readings": n,
                "rejected": int(rejected - last[2]),
                "duplicates": int(duplicates - last[3]),
                "rate": n / elapsed_s,
            },
            now_ns - now_ns % period_ns,
        )


class FleetWriter:
    """A background thread writing ``devices`` every 30 s and ``ingest`` every 10 s.

    ``registry`` needs ``all()`` (devices with ``id``, ``site``, ``kind``, ``online``),
    ``metrics`` the ingest counters of :class:`millstream_cloud.metrics.ServiceMetrics`.
    """

    def __init__(
        self,
        storage: Storage,
        registry: Any,
        metrics: Any,
        instance: str,
        clock: Callable[[], int] = time.time_ns,
        tick_s: float = 1.0,
    ) -> None:
        self.storage = storage
        self.registry = registry
        self.sampler = IngestSampler(metrics, instance)
        self.clock = clock
        self.tick_s = tick_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_devices = -1
        self._last_ingest = -1

    def tick(self) -> int:
        """Write what is due now; returns the number of points written."""
        now = self.clock()
        points: list[Point] = []
        if now // DEVICES_PERIOD_NS != self._last_devices:
            self._last_devices = now // DEVICES_PERIOD_NS
            points += device_points(self.registry.all(), now)
        if now // INGEST_PERIOD_NS != self._last_ingest:
            self._last_ingest = now // INGEST_PERIOD_NS
            p = self.sampler.sample(now)
            if p is not None:
                points.append(p)
        if points:
            self.storage.write_points(points)
        return len(points)

    def _run(self) -> None:
        while not self._stop.wait(self.tick_s):
            try:
                self.tick()
            except Exception:
                log.exception("fleet measurements: write failed")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fleet-writer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
