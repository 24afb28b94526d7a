"""Size and cost of the live detection state (``DetectionEngine.save``/``load``).

Feeds the simulator's fleet (12 devices x 4 metrics by default, ``--devices N``, one reading every 10 s) through a
``DetectionEngine`` for 16 h, so every device has its trained per-device model, and saves
the state: bytes on disk (in all and per metric), wall time of a save and of a load, and
the longest time a save keeps scoring waiting (the engine lock held; a save writes device
by device). Writes bench/results/detection_state.json. Run from the repository root.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from _common import write_result

from millstream_cloud.detection.engine import DetectionEngine
from millstream_cloud.detection.eval.sim import SimConfig, simulate

ROOT = Path(__file__).resolve().parents[1]


class TimedLock:
    """A lock that remembers the longest time it was held."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.longest = 0.0
        self._t0 = 0.0

    def __enter__(self) -> None:
        self.lock.acquire()
        self._t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.longest = max(self.longest, time.perf_counter() - self._t0)
        self.lock.release()


def size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hours", type=float, default=16.0)
    ap.add_argument("--devices", type=int, default=12, help="simulated machines, 4 metrics each")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "detection_state.json"))
    args = ap.parse_args()
    fleet = simulate(SimConfig(seed=0, devices=args.devices, hours=args.hours, faults=()))
    engine = DetectionEngine()
    for b in fleet.batches():
        engine.observe(b)
    devices = len(engine.devices)
    metrics = sum(len(d.metrics) for d in engine.devices.values())
    trained = sum(d.model is not None for d in engine.devices.values())
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp)
        lock = TimedLock()
        t0 = time.perf_counter()
        engine.save(where, guard=lock)
        save_s = time.perf_counter() - t0
        total = size(where)
        t0 = time.perf_counter()
        DetectionEngine.load(where)
        load_s = time.perf_counter() - t0
    result = {
        "hours": args.hours,
        "devices": devices,
        "devices_trained": trained,
        "metrics": metrics,
        "state_bytes": total,
        "bytes_per_metric": round(total / metrics),
        "save_s": round(save_s, 3),
        "load_s": round(load_s, 3),
        "longest_lock_hold_ms": round(1e3 * lock.longest, 1),
    }
    write_result(result, args.out)
