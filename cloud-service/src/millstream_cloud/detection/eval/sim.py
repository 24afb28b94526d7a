"""A small deterministic fleet simulator with injected faults and their ground truth.

Cloud-side on purpose: the edge agent has its own simulator, and the wire contract is the
only thing the two packages share. Signals are motor- and pump-like: a load that follows a
daily cycle plus step changes every one to three hours (smoothed by a 60 s lag), each
metric a linear function of load plus Gaussian noise, temperatures following load through
a 20-minute thermal lag.

Fault magnitudes are in units of the metric's noise sigma (its standard deviation at steady
load), which is the hard case: the daily cycle and load steps move every metric by many
sigma, so a fault is only visible against what the load predicts.

=============  =========================================================  ==========
fault          what happens                                               ground truth
=============  =========================================================  ==========
drift          +1 sigma ramp over 60 min, then held 60 min                 2 h
stuck          sensor repeats its last value for 60 min                    1 h
level_shift    +2 sigma step for 60 min                                    1 h
spikes         5 single-sample spikes of +6 sigma within 10 min            10 min
overheating    temperature +12 degC over 30 min, held 30 min               1 h
=============  =========================================================  ==========
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from ...model import Reading

NS = 1_000_000_000
DAY_S = 86_400.0
FAULT_KINDS = ("drift", "stuck", "level_shift", "spikes", "overheating")

# metric -> (offset, gain per unit load, noise sigma, uses thermal lag)
KINDS: dict[str, dict[str, tuple[float, float, float, bool]]] = {
    "motor": {
        "speed_rpm": (1440.0, 40.0, 2.0, False),
        "current_a": (5.0, 20.0, 0.3, False),
        "vibration_mm_s": (1.5, 2.0, 0.08, False),
        "bearing_temp_c": (38.0, 25.0, 0.3, True),
    },
    "pump": {
        "flow_l_min": (50.0, 100.0, 1.5, False),
        "pressure_bar": (2.0, 3.0, 0.05, False),
        "motor_current_a": (4.0, 15.0, 0.3, False),
        "fluid_temp_c": (30.0, 20.0, 0.3, True),
    },
}
# Which metric each fault hits, per device kind.
FAULT_METRIC: dict[str, dict[str, str]] = {
    "motor": {
        "drift": "vibration_mm_s",
        "stuck": "current_a",
        "level_shift": "speed_rpm",
        "spikes": "vibration_mm_s",
        "overheating": "bearing_temp_c",
    },
    "pump": {
        "drift": "pressure_bar",
        "stuck": "flow_l_min",
        "level_shift": "motor_current_a",
        "spikes": "pressure_bar",
        "overheating": "fluid_temp_c",
    },
}
# ``SimConfig.curves``: metrics that follow a power of the load instead of the load, as a
# pump's pressure (speed squared) and shaft power (speed cubed) do by the affinity laws, a
# fan's vibration with speed squared, a bearing's heat with the current's square. Scaled to
# the linear value at the mean load, so only the shape changes.
CURVES: dict[str, dict[str, int]] = {
    "motor": {"vibration_mm_s": 2, "bearing_temp_c": 2},
    "pump": {"pressure_bar": 2, "motor_current_a": 3, "fluid_temp_c": 3},
}
MEAN_LOAD = 0.55
FAULT_DURATION_S = {
    "drift": 7200.0,
    "stuck": 3600.0,
    "level_shift": 3600.0,
    "spikes": 600.0,
    "overheating": 3600.0,
}


def least_hours(fault_after_h: float) -> float:
    """The shortest run whose faults, starting after ``fault_after_h`` hours of normal
    running, can all end with an hour to spare."""
    return fault_after_h + (max(FAULT_DURATION_S.values()) + 3600) / 3600


@dataclass(slots=True, frozen=True)
class Fault:
    device: str
    metric: str
    kind: str
    start_ns: int
    end_ns: int


@dataclass(slots=True)
class SimConfig:
    seed: int = 0
    devices: int = 12  # devices beyond ``len(faults)`` stay healthy
    hours: float = 36.0
    step_s: float = 10.0
    fault_after_h: float = 14.0  # earliest onset: leaves room to learn normal behaviour
    faults: tuple[str, ...] = FAULT_KINDS * 2
    site: str = "sim"
    start_ns: int = 1_700_000_000 * NS
    curves: bool = False  # metrics follow ``CURVES``' powers of the load (same random draws)


@dataclass(slots=True)
class Fleet:
    config: SimConfig
    times_ns: np.ndarray
    series: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)  # (device, metric)
    faults: list[Fault] = field(default_factory=list)
    kinds: dict[str, str] = field(default_factory=dict)  # device -> "motor" or "pump"

    def batches(self, every: int = 6) -> Iterator[list[Reading]]:
        """Readings in time order, ``every`` samples of every device per batch."""
        n = len(self.times_ns)
        site = self.config.site
        keys = list(self.series)
        for lo in range(0, n, every):
            out = []
            for i in range(lo, min(lo + every, n)):
                t = int(self.times_ns[i])
                for dev, metric in keys:
                    out.append(Reading(dev, site, metric, t, float(self.series[(dev, metric)][i])))
            yield out


def _lag(x: np.ndarray, step_s: float, tau_s: float) -> np.ndarray:
    a = step_s / (tau_s + step_s)
    out = np.empty_like(x)
    acc = x[0]
    for i, v in enumerate(x):
        acc += a * (v - acc)
        out[i] = acc
    return out


def simulate(config: SimConfig | None = None) -> Fleet:
    """Build the fleet's series and the ground truth of its faults; same seed, same fleet."""
    cfg = config or SimConfig()
    rng = np.random.default_rng(cfg.seed)
    n = int(cfg.hours * 3600 / cfg.step_s)
    t_s = np.arange(n) * cfg.step_s
    fleet = Fleet(cfg, cfg.start_ns + (t_s * NS).astype(np.int64))
    kinds = list(KINDS)
    for d in range(cfg.devices):
        kind = kinds[d % len(kinds)]
        dev = f"{kind}-{d:02d}"
        fleet.kinds[dev] = kind
        phase = rng.uniform(0, 2 * np.pi)
        load = MEAN_LOAD + 0.2 * np.sin(2 * np.pi * t_s / DAY_S + phase)
        # Operator load changes: a new set point every 1-3 hours.
        steps = np.zeros(n)
        k = 0
        while k < n:
            length = int(rng.uniform(3600, 3 * 3600) / cfg.step_s)
            steps[k : k + length] = rng.uniform(-0.15, 0.15)
            k += length
        load = _lag(np.clip(load + steps, 0.1, 1.0), cfg.step_s, 60.0)
        thermal = _lag(load, cfg.step_s, 1200.0)
        for metric, (off, gain, sigma, _) in KINDS[kind].items():
            shape = _shape(kind, metric, load, thermal, cfg.step_s, cfg.curves)
            fleet.series[(dev, metric)] = off + gain * shape + rng.normal(0.0, sigma, n)
        if d < len(cfg.faults):
            dur = FAULT_DURATION_S.get(cfg.faults[d], 0.0)
            latest = cfg.hours * 3600 - dur - 3600
            earliest = cfg.fault_after_h * 3600
            inject(fleet, dev, cfg.faults[d], rng.uniform(earliest, max(latest, earliest + 1)), rng)
    return fleet


def inject(
    fleet: Fleet,
    device: str,
    fault: str,
    start_s: float,
    rng: np.random.Generator | None = None,
) -> Fault:
    """Inject ``fault`` into the metric of ``device`` that ``FAULT_METRIC`` names, from
    ``start_s`` seconds into the fleet's time, and add its ground truth to ``fleet.faults``.
    Faults of different metrics of one device may overlap (``rng`` places the spikes)."""
    if fault not in FAULT_KINDS:
        raise ValueError(f"unknown fault kind {fault!r}; known: {', '.join(FAULT_KINDS)}")
    cfg = fleet.config
    kind = fleet.kinds[device]
    metric = FAULT_METRIC[kind][fault]
    sigma = KINDS[kind][metric][2]
    x = fleet.series[(device, metric)]
    t_s = np.arange(len(x)) * cfg.step_s
    i0 = int(start_s / cfg.step_s)
    i1 = min(int((start_s + FAULT_DURATION_S[fault]) / cfg.step_s), len(x))
    rel = t_s[i0:i1] - t_s[i0]
    if fault == "drift":
        x[i0:i1] += sigma * np.minimum(rel / 3600.0, 1.0)
    elif fault == "stuck":
        x[i0:i1] = x[i0 - 1]
    elif fault == "level_shift":
        x[i0:i1] += 2.0 * sigma
    elif fault == "spikes":
        idx = i0 + np.sort((rng or np.random.default_rng(0)).choice(i1 - i0, 5, replace=False))
        x[idx] += 6.0 * sigma
    elif fault == "overheating":
        x[i0:i1] += 12.0 * np.minimum(rel / 1800.0, 1.0)
    t = fleet.times_ns
    found = Fault(device, metric, fault, int(t[i0]), int(t[i1 - 1]))
    fleet.faults.append(found)
    return found


def _shape(
    kind: str, metric: str, load: np.ndarray, thermal: np.ndarray, step_s: float, curves: bool
) -> np.ndarray:
    """How ``metric`` of a ``kind`` follows the load: the load itself, or its thermal lag
    for a slow metric; with ``curves``, ``CURVES``' power of it (scaled to the straight
    line's value at the mean load), lagged alike."""
    power = CURVES[kind].get(metric, 1) if curves else 1
    slow = KINDS[kind][metric][3]
    if power == 1:
        return thermal if slow else load
    curve = load**power / MEAN_LOAD ** (power - 1)
    return _lag(curve, step_s, 1200.0) if slow else curve


def stopped(
    kind: str,
    metric: str,
    shift_sigma: float,
    seed: int,
    start_ns: int,
    hours: float = 30.0,
    stop_h: float = 20.0,
    restart_h: float = 22.0,
    fault_h: float | None = None,
    curves: bool = False,
) -> list[list[Reading]]:
    """One machine of ``kind`` (device ``<kind>-00``, site ``sim``) at 10 s, on a daily
    load cycle from ``start_ns``, stopped from ``stop_h`` to ``restart_h`` hours in: its fast
    metrics read about zero, the slow ones cool through their thermal lag. From the restart
    (or from ``fault_h`` hours in) on ``metric`` reads ``shift_sigma`` of its noise high (a
    fault the stop left, or one while its aftermath lasts); ``curves``: its metrics on
    ``CURVES`` (the same random draws). Readings in batches of 6 rows. The planned and
    unplanned stops of the maintenance-window tests and ``bench/detection_restart.py``."""
    step, n = 10.0, int(hours * 3600 / 10)
    rng = np.random.default_rng(seed)
    t_s = np.arange(n) * step
    load = MEAN_LOAD + 0.2 * np.sin(2 * np.pi * t_s / DAY_S + rng.uniform(0, 2 * np.pi))
    stop0, stop1 = int(stop_h * 3600 / step), int(restart_h * 3600 / step)
    load[stop0:stop1] = 0.0
    load = _lag(load, step, 60.0)
    thermal = _lag(load, step, 1200.0)
    series = {}
    for m, (off, gain, sig, slow) in KINDS[kind].items():
        series[m] = (
            off + gain * _shape(kind, m, load, thermal, step, curves) + rng.normal(0, sig, n)
        )
        if not slow:
            series[m][stop0:stop1] = np.abs(rng.normal(0, sig, stop1 - stop0))
    onset = stop1 if fault_h is None else int(fault_h * 3600 / step)
    series[metric][onset:] += shift_sigma * KINDS[kind][metric][2]
    return [
        [
            Reading(f"{kind}-00", "sim", m, start_ns + int(t_s[i]) * NS, float(v[i]))
            for i in range(lo, min(lo + 6, n))
            for m, v in series.items()
        ]
        for lo in range(0, n, 6)
    ]
