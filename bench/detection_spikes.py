"""The spike check (``SpikeBurst``): bursts it finds, and bursts it raises on healthy signals.

Found: five single-reading spikes of ``--sigmas`` (in noise sigma) within 10 minutes on
white noise read every second, after one and after three days of history (``--trials``
fleets each). Raised on healthy signals: four days of each of nine kinds, read every
second and every 10 s (white, Student t with 3 degrees of freedom, Laplace, AR(1), a
whole-degree wave, noise switching between 1 and 3 and between 1 and 10 sigma every two
hours, a machine switching between idle and running every two hours and every ten
minutes). With ``--nab DIR`` (a NAB checkout) also its 58 real series: bursts inside and
outside the labelled windows.

Writes bench/results/detection_spikes.json. Run from the repository root:
``python bench/detection_spikes.py [--nab DIR]``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from millstream_cloud.detection.streaming import SpikeBurst

ROOT = Path(__file__).resolve().parents[1]
DAY = 86400


def _healthy(rng: np.random.Generator) -> dict[str, Callable[[int], np.ndarray]]:
    def regime(m: int, period: int, low: float, high: float) -> np.ndarray:
        return np.where((np.arange(m) // period) % 2, low, high)

    def ar1(m: int) -> np.ndarray:
        e, out, acc = rng.normal(0, 1, m), np.empty(m), 0.0
        for i in range(m):
            acc = 0.95 * acc + e[i]
            out[i] = acc
        return out

    return {
        "white": lambda m: rng.normal(0, 1, m),
        "student_t3": lambda m: rng.standard_t(3, m),
        "laplace": lambda m: rng.laplace(0, 1, m),
        "ar1_0.95": ar1,
        "whole_degrees": lambda m: np.round(
            20 + 3 * np.sin(np.arange(m) / 5000) + rng.normal(0, 0.3, m)
        ),
        "noise_1_3": lambda m: rng.normal(0, 1, m) * regime(m, 7200, 1, 3),
        "noise_1_10": lambda m: rng.normal(0, 1, m) * regime(m, 7200, 1, 10),
        "idle_running_2h": lambda m: np.where(
            regime(m, 7200, 1, 0) > 0, 50 + rng.normal(0, 2, m), 0.5 * rng.random(m)
        ),
        "idle_running_10min": lambda m: np.where(
            (np.arange(m) // 600) % 3 == 0, 50 + rng.normal(0, 2, m), 0.5 * rng.random(m)
        ),
    }


def bursts(values: np.ndarray, step_s: float) -> int:
    det = SpikeBurst()
    return sum(det.update(float(v), i * step_s) is not None for i, v in enumerate(values))


def found(sigma: float, days: float, trials: int, rng: np.random.Generator) -> int:
    hits = 0
    for _ in range(trials):
        n = int(days * DAY)
        x = rng.normal(0, 1, n + 700)
        x[n + np.sort(rng.choice(600, 5, replace=False))] += sigma
        hits += bursts(x, 1.0) > 0
    return hits


def nab_bursts(nab_dir: Path) -> dict[str, int]:
    from millstream_cloud.detection.eval import nab

    files = nab.load_corpus(nab_dir / "data", nab_dir / "labels")
    inside = outside = 0
    days = 0.0
    for f in files:
        det, t0 = SpikeBurst(), f.timestamps[0]
        for t, v in zip(f.timestamps, f.values, strict=True):
            if det.update(float(v), (t - t0).total_seconds()) is not None:
                if any(a <= t <= b for a, b in f.windows):
                    inside += 1
                else:
                    outside += 1
        days += (f.timestamps[-1] - t0).total_seconds() / DAY
    return {"files": len(files), "days": round(days), "inside": inside, "outside": outside}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sigmas", default="6,8,10", help="spike sizes, in noise sigma")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--nab", type=Path, help="a NAB checkout (data/, labels/)")
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    out: dict[str, object] = {"trials": args.trials, "found": {}, "healthy_bursts": {}}
    print(f"five spikes within 10 min on white noise read every second ({args.trials} each):")
    for sigma in (float(s) for s in args.sigmas.split(",")):
        for days in (1, 3):
            hits = found(sigma, days, args.trials, rng)
            out["found"][f"{sigma:g}sigma_after_{days}d"] = hits  # type: ignore[index]
            print(f"  {sigma:g} sigma after {days} day(s) of history: {hits}/{args.trials}")
    print("bursts raised in 4 days of healthy signals (read every 1 s / every 10 s):")
    for name, gen in _healthy(rng).items():
        counts = {f"{step:g}s": bursts(gen(4 * DAY // step), float(step)) for step in (1, 10)}
        out["healthy_bursts"][name] = counts  # type: ignore[index]
        print(f"  {name:<20} {counts['1s']:>3} / {counts['10s']:>3}")
    if args.nab:
        res = nab_bursts(args.nab)
        out["nab"] = res
        print(
            f"NAB, {res['files']} real series ({res['days']} days): {res['inside']} bursts "
            f"inside the labelled windows, {res['outside']} outside"
        )
    out["seconds"] = round(time.perf_counter() - t0, 1)
    path = ROOT / "bench" / "results" / "detection_spikes.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path} ({out['seconds']} s)")


if __name__ == "__main__":
    main()
