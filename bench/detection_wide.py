"""Cost of the per-device model on wide devices (a PLC or OPC UA server read as one device).

Fits ``VirtualSensorResidual`` on a week of 10-s rows (``mv_window_rows``, what every
retraining learns from, once per device every 4 h) of synthetic devices with 4 to 200
metrics, each a mix of three loads through its own lag plus noise, and reports the fit's
CPU and wall time, its peak of allocated memory (tracemalloc, in a second fit) and the cost of scoring
rows afterwards, in 60-row batches. Writes bench/results/detection_wide.json. Run from
the repository root; ``--metrics 4,50`` picks the widths, ``--rows`` the window.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from pathlib import Path

import numpy as np
from _common import save_json

from millstream_cloud.detection.multivariate import VirtualSensorResidual

ROOT = Path(__file__).resolve().parents[1]


def wide_device(metrics: int, rows: int, seed: int = 0) -> np.ndarray:
    """Rows of a device whose metrics follow three loads (a daily cycle, a shift pattern
    and a random walk), each through a first-order lag of its own, plus sensor noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(rows)
    loads = np.stack(
        [
            0.5 + 0.4 * np.sin(2 * np.pi * t / 8640),
            (np.sin(2 * np.pi * t / 2880) > 0).astype(float),
            np.cumsum(rng.normal(0, 0.01, rows)),
        ],
        axis=1,
    )
    mix = loads @ rng.normal(0, 1, (3, metrics))
    out = np.empty_like(mix)
    for j in range(metrics):
        a = 1.0 / rng.choice([1, 30, 120, 480])
        acc = mix[0, j]
        col = mix[:, j]
        lagged = out[:, j]
        for i in range(rows):  # a thermal lag: slow in Python, fine for a benchmark
            acc += a * (col[i] - acc)
            lagged[i] = acc
    return out + rng.normal(0, 0.05, out.shape)


def measure(metrics: int, rows: int) -> dict[str, float]:
    X = wide_device(metrics, rows + 8640, seed=metrics)
    train, rest = X[:rows], X[rows:]
    cpu, wall = time.process_time(), time.perf_counter()
    model = VirtualSensorResidual().fit(train)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    tracemalloc.start()  # a second fit for the memory: tracing slows the first one's clock
    VirtualSensorResidual().fit(train)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    t0 = time.process_time()
    for lo in range(0, len(rest), 60):
        model.residuals(rest[lo : lo + 60])
    score = (time.process_time() - t0) / (len(rest) * metrics)
    return {
        "fit_cpu_s": round(cpu, 2),
        "fit_wall_s": round(wall, 2),
        "fit_peak_mb": round(peak / 1e6, 1),
        "score_us_per_reading": round(1e6 * score, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metrics", default="4,10,20,50,100,200")
    parser.add_argument("--rows", type=int, default=60480)
    args = parser.parse_args()
    result: dict[str, object] = {"rows": args.rows, "metrics": {}}
    VirtualSensorResidual().fit(wide_device(2, 2000))  # imports and first calls, not timed
    print(f"fit on {args.rows} rows; then scoring 8640 rows in 60-row batches")
    print(f"{'metrics':>7} {'fit CPU s':>10} {'fit wall s':>10} {'peak MB':>8} {'us/reading':>10}")
    for m in (int(x) for x in args.metrics.split(",")):
        r = measure(m, args.rows)
        result["metrics"][str(m)] = r  # type: ignore[index]
        print(
            f"{m:>7} {r['fit_cpu_s']:>10} {r['fit_wall_s']:>10} {r['fit_peak_mb']:>8}"
            f" {r['score_us_per_reading']:>10}",
            flush=True,
        )
    save_json(result, ROOT / "bench" / "results" / "detection_wide.json")


if __name__ == "__main__":
    main()
