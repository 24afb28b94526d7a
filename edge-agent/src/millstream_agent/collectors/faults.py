"""Fault injection for the simulated machine, with ground truth for scoring detectors.

A fault changes one or more metrics of one device for an interval. Magnitudes are in
units of the metric's noise standard deviation (sigma), so "1.0" means the same thing
for a vibration in mm/s and a pressure in bar. Types:

========  ==================================================  ==========  =========
type      effect                                              duration    magnitude
========  ==================================================  ==========  =========
drift     bearing wear: linear rise from 0 to magnitude*sigma  1h          1.0
overheat  temperatures rise towards +magnitude*sigma           30m         30
stuck     the sensor repeats one value, no noise               20m         -
spike     +magnitude*sigma on the samples in the interval      1s          10
shift     a small level shift of magnitude*sigma               30m         3
dropout   the device sends no samples at all                  5m          -
========  ==================================================  ==========  =========

A fault becomes active at the first ``collect`` at or after its planned start; that
moment is the ground-truth start and ``start + duration`` its end, so the recorded
interval is exactly what the data contains. Each active fault is appended to
``ground_truth`` (and to a JSONL file when one is configured) when it starts.

Faults draw from their own random generator, so the same seed gives the same machine
signals with faults on or off: a clean and a faulty run differ only inside the faults.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

from millstream_agent.collectors._options import (
    check_keys,
    format_rfc3339,
    parse_duration,
    parse_rfc3339,
)

# type -> (default duration s, default magnitude in sigma, weight in the random schedule)
FAULT_TYPES: dict[str, tuple] = {
    "drift": (3600.0, 1.0, 1.0),
    "overheat": (1800.0, 30.0, 1.0),
    "stuck": (1200.0, 0.0, 1.0),
    "spike": (1.0, 10.0, 2.0),
    "shift": (1800.0, 3.0, 1.0),
    "dropout": (300.0, 0.0, 1.0),
}
_FAULT_KEYS = ("type", "metric", "metrics", "start", "duration", "magnitude")


@dataclass
class Fault:
    """One fault: which metrics, when (planned), for how long, how strong."""

    type: str
    metrics: list[str]
    duration: float
    magnitude: float
    start: Optional[float] = None  # absolute epoch seconds
    start_after: Optional[float] = None  # seconds after the collector's first collect
    auto: bool = False  # drawn by the random schedule (which keeps one at a time)
    # Set when the fault becomes active.
    active_start: Optional[float] = None
    indices: Sequence[int] = ()
    frozen: Optional[list[float]] = None

    @property
    def active_end(self) -> float:
        assert self.active_start is not None
        return self.active_start + self.duration


class MetricInfo:
    """What the fault plan needs to know about the machine's metrics."""

    def __init__(self, names: list[str], sigmas: list[float]) -> None:
        self.names = names
        self.sigmas = sigmas
        self.index = {n: i for i, n in enumerate(names)}
        self.vibration = [n for n in names if "vibration" in n]
        self.temperature = [n for n in names if "temperature" in n and not n.startswith("ambient")]


def default_metrics(fault_type: str, info: MetricInfo) -> list[str]:
    """The metrics a fault of this type hits when the config does not name them."""
    if fault_type == "dropout":
        return list(info.names)
    if fault_type == "drift" and info.vibration:
        return info.vibration[:1]
    if fault_type == "overheat" and info.temperature:
        return list(info.temperature)
    return info.names[:1]


def parse_faults(value: Any, info: MetricInfo, key: str = "faults") -> list[Fault]:
    """Explicit faults from the config: a list of ``{type, metric(s), start, duration, ...}``."""
    if not isinstance(value, list):
        raise ValueError(f"{key}: expected 'auto', 'none' or a list of faults, got {value!r}")
    faults = []
    for n, item in enumerate(value):
        where = f"{key}[{n}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected a mapping with type, start, ..., got {item!r}")
        check_keys(item, _FAULT_KEYS, where + ".")
        fault_type = item.get("type")
        if fault_type not in FAULT_TYPES:
            raise ValueError(
                f"{where}.type: expected one of {', '.join(FAULT_TYPES)}, got {fault_type!r}"
            )
        default_duration, default_magnitude, _ = FAULT_TYPES[fault_type]
        if "metric" in item and "metrics" in item:
            raise ValueError(f"{where}: give either metric or metrics, not both")
        if "metric" in item:
            metrics = [item["metric"]]
        elif "metrics" in item:
            metrics = item["metrics"]
            if not isinstance(metrics, list) or not metrics:
                raise ValueError(f"{where}.metrics: expected a non-empty list of metric names")
        else:
            metrics = default_metrics(fault_type, info)
        for m in metrics:
            if m not in info.index:
                raise ValueError(
                    f"{where}.metric: {m!r} is not a metric of this machine; "
                    f"it has: {', '.join(info.names)}"
                )
        if "start" not in item:
            raise ValueError(
                f"{where}.start: required (e.g. 10m after start, or 2026-01-31T08:00:00Z)"
            )
        start_value = item["start"]
        start: Optional[float] = None
        start_after: Optional[float] = None
        if isinstance(start_value, str) and "T" in start_value.upper()[:11] and "-" in start_value:
            start = parse_rfc3339(start_value, f"{where}.start")
        else:
            start_after = parse_duration(start_value, f"{where}.start")
        duration = parse_duration(item.get("duration", default_duration), f"{where}.duration")
        if duration <= 0:
            raise ValueError(f"{where}.duration: must be positive (a spike lasts 1s)")
        magnitude = item.get("magnitude", default_magnitude)
        if isinstance(magnitude, bool) or not isinstance(magnitude, (int, float)):
            raise ValueError(f"{where}.magnitude: expected a number (in sigmas), got {magnitude!r}")
        faults.append(
            Fault(fault_type, list(metrics), duration, float(magnitude), start, start_after)
        )
    return faults


class FaultPlan:
    """Decides which faults are active at a time and records them as ground truth.

    ``update(now)`` must be called when ``now >= next_event``; between events the
    simulator only reads ``active`` (usually empty), which keeps ``collect`` cheap.
    """

    def __init__(
        self,
        info: MetricInfo,
        rng: random.Random,
        device: str,
        collector: str,
        kind: str,
        explicit: Optional[list[Fault]] = None,
        rate_per_hour: float = 0.0,
        types: Optional[list[str]] = None,
        start_after: float = 0.0,
        ground_truth_path: Optional[str] = None,
    ) -> None:
        self.info = info
        self.rng = rng
        self.device = device
        self.collector = collector
        self.kind = kind
        self.pending: list[Fault] = list(explicit or [])
        self.rate = rate_per_hour
        self.types = list(types or FAULT_TYPES)
        self.start_after = start_after
        self.path = ground_truth_path
        self.active: list[Fault] = []
        self.ground_truth: list[dict[str, Any]] = []
        self.dropout = False
        self.next_event = -math.inf
        self._origin: Optional[float] = None
        self._auto_next: Optional[float] = None

    # -- scheduling -----------------------------------------------------------------
    def _resolve(self, now: float) -> None:
        self._origin = now
        for fault in self.pending:
            if fault.start is None:
                fault.start = now + (fault.start_after or 0.0)
        if self.rate > 0:
            self._auto_next = now + self.start_after + self._gap()

    def _gap(self) -> float:
        return self.rng.expovariate(self.rate / 3600.0)

    def _draw(self, start: float) -> Fault:
        weights = [FAULT_TYPES[t][2] for t in self.types]
        fault_type = self.rng.choices(self.types, weights)[0]
        duration, magnitude, _ = FAULT_TYPES[fault_type]
        metrics = default_metrics(fault_type, self.info)
        if fault_type in ("stuck", "spike", "shift"):
            metrics = [self.rng.choice(self.info.names)]
        elif fault_type == "drift" and self.info.vibration:
            metrics = [self.rng.choice(self.info.vibration)]
        elif fault_type == "overheat" and self.info.temperature:
            pass  # every machine temperature but the ambient (default_metrics)
        elif fault_type in ("drift", "overheat"):
            # This machine has no such sensor among its metrics: a level shift instead.
            fault_type, metrics = "shift", [self.rng.choice(self.info.names)]
            duration, magnitude, _ = FAULT_TYPES["shift"]
        if fault_type != "spike":
            duration *= self.rng.uniform(0.5, 1.5)
        magnitude *= self.rng.uniform(0.75, 1.5)
        if fault_type in ("spike", "shift") and self.rng.random() < 0.5:
            magnitude = -magnitude
        return Fault(fault_type, metrics, round(duration, 3), round(magnitude, 3), start, auto=True)

    def update(self, now: float, values: list[float]) -> None:
        """Start and end faults due at ``now``; ``values`` are the clean values at ``now``."""
        if self._origin is None:
            self._resolve(now)
        still = []
        for fault in self.active:
            if now < fault.active_end:
                still.append(fault)
        ended = len(still) != len(self.active)
        self.active = still
        if ended and self._auto_next is None and self.rate > 0 and not self._auto_active():
            self._auto_next = now + self._gap()
        if self._auto_next is not None and now >= self._auto_next and not self._auto_active():
            self.pending.append(self._draw(self._auto_next))
            self._auto_next = None
        waiting = []
        for fault in self.pending:
            assert fault.start is not None
            if now >= fault.start:
                self._activate(fault, now, values)
            else:
                waiting.append(fault)
        self.pending = waiting
        self.dropout = any(f.type == "dropout" for f in self.active)
        events = [f.active_end for f in self.active]
        events += [f.start for f in self.pending if f.start is not None]
        if self._auto_next is not None:
            events.append(self._auto_next)
        self.next_event = min(events) if events else math.inf

    def _auto_active(self) -> bool:
        return any(f.auto for f in self.active)

    def _activate(self, fault: Fault, now: float, values: list[float]) -> None:
        fault.active_start = now
        fault.indices = [self.info.index[m] for m in fault.metrics]
        if fault.type == "stuck":
            fault.frozen = [values[i] for i in fault.indices]
        if fault.duration <= 0:
            return
        self.active.append(fault)
        record = {
            "device": self.device,
            "collector": self.collector,
            "kind": self.kind,
            "fault": fault.type,
            "metrics": list(fault.metrics),
            "start": format_rfc3339(now),
            "end": format_rfc3339(now + fault.duration),
            "magnitude": fault.magnitude if fault.type not in ("stuck", "dropout") else None,
        }
        self.ground_truth.append(record)
        if self.path:
            line = json.dumps(record, separators=(",", ":")) + "\n"
            # One write() per line in append mode: concurrent writers (many simulated
            # devices in one process) never interleave inside a record.
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)

    # -- effect -----------------------------------------------------------------------
    def apply(self, now: float, values: list[float]) -> None:
        """Change ``values`` (clean values at ``now``) in place by every active fault."""
        sigmas = self.info.sigmas
        for fault in self.active:
            assert fault.active_start is not None
            elapsed = now - fault.active_start
            kind = fault.type
            if kind == "stuck":
                assert fault.frozen is not None
                for i, v in zip(fault.indices, fault.frozen):
                    values[i] = v
                continue
            if kind == "drift":
                factor = fault.magnitude * min(1.0, elapsed / fault.duration)
            elif kind == "overheat":
                factor = fault.magnitude * (1.0 - math.exp(-5.0 * elapsed / fault.duration))
            elif kind in ("spike", "shift"):
                factor = fault.magnitude
            else:
                continue
            for i in fault.indices:
                values[i] += factor * sigmas[i]
