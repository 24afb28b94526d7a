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
from _common import write_result

from millstream_cloud.detection.engine import DEVICE_DIR, DetectionEngine, EngineSettings
from millstream_cloud.model import Reading

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from detection_weekly import DAY, machine  # noqa: E402

SAVES = 5


class Held:
    """A guard that remembers the longest time it was held."""

    def __init__(self) -> None:
        self.longest = 0.0

    def __enter__(self) -> None:
        self._t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.longest = max(self.longest, time.perf_counter() - self._t0)


def sizes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in folder.iterdir()}


def written(before: dict[str, int], after: dict[str, int]) -> int:
    """Device files are rewritten whole; rows files grow by what is appended."""
    out = 0
    for name, n in after.items():
        out += n - before.get(name, 0) if name.endswith(".rows") else n
    return out


def measure(feed: Callable[[DetectionEngine, int, int], None], days: float) -> dict[str, float]:
    engine = DetectionEngine(EngineSettings())
    n = int(days * DAY)
    feed(engine, 0, n)
    where = Path(tempfile.mkdtemp())
    engine.save(where)
    folder = where / DEVICE_DIR
    out: dict[str, list[float]] = {"bytes": [], "ms": [], "held_ms": []}
    state = sum(sizes(folder).values())
    for k in range(SAVES):
        feed(engine, n + 30 * k, n + 30 * (k + 1))  # five minutes at 10 s
        before, held = sizes(folder), Held()
        t0 = time.perf_counter()
        engine.save(where, guard=held)
        out["ms"].append(1e3 * (time.perf_counter() - t0))
        out["held_ms"].append(1e3 * held.longest)
        out["bytes"].append(written(before, sizes(folder)))
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
