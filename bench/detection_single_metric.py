"""Per-metric detection on a device with one metric, as the live engine runs it: false alarms
per day on healthy signals, and which injected faults are found, with the live settings and
with the settings before (alert level 0.35, "range" tail fit). Writes
bench/results/detection_single_metric.json. Run from the repository root:
``python bench/detection_single_metric.py`` (about 3 minutes on 2 cores).

Such a device has no device model to fall back on, so its per-metric ensemble is all that
watches it. Signals (10-s readings): white noise, AR(1) noise (0.95), a daily wave with
noise, Student-t noise with 3 degrees of freedom (heavy tails), and a machine that runs
06:00-22:00 and idles at night (50 and 20, noise 1: two steps of 30 sigma a day). Faults, after one healthy
day on white noise (sigma 1), each on 4 seeds: a spike, a lasting level shift, a drift over
one hour, a wider spread. "Found" is an alarm within the 2 hours after the onset.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from statistics import median

import numpy as np

from millstream_cloud.detection.engine import DetectionEngine, EngineSettings
from millstream_cloud.model import Reading

ROOT = Path(__file__).resolve().parents[1]
STEP_NS = 10 * 10**9  # a reading every 10 s (the live settings count 10-s intervals)
DAY = 8640
HEALTHY_DAYS = 4
HEALTHY_SEEDS = (0, 1)
FAULT_SEEDS = (100, 101, 102, 103)
AFTER = 720  # readings after a fault's onset in which an alarm counts as finding it


def settings(history: int | None = None) -> dict[str, EngineSettings]:
    live = EngineSettings()
    if history is not None:  # to compare another history length (--history)
        live = replace(live, streaming={**live.streaming, "history": history})
    before = replace(
        live,
        streaming={
            **live.streaming,
            "alert_level": 0.35,
            "tail_fit": "range",
            "calibrate_after": 0,
        },
    )
    return {"live": live, "before": before}


def alarms(s: EngineSettings, values: np.ndarray, step_ns: int = STEP_NS) -> list[int]:
    """Indexes of the readings (``step_ns`` apart, fed 10 at a time) the engine raised an
    anomaly on."""
    engine = DetectionEngine(s)
    out: list[int] = []
    for i in range(0, len(values), 10):
        batch = [
            Reading("d", "bench", "m", (i + k) * step_ns, float(values[i + k]))
            for k in range(min(10, len(values) - i))
        ]
        out += [a.time_ns // step_ns for a in engine.observe(batch)]
    return out


def healthy(name: str, rng: np.random.Generator, n: int) -> np.ndarray:
    if name == "white":
        return rng.normal(0.0, 1.0, n)
    if name == "ar1":
        x, e = np.zeros(n), rng.normal(0.0, 1.0, n)
        for i in range(1, n):
            x[i] = 0.95 * x[i - 1] + e[i]
        return x
    if name == "daily_wave":
        return 3.0 * np.sin(2 * np.pi * np.arange(n) / DAY) + rng.normal(0.0, 1.0, n)
    if name == "shifts":
        hour = (np.arange(n) % DAY) / 360
        return np.where((hour >= 6) & (hour < 22), 50.0, 20.0) + rng.normal(0.0, 1.0, n)
    return rng.standard_t(3, n)


FAULTS = {
    "spike 5 sigma": ("spike", 5.0),
    "spike 8 sigma": ("spike", 8.0),
    "level shift 1.5 sigma": ("shift", 1.5),
    "level shift 2.5 sigma": ("shift", 2.5),
    "drift 1 sigma in 1 h": ("drift", 1.0),
    "drift 1.7 sigma in 1 h": ("drift", 1.7),
    "spread x1.5": ("spread", 1.5),
    "spread x2.5": ("spread", 2.5),
}


def with_fault(kind: str, size: float, rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(0.0, 1.0, DAY + AFTER)
    if kind == "spike":
        v[DAY] += size
    elif kind == "shift":
        v[DAY:] += size
    elif kind == "drift":
        v[DAY:] += np.minimum(np.arange(AFTER) / 360, 1.0) * size
    else:
        v[DAY:] *= size
    return v


def main(history: int | None = None) -> dict[str, object]:
    result: dict[str, object] = {
        "healthy_days": HEALTHY_DAYS * len(HEALTHY_SEEDS),
        "fault_seeds": len(FAULT_SEEDS),
        "false_alarms_per_day": {},
        "faults": {},
    }
    for label, s in settings(history).items():
        per_day = {}
        for name in ("white", "ar1", "daily_wave", "student_t3", "shifts"):
            count = sum(
                len(alarms(s, healthy(name, np.random.default_rng(seed), HEALTHY_DAYS * DAY)))
                for seed in HEALTHY_SEEDS
            )
            per_day[name] = round(count / (HEALTHY_DAYS * len(HEALTHY_SEEDS)), 2)
            print(f"{label:6s} healthy {name:11s} false alarms per day {per_day[name]}", flush=True)
        found = {}
        for fault, (kind, size) in FAULTS.items():
            delays = []
            for seed in FAULT_SEEDS:
                hits = [
                    t - DAY for t in alarms(s, with_fault(kind, size, np.random.default_rng(seed)))
                ]
                after = [d for d in hits if 0 <= d < AFTER]
                if after:
                    delays.append(after[0])
            found[fault] = {
                "found": len(delays),
                "of": len(FAULT_SEEDS),
                "median_delay_readings": median(delays) if delays else None,
            }
            print(f"{label:6s} {fault:23s} found {len(delays)}/{len(FAULT_SEEDS)}", flush=True)
        result["false_alarms_per_day"][label] = per_day  # type: ignore[index]
        result["faults"][label] = found  # type: ignore[index]
    live = settings(history)["live"].streaming
    result["live_settings"] = {k: live[k] for k in ("alert_level", "tail_fit", "history")}
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--history", type=int, help="per-metric history instead of the live one")
    ap.add_argument(
        "--out", default=str(ROOT / "bench" / "results" / "detection_single_metric.json")
    )
    args = ap.parse_args()
    out = main(args.history)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {path}")
