"""Size and cost of the live detection state (``DetectionEngine.save``/``load``).

Feeds the simulator's fleet (12 devices x 4 metrics by default, ``--devices N``, one reading every 10 s) through a
``DetectionEngine`` for 16 h, so every device has its trained per-device model, and saves
the state: bytes on disk (in all and per metric), wall time of a save and of a load, and
the longest time a save keeps scoring waiting (the engine lock held; a save writes device
by device). Then five more minutes of readings and the next save (as every
``save_interval_s``): the bytes it writes (device files rewritten, rows appended to rows
files), its wall time and the longest wait it causes. Writes
bench/results/detection_state.json. Run from the repository root.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import files, size, timed_save, write_result, written

from millstream_cloud.detection.engine import DetectionEngine
from millstream_cloud.detection.eval.sim import SimConfig, simulate

ROOT = Path(__file__).resolve().parents[1]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hours", type=float, default=16.0)
    ap.add_argument("--devices", type=int, default=12, help="simulated machines, 4 metrics each")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "detection_state.json"))
    args = ap.parse_args()
    fleet = simulate(SimConfig(seed=0, devices=args.devices, hours=args.hours + 5 / 60, faults=()))
    batches = list(fleet.batches())
    cut = int(fleet.times_ns[0]) + int(args.hours * 3600e9)
    first = [b for b in batches if b and b[0].time_ns < cut]
    engine = DetectionEngine()
    for b in first:
        engine.observe(b)
    devices = len(engine.devices)
    metrics = sum(len(d.metrics) for d in engine.devices.values())
    trained = sum(d.model is not None for d in engine.devices.values())
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp)
        save_s, lock = timed_save(engine, where)
        total = size(where)
        t0 = time.perf_counter()
        DetectionEngine.load(where)
        load_s = time.perf_counter() - t0
        for b in batches[len(first) :]:
            engine.observe(b)
        before = files(where)
        next_s, next_lock = timed_save(engine, where)
        next_bytes = written(before, files(where))
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
        "next_save_bytes": next_bytes,
        "next_save_s": round(next_s, 3),
        "next_save_longest_lock_hold_ms": round(1e3 * next_lock.longest, 1),
    }
    write_result(result, args.out)
