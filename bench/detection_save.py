"""What a save of the live detection state costs once devices have run for days: a
four-metric machine after 8 days (a week of rows in its device model) and a one-metric
device after 3 days (its ensemble's calibrations full). Per device: the state on disk, and
over five saves five minutes apart (as every ``save_interval_s``) the bytes each writes
(device files rewritten whole, rows appended to rows files), its wall time and the longest
time it holds scoring up (the engine lock); then a load. Writes
bench/results/detection_save.json. Run from the repository root:
``python bench/detection_save.py`` (about a minute).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from _common import files, size, timed_save, write_result, written

from millstream_cloud.detection.engine import DEVICE_DIR, DetectionEngine, EngineSettings
from millstream_cloud.model import Reading

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from detection_weekly import DAY, machine  # noqa: E402

SAVES = 5


def measure(feed: Callable[[DetectionEngine, int, int], None], days: float) -> dict[str, float]:
    engine = DetectionEngine(EngineSettings())
    n = int(days * DAY)
    feed(engine, 0, n)
    where = Path(tempfile.mkdtemp())
    engine.save(where)
    folder = where / DEVICE_DIR
    out: dict[str, list[float]] = {"bytes": [], "ms": [], "held_ms": []}
    state = size(folder)
    for k in range(SAVES):
        feed(engine, n + 30 * k, n + 30 * (k + 1))  # five minutes at 10 s
        before = files(folder)
        seconds, held = timed_save(engine, where)
        out["ms"].append(1e3 * seconds)
        out["held_ms"].append(1e3 * held.longest)
        out["bytes"].append(written(before, files(folder)))
    t0 = time.perf_counter()
    DetectionEngine.load(where)
    return {
        "state_bytes": state,
        "save_bytes_median": statistics.median(out["bytes"]),
        "save_ms_median": round(statistics.median(out["ms"]), 1),
        "save_longest_lock_hold_ms_median": round(statistics.median(out["held_ms"]), 1),
        "load_ms": round(1e3 * (time.perf_counter() - t0), 1),
    }


def four_metrics(engine: DetectionEngine, a: int, b: int) -> None:
    m = FOUR
    for s in range(a, b, 30):
        engine.observe(
            [
                Reading("m", "bench", k, (s + j) * 10**10, float(v[s + j]))
                for j in range(min(30, b - s))
                for k, v in m.items()
            ]
        )


def one_metric(engine: DetectionEngine, a: int, b: int) -> None:
    for s in range(a, b, 30):
        engine.observe(
            [
                Reading("t", "bench", "temp_c", (s + j) * 10**10, float(ONE[s + j]))
                for j in range(min(30, b - s))
            ]
        )


FOUR = machine(0, fault=False)
ONE = np.random.default_rng(0).normal(20.0, 1.0, 4 * DAY)

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "detection_save.json"))
    args = ap.parse_args()
    result = {
        "four_metrics_after_8_days": measure(four_metrics, 8),
        "one_metric_after_3_days": measure(one_metric, 3),
    }
    write_result(result, args.out)
