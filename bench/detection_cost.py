"""Cost of detection on the live path, in CPU microseconds per reading.

Feeds the simulator's fleet (12 devices x 4 metrics, one reading every 10 s, batches of
6 samples per device = 288 readings) through ``DetectionEngine.observe`` and reports the cost
while the per-metric ensembles run (first 12 h, before the multivariate models exist) and
once the per-device models are trained, plus one IsolationForest call for reference.
Writes bench/results/detection_cost.json. Run from the repository root.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from millstream_cloud.detection.engine import DetectionEngine
from millstream_cloud.detection.eval.sim import SimConfig, simulate
from millstream_cloud.detection.multivariate import IsolationForestDetector

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    fleet = simulate(SimConfig(seed=0, hours=16.0, faults=()))
    batches = list(fleet.batches())
    engine = DetectionEngine()
    split = int(len(batches) * 12.5 / 16)  # the models train after 12 h of rows
    phases = {
        "warmup (per-metric ensembles)": batches[:split],
        "trained (per-device models)": batches[split:],
    }
    result: dict[str, object] = {}
    for name, part in phases.items():
        n = sum(len(b) for b in part)
        t0 = time.process_time()
        for b in part:
            engine.observe(b)
        us = 1e6 * (time.process_time() - t0) / n
        result[name] = {
            "readings": n,
            "us_per_reading": round(us, 2),
            "readings_per_s_one_core": round(1e6 / us),
        }
        print(f"{name:<34} {us:8.2f} us/reading  ({1e6 / us:,.0f} readings/s on one core)")
    X = np.random.default_rng(0).normal(size=(1000, 4))
    iso = IsolationForestDetector().fit(X)
    t0 = time.perf_counter()
    for _ in range(20):
        iso.score_samples(X[:1])
    ms = 1e3 * (time.perf_counter() - t0) / 20
    result["isolation_forest_single_call_ms"] = round(ms, 2)
    print(f"IsolationForest, one score_samples call on one row: {ms:.2f} ms")
    path = ROOT / "bench" / "results" / "detection_cost.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {path}")
