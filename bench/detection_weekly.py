"""A factory week through the live engine: machines that run Monday to Friday, 06:00-22:00,
and stand idle at night and over the weekend, for three weeks. Counts the anomalies raised
on healthy running (starts, stops, the Monday after the weekend) and whether a real fault in
the third week is still found. Writes bench/results/detection_weekly.json. Run from the
repository root: ``python bench/detection_weekly.py`` (about 3 minutes on 2 cores);
``--window N`` sets the device model's ``mv_window_rows`` (8640, a day, before 60480),
``--history N`` the per-metric calibrations' ``history`` (17280, two days).

* a four-metric machine (motor current, vibration, power, and a temperature that follows
  the load through a 30-minute thermal lag), watched by its device model;
* a one-metric machine (the same motor current alone), watched by its per-metric ensemble.

The fault: the machine's vibration 25 % above what its load gives (a bearing), on the third
week's Tuesday from 10:00 to 12:00; "found" is an anomaly on it within those 2 hours.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from millstream_cloud.detection.engine import DetectionEngine, EngineSettings
from millstream_cloud.model import Reading

ROOT = Path(__file__).resolve().parents[1]
STEP_NS = 10 * 10**9  # a reading every 10 s (the live settings count 10-s intervals)
DAY = 8640  # 10-s rows a day
WEEKS = 3
SEEDS = (0, 1)
FAULT_DAY, FAULT_HOURS = 15, (10.0, 12.0)  # third week's Tuesday (day 0 is a Monday)


def machine(seed: int, fault: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = WEEKS * 7 * DAY
    i = np.arange(n)
    weekday, hour = (i // DAY) % 7, (i % DAY) / 360
    load = ((weekday < 5) & (hour >= 6) & (hour < 22)) * rng.uniform(0.7, 1.0)
    alpha = 1 - np.exp(-10 / 1800)  # thermal lag: 30 minutes
    temp = np.empty(n)
    t = 40.0
    for k in range(n):
        t += (40 + 30 * load[k] - t) * alpha
        temp[k] = t
    vib = 0.1 + 2 * load
    if fault:
        at = (i // DAY == FAULT_DAY) & (hour >= FAULT_HOURS[0]) & (hour < FAULT_HOURS[1])
        vib = np.where(at, vib * 1.25, vib)
    return {
        "current_a": 2 + 20 * load + rng.normal(0, 0.3, n),
        "vibration_mm_s": vib + rng.normal(0, 0.05, n),
        "power_kw": 0.5 + 10 * load + rng.normal(0, 0.2, n),
        "temp_c": temp + rng.normal(0, 0.2, n),
    }


def anomalies(settings: EngineSettings, metrics: dict[str, np.ndarray]) -> list[tuple[int, str]]:
    """(row, metric) of every anomaly the engine raised, fed 30 rows at a time."""
    engine = DetectionEngine(settings)
    names = list(metrics)
    n = len(metrics[names[0]])
    out = []
    for s in range(0, n, 30):
        batch = [
            Reading("m", "bench", k, (s + j) * STEP_NS, float(metrics[k][s + j]))
            for j in range(min(30, n - s))
            for k in names
        ]
        out += [(a.time_ns // STEP_NS, a.metric) for a in engine.observe(batch)]
    return out


def when(t: int) -> str:
    day = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"][(t // DAY) % 7]
    return f"week {t // DAY // 7 + 1} {day} {(t % DAY) // 360:02d}:{(t % 360) // 6:02d}"


def main(window: int, history: int) -> dict[str, object]:
    base = EngineSettings()
    s = replace(base, mv_window_rows=window, streaming={**base.streaming, "history": history})
    lo, hi = (FAULT_DAY * DAY + int(h * 360) for h in FAULT_HOURS)
    result: dict[str, object] = {
        "weeks": WEEKS,
        "seeds": len(SEEDS),
        "mv_window_rows": window,
        "history": history,
    }
    for label, keep in (("four_metrics", None), ("one_metric", ["current_a"])):
        false, found, by_week = [], 0, [0] * WEEKS
        for seed in SEEDS:
            m = machine(seed, fault=keep is None)
            if keep:
                m = {k: m[k] for k in keep}
            hits = anomalies(s, m)
            in_fault = [t for t, name in hits if lo <= t < hi and name == "vibration_mm_s"]
            found += bool(in_fault)
            for t, name in hits:
                if not lo <= t < hi:
                    false.append(f"seed {seed} {when(t)} {name}")
                    by_week[t // DAY // 7] += 1
        entry: dict[str, object] = {
            "false_anomalies": len(false),
            "false_anomalies_per_week": round(len(false) / (WEEKS * len(SEEDS)), 2),
            "false_anomalies_by_week": by_week,
            "false_anomaly_times": false,
        }
        if keep is None:
            entry["faults_found"] = f"{found}/{len(SEEDS)}"
        result[label] = entry
        print(
            f"{label}: {len(false)} false anomalies over {WEEKS} weeks x {len(SEEDS)} seeds "
            f"(by week {by_week})" + (f", fault found {found}/{len(SEEDS)}" if keep is None else "")
        )
        for f in false:
            print(f"  {f}")
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--window", type=int, default=EngineSettings().mv_window_rows)
    ap.add_argument("--history", type=int, default=EngineSettings().streaming["history"])
    ap.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "detection_weekly.json"
    )
    args = ap.parse_args()
    out = main(args.window, args.history)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
