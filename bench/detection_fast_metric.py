"""A one-metric device read every second (the agent's default interval), with the live
settings: false alarms per day on healthy signals and the faults found, with the
calibrations learning one value per 10 s (``resolution_s`` 10, the default) and learning
every reading (``resolution_s`` 0, as before it existed).

The live settings count 17280 values of history and 60480 of a week's extremes: two days
and a week at 10 s, 4.8 and 16.8 hours at 1 s when every reading is learned. Signals (3 days,
2 seeds): white noise and a machine on two shifts (06:00-22:00 at 50, idle at 20, noise 1).
Faults, after a day of white noise, on 3 seeds each: a spike of 8 sigma, a level shift of
2.5 sigma, a drift of 1.7 sigma over an hour; found = an alarm within 2 hours of the onset.

Writes bench/results/detection_fast_metric.json. Run from the repository root:
``python bench/detection_fast_metric.py`` (about 4 minutes).
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from millstream_cloud.detection.engine import EngineSettings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from detection_single_metric import alarms  # noqa: E402

DAY = 86_400  # readings, one a second
HEALTHY_DAYS = 3
HEALTHY_SEEDS = (0, 1)
FAULT_SEEDS = (100, 101, 102)
AFTER = 7200  # seconds after a fault's onset in which an alarm counts as finding it


def alarm_times(settings: EngineSettings, values: np.ndarray) -> list[int]:
    """Seconds (reading indexes) of the anomalies raised."""
    return alarms(settings, values, step_ns=10**9)


def healthy(name: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = HEALTHY_DAYS * DAY
    noise = rng.normal(0.0, 1.0, n)
    if name == "white":
        return noise
    hour = (np.arange(n) % DAY) / 3600
    return np.where((hour >= 6) & (hour < 22), 50.0, 20.0) + noise


def with_fault(kind: str, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(0.0, 1.0, DAY + AFTER)
    if kind == "spike 8 sigma":
        v[DAY] += 8.0
    elif kind == "level shift 2.5 sigma":
        v[DAY:] += 2.5
    else:
        v[DAY:] += np.minimum(np.arange(AFTER) / 3600, 1.0) * 1.7
    return v


def main() -> dict[str, object]:
    live = EngineSettings()
    variants = {
        "per 10 s (resolution_s 10)": live,
        "per reading (resolution_s 0)": replace(
            live, streaming={**live.streaming, "resolution_s": 0.0}
        ),
    }
    out: dict[str, object] = {"healthy_days": HEALTHY_DAYS * len(HEALTHY_SEEDS)}
    for label, s in variants.items():
        per_day = {}
        for name in ("white", "shifts"):
            count = sum(len(alarm_times(s, healthy(name, seed))) for seed in HEALTHY_SEEDS)
            per_day[name] = round(count / (HEALTHY_DAYS * len(HEALTHY_SEEDS)), 2)
            print(f"{label}: healthy {name:6s} false alarms per day {per_day[name]}", flush=True)
        found = {}
        for kind in ("spike 8 sigma", "level shift 2.5 sigma", "drift 1.7 sigma in 1 h"):
            delays = []
            for seed in FAULT_SEEDS:
                after = [t - DAY for t in alarm_times(s, with_fault(kind, seed)) if t >= DAY]
                if after and after[0] < AFTER:
                    delays.append(after[0])
            found[kind] = {"found": len(delays), "of": len(FAULT_SEEDS), "delays_s": delays}
            print(f"{label}: {kind:22s} found {len(delays)}/{len(FAULT_SEEDS)} {delays}")
        out[label] = {"false_alarms_per_day": per_day, "faults": found}
    path = ROOT / "bench" / "results" / "detection_fast_metric.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
