"""A simulated machine: realistic signals for demos, tests and detector evaluation.

The machine has one hidden *load* (0..1): a set point that changes at random moments
(a new job, a valve opening), follows a daily shift pattern (busier by day than by
night) and wanders a little. Every metric is

    base + load_k * (lagged load - 0.7) + daily_amp * daily wave + noise

so current, power, flow and vibration move together with the load at once, while
temperatures follow it with a thermal time constant of minutes, as on a real machine.
Faults (:mod:`millstream_agent.collectors.faults`) are applied on top and recorded as
ground truth.

Standard library only: the agent's ``simulate`` command runs a thousand of these in one
process, so ``collect`` does a handful of float operations per metric and nothing else.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from typing import Any, Optional

from millstream_agent.collectors import register
from millstream_agent.collectors._options import (
    check_keys,
    get_float,
    get_int,
    get_str,
    parse_duration,
)
from millstream_agent.collectors.base import Collector, Sample
from millstream_agent.collectors.faults import (
    FAULT_TYPES,
    FaultPlan,
    MetricInfo,
    parse_faults,
)

# name, base level, daily amplitude, load sensitivity (per unit of load), noise sd,
# unit, thermal time constant in seconds (0: follows the load at once)
MetricRow = tuple[str, float, float, float, float, str, float]

MACHINE_METRICS: dict[str, list[MetricRow]] = {
    "motor": [
        ("bearing_vibration", 2.0, 0.05, 0.8, 0.05, "mm/s", 0.0),
        ("winding_temperature", 70.0, 3.0, 25.0, 0.3, "degC", 600.0),
        ("current", 12.0, 0.0, 10.0, 0.1, "A", 0.0),
        ("speed", 1480.0, 0.0, -12.0, 0.8, "rpm", 0.0),
        ("voltage", 400.0, 1.0, -3.0, 0.6, "V", 0.0),
        ("power", 7.5, 0.0, 6.0, 0.06, "kW", 0.0),
        ("ambient_temperature", 24.0, 4.0, 0.5, 0.15, "degC", 1800.0),
        ("housing_temperature", 48.0, 3.0, 12.0, 0.2, "degC", 1200.0),
        ("axial_vibration", 1.2, 0.03, 0.5, 0.03, "mm/s", 0.0),
        ("power_factor", 0.86, 0.0, 0.06, 0.003, "", 0.0),
        ("bearing_temperature", 55.0, 3.0, 10.0, 0.2, "degC", 900.0),
        ("torque", 48.0, 0.0, 40.0, 0.4, "N.m", 0.0),
    ],
    "pump": [
        ("flow", 120.0, 0.0, 80.0, 0.8, "m3/h", 0.0),
        ("discharge_pressure", 6.0, 0.0, 3.0, 0.03, "bar", 0.0),
        ("suction_pressure", 1.2, 0.02, -0.3, 0.01, "bar", 0.0),
        ("speed", 2400.0, 0.0, 1000.0, 2.0, "rpm", 0.0),
        ("motor_current", 28.0, 0.0, 20.0, 0.2, "A", 0.0),
        ("power", 15.0, 0.0, 12.0, 0.1, "kW", 0.0),
        ("bearing_vibration", 2.8, 0.05, 1.2, 0.06, "mm/s", 0.0),
        ("bearing_temperature", 50.0, 2.5, 10.0, 0.2, "degC", 900.0),
        ("fluid_temperature", 35.0, 2.0, 4.0, 0.1, "degC", 1800.0),
        ("ambient_temperature", 24.0, 4.0, 0.5, 0.15, "degC", 1800.0),
        ("casing_vibration", 1.5, 0.03, 0.6, 0.04, "mm/s", 0.0),
        ("seal_temperature", 42.0, 2.0, 8.0, 0.2, "degC", 900.0),
    ],
    "compressor": [
        ("discharge_pressure", 7.5, 0.0, 1.0, 0.03, "bar", 0.0),
        ("discharge_temperature", 85.0, 3.0, 20.0, 0.3, "degC", 300.0),
        ("motor_current", 60.0, 0.0, 45.0, 0.4, "A", 0.0),
        ("power", 37.0, 0.0, 28.0, 0.25, "kW", 0.0),
        ("flow", 10.0, 0.0, 8.0, 0.08, "m3/min", 0.0),
        ("vibration", 3.0, 0.05, 1.5, 0.07, "mm/s", 0.0),
        ("oil_temperature", 60.0, 2.5, 12.0, 0.2, "degC", 900.0),
        ("oil_pressure", 3.5, 0.0, 0.4, 0.02, "bar", 0.0),
        ("speed", 2980.0, 0.0, -15.0, 1.0, "rpm", 0.0),
        ("ambient_temperature", 24.0, 4.0, 0.5, 0.15, "degC", 1800.0),
        ("suction_pressure", 1.0, 0.01, -0.05, 0.005, "bar", 0.0),
        ("intercooler_temperature", 40.0, 3.0, 10.0, 0.2, "degC", 600.0),
    ],
}

_NOMINAL_LOAD = 0.7
_LOAD_TAU = 30.0  # seconds for the load to settle on a new set point
_LOAD_WANDER = 0.004  # sd of the load's random walk per sqrt(second)
_DAY = 86400.0


@register
class SimulatedCollector(Collector):
    """A simulated machine of a given ``kind`` producing ``metrics`` signals, with faults."""

    type_name = "simulated"
    options_spec = {
        "kind": (str, "motor", "machine kind: motor, pump or compressor"),
        "metrics": (int, 10, "how many metrics; beyond the kind's 12 the names repeat with _1, _2"),
        "seed": (int, 0, "random seed, mixed with the device id; same seed and device, same run"),
        "device": (str, None, "ground truth's device id; null: the agent's device id"),
        "load_change_interval": (object, "20m", "mean time between load set-point changes"),
        "faults": (object, "auto", "auto (random schedule), none, or a list of faults"),
        "fault_rate_per_hour": (float, 1.0, "faults: auto: mean faults per device per hour"),
        "fault_types": (list, list(FAULT_TYPES), "faults: auto: the fault types to draw from"),
        "fault_start_after": (object, "5m", "faults: auto: quiet time after start, for baselines"),
        "ground_truth": (
            str,
            None,
            "append fault intervals to this JSONL file (none: memory only)",
        ),
    }

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        super().__init__(name, options)
        check_keys(options, self.options_spec)
        kind = get_str(options, "kind", "motor", list(MACHINE_METRICS))
        assert kind is not None
        self.kind = kind
        table = MACHINE_METRICS[kind]
        count = get_int(options, "metrics", 10, minimum=1, maximum=10000)
        seed = get_int(options, "seed", 0)
        self.device = get_str(options, "device", None) or name
        change = parse_duration(options.get("load_change_interval", "20m"), "load_change_interval")
        if change <= 0:
            raise ValueError("load_change_interval: must be positive")
        self._change_mean = change

        rows = [table[i % len(table)] for i in range(count)]
        self.metric_names = [
            r[0] if i < len(table) else f"{r[0]}_{i // len(table)}" for i, r in enumerate(rows)
        ]
        self._base = [r[1] for r in rows]
        self._amp = [r[2] for r in rows]
        self._load_k = [r[3] for r in rows]
        self._noise = [r[4] for r in rows]
        self._units = [r[5] or None for r in rows]
        taus = sorted({r[6] for r in rows})
        self._taus = taus
        self._tau_index = [taus.index(r[6]) for r in rows]
        self._alphas = [1.0] * len(taus)
        self._dt = -1.0
        self._wander = 0.0
        self._load_alpha = 1.0

        # Separate streams: faults on or off never change the machine's own signals.
        self._rng = random.Random(f"{seed}:{self.device}:signal")
        fault_rng = random.Random(f"{seed}:{self.device}:faults")
        # No two machines of a fleet sit at exactly the same levels.
        self._base = [b * (1.0 + self._rng.gauss(0.0, 0.02)) for b in self._base]
        self._load = self._setpoint = self._rng.uniform(0.45, 0.95)
        self._lags = [self._load] * len(taus)
        self._next_change = math.inf
        self._last: Optional[float] = None

        info = MetricInfo(self.metric_names, self._noise)
        faults_opt = options.get("faults", "auto")
        explicit = None
        rate = 0.0
        if faults_opt in ("none", "off", False, None):
            pass
        elif faults_opt == "auto":
            rate = get_float(options, "fault_rate_per_hour", 1.0, minimum=0.0)
        else:
            explicit = parse_faults(faults_opt, info)
        types = options.get("fault_types", list(FAULT_TYPES))
        if not isinstance(types, list) or not types or any(t not in FAULT_TYPES for t in types):
            raise ValueError(
                f"fault_types: expected a non-empty list of {', '.join(FAULT_TYPES)}, got {types!r}"
            )
        self.faults = FaultPlan(
            info,
            fault_rng,
            device=self.device,
            collector=name,
            kind=kind,
            explicit=explicit,
            rate_per_hour=rate,
            types=types,
            start_after=parse_duration(options.get("fault_start_after", "5m"), "fault_start_after"),
            ground_truth_path=get_str(options, "ground_truth", None),
        )

    @property
    def ground_truth(self) -> list[dict[str, Any]]:
        """Fault intervals that have started so far (device, fault, metrics, start, end)."""
        return self.faults.ground_truth

    def _step_load(self, now: float) -> None:
        rng = self._rng
        if self._last is None:
            dt = 0.0
            self._next_change = now + rng.expovariate(1.0 / self._change_mean)
        else:
            dt = min(max(now - self._last, 0.0), 3600.0)
        self._last = now
        if dt != self._dt:
            self._dt = dt
            self._alphas = [1.0 - math.exp(-dt / t) if t > 0 else 1.0 for t in self._taus]
            self._load_alpha = 1.0 - math.exp(-dt / _LOAD_TAU)
            self._wander = _LOAD_WANDER * math.sqrt(dt)
        if now >= self._next_change:
            self._setpoint = rng.uniform(0.35, 1.0)
            self._next_change = now + rng.expovariate(1.0 / self._change_mean)
        # Busier by day: the shift pattern peaks mid-afternoon UTC, quietest at 03:00.
        day = 0.5 - 0.5 * math.cos(2.0 * math.pi * ((now % _DAY) / _DAY - 0.125))
        target = self._setpoint * (0.8 + 0.2 * day)
        load = self._load + (target - self._load) * self._load_alpha
        if dt > 0:
            load += rng.gauss(0.0, self._wander)
        self._load = load = min(1.1, max(0.05, load))
        lags = self._lags
        for k, a in enumerate(self._alphas):
            lags[k] += (load - lags[k]) * a

    def values(self, now: float) -> list[float]:
        """The clean (fault-free) values at ``now``, advancing the machine's state."""
        self._step_load(now)
        # Ambient warmth peaks at 15:00 UTC; temperatures and a little of everything follow.
        wave = math.sin(2.0 * math.pi * ((now % _DAY) / _DAY - 0.375))
        gauss = self._rng.gauss
        lags = self._lags
        return [
            base + k * (lags[ti] - _NOMINAL_LOAD) + amp * wave + gauss(0.0, sd)
            for base, k, ti, amp, sd in zip(
                self._base, self._load_k, self._tau_index, self._amp, self._noise
            )
        ]

    def past(self, now: float) -> list[Sample]:
        """A reading of the machine's healthy past at ``now``: its values without faults,
        advancing its state, so the live readings that follow continue the same machine.
        Faults are planned from the first ``collect``, not from the past."""
        return self._samples(now, self.values(now))

    def collect(self, now: float) -> list[Sample]:
        values = self.values(now)
        plan = self.faults
        if now >= plan.next_event:
            plan.update(now, values)
        if plan.active:
            if plan.dropout:
                return []
            plan.apply(now, values)
        return self._samples(now, values)

    def _samples(self, now: float, values: list[float]) -> list[Sample]:
        units = self._units
        return [Sample(now, n, round(v, 4), u) for n, v, u in zip(self.metric_names, values, units)]


def generate(
    collector: SimulatedCollector, start: float, seconds: float, interval: float = 1.0
) -> Iterator[tuple[float, list[Sample]]]:
    """Run a simulated machine offline: ``(ts, samples)`` every ``interval`` from ``start``.

    For detector evaluation without an agent or broker; afterwards
    ``collector.ground_truth`` holds the fault intervals of the run.
    """
    steps = int(seconds / interval)
    for i in range(steps):
        ts = start + i * interval
        yield ts, collector.collect(ts)


def main(argv: Optional[list[str]] = None) -> int:
    """Write a simulated data set (long CSV) and its ground truth (JSONL), for evaluation.

    ``python -m millstream_agent.collectors.simulated --devices 5 --hours 24 --out sim.csv
    --ground-truth truth.jsonl``
    """
    import argparse
    import csv
    import sys

    from millstream_agent.collectors._options import format_rfc3339, parse_rfc3339

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--kind", default="motor", choices=sorted(MACHINE_METRICS))
    parser.add_argument("--metrics", type=int, default=10)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start", default="2026-01-05T00:00:00Z", help="RFC 3339")
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds")
    parser.add_argument("--faults", default="auto", choices=["auto", "none"])
    parser.add_argument("--fault-rate", type=float, default=1.0, help="faults per device-hour")
    parser.add_argument("--out", default="-", help="CSV path (ts,device,metric,value,unit)")
    parser.add_argument("--ground-truth", default=None, help="JSONL path for fault intervals")
    args = parser.parse_args(argv)

    start = parse_rfc3339(args.start, "--start")
    if args.ground_truth:
        open(args.ground_truth, "w").close()  # a fresh file, not appended to an old run
    out = sys.stdout if args.out == "-" else open(args.out, "w", newline="")  # noqa: SIM115
    try:
        writer = csv.writer(out)
        writer.writerow(["ts", "device", "metric", "value", "unit"])
        for n in range(args.devices):
            device = f"sim-{n:04d}"
            options: dict[str, Any] = {
                "kind": args.kind,
                "metrics": args.metrics,
                "seed": args.seed,
                "device": device,
                "faults": args.faults,
                "fault_rate_per_hour": args.fault_rate,
                "ground_truth": args.ground_truth,
            }
            collector = SimulatedCollector(device, options)
            for ts, samples in generate(collector, start, args.hours * 3600.0, args.interval):
                stamp = format_rfc3339(ts)
                writer.writerows((stamp, device, s.metric, s.value, s.unit or "") for s in samples)
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
