"""Memory a metric's per-metric detector holds, measured with tracemalloc.

A one-metric device is watched by its ``StreamingEnsemble`` for good (a multi-metric
device's metrics for their first 12 h), with the live engine's settings: two days of
values per calibration (17280 at 10 s) and a week of their extremes. This feeds three
ensembles ``--readings`` values each (a noisy daily wave; default 40,000, 4.6 days at
10 s, so every window is full) and reports the memory each holds, and what its NumPy
parts take: the calibrations' rings, their sorted snapshots, their week of extremes.
``--pattern`` adds the optional ``pattern`` component (the NAB settings use it; live, a
rule may add it) and writes ``detection_memory_pattern.json``; both report the time an
update takes (``update_us``: one copy's mean, timed before tracemalloc starts).

Writes bench/results/detection_memory.json. Run from the repository root:
``python bench/detection_memory.py``.
"""

from __future__ import annotations

import argparse
import gc
import time
import tracemalloc
from pathlib import Path

import numpy as np
from _common import save_json

from millstream_cloud.detection.engine import EngineSettings
from millstream_cloud.detection.streaming import COMPONENTS, StreamingEnsemble

ROOT = Path(__file__).resolve().parents[1]
COPIES = 3


def parts(det: StreamingEnsemble) -> dict[str, float]:
    """Bytes of the NumPy arrays behind the calibrations (and the value component's
    reference window), in MB."""
    stats = [c.stats for c in det.cal.values()] + [det.parts["value"].ref]
    rings = sum(s._ring.nbytes for s in stats)
    snapshots = sum(s.sorted.nbytes for s in stats)
    week = sum(
        s.memory._tops.nbytes + s.memory._bottoms.nbytes + s.memory._ends.nbytes
        for s in stats
        if s.memory is not None
    )
    return {
        "windows": len(stats),
        "rings_mb": round(rings / 1e6, 3),
        "snapshots_mb": round(snapshots / 1e6, 3),
        "week_extremes_mb": round(week / 1e6, 3),
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--readings", type=int, default=40_000)
    ap.add_argument("--pattern", action="store_true", help="add the pattern component")
    args = ap.parse_args()
    settings = EngineSettings()
    if args.pattern:
        comps = (*settings.streaming.get("components", COMPONENTS), "pattern")
        settings.streaming = {**settings.streaming, "components": comps}
    t = np.arange(args.readings)
    rng = np.random.default_rng(0)
    values = (rng.normal(size=args.readings) + np.sin(t * 2 * np.pi / 8640)).tolist()
    warm = StreamingEnsemble(warmup=settings.warmup, **settings.streaming)
    t0 = time.perf_counter()
    for x in values:  # imports and first-use caches, outside the measurement; the timing
        warm.update(x)
    update_us = (time.perf_counter() - t0) / args.readings * 1e6
    del warm
    gc.collect()
    tracemalloc.start()
    dets = []
    for _ in range(COPIES):
        det = StreamingEnsemble(warmup=settings.warmup, **settings.streaming)
        for x in values:
            det.update(x)
        dets.append(det)
    gc.collect()
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out = {
        "readings": args.readings,
        "history": settings.streaming["history"],
        "memory": settings.streaming["memory"],
        "one_metric_ensemble_mb": round(held / COPIES / 1e6, 2),
        "components": list(dets[0].components),
        "update_us": round(update_us, 1),
        "numpy_parts": parts(dets[0]),
    }
    print(
        f"one-metric ensemble after {args.readings:,} readings: "
        f"{out['one_metric_ensemble_mb']:.2f} MB, {out['update_us']:.0f} us an update"
    )
    p = out["numpy_parts"]
    print(
        f"  {p['windows']} windows: rings {p['rings_mb']:.2f} MB, sorted snapshots "
        f"{p['snapshots_mb']:.2f} MB, week of extremes {p['week_extremes_mb']:.3f} MB"
    )
    name = "detection_memory_pattern.json" if args.pattern else "detection_memory.json"
    path = ROOT / "bench" / "results" / name
    save_json(out, path)
