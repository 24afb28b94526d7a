"""Two faults at once on one device: the second starts while the first is still open.

Each run is a fleet of a motor and a pump (seeds 0-2 by default, 24 h, 10-s samples); on
each device a first fault starts at 20:00 and a second one, on another metric, ``--gap-min``
minutes later (20 by default), for every ordered pair of the simulator's fault kinds that
hit different metrics (18 pairs). The fleets are scored twice: with the live default
(``mv_max_incidents`` 2: an open incident's metric is distrusted and a second fault gets an
incident of its own) and with one incident per device (1, as before). Writes
bench/results/detection_sim_overlap.json. Run from the repository root:
``python bench/detection_sim_overlap.py`` (about 8 minutes on 2 cores).

Per setting: ``faults``, ``first_found`` and ``second_found`` (a fault is found when an
anomaly inside it, or up to 10 minutes after it, names its metric), ``recall``,
``anomalies``, ``wrong_metric`` (anomalies inside a pair's faults that name neither faulted
metric, the stuck check's excepted), ``outside`` (anomalies outside both), and the median
delays of each fault's first naming anomaly.
"""

from __future__ import annotations

import argparse
import itertools
from multiprocessing import Pool
from pathlib import Path
from statistics import median
from typing import Any

from _common import save_json

from millstream_cloud.detection.engine import DetectionEngine, EngineSettings
from millstream_cloud.detection.eval.sim import (
    FAULT_KINDS,
    FAULT_METRIC,
    SimConfig,
    inject,
    simulate,
)

ROOT = Path(__file__).resolve().parents[1]
GRACE_NS = 600 * 10**9
START_S = 20 * 3600


def pairs() -> list[tuple[str, str]]:
    """Ordered pairs of fault kinds that hit different metrics on both kinds of device."""
    return [
        (a, b)
        for a, b in itertools.permutations(FAULT_KINDS, 2)
        if all(FAULT_METRIC[k][a] != FAULT_METRIC[k][b] for k in FAULT_METRIC)
    ]


def run(job: tuple[int, str, str, float, int]) -> list[dict[str, Any]]:
    """One fleet with the pair (first, second) on both devices, through a fresh engine."""
    seed, first, second, gap_min, incidents = job
    fleet = simulate(SimConfig(seed=seed, devices=2, hours=24, faults=()))
    devices = list(fleet.kinds)
    placed = {
        d: (inject(fleet, d, first, START_S), inject(fleet, d, second, START_S + 60 * gap_min))
        for d in devices
    }
    engine = DetectionEngine(EngineSettings(mv_max_incidents=incidents))
    found = []
    for batch in fleet.batches():
        found += engine.observe(batch)
    found += engine.flush()
    out = []
    for d, (fa, fb) in placed.items():
        mine = [a for a in found if a.device == d]
        lo, hi = min(fa.start_ns, fb.start_ns), max(fa.end_ns, fb.end_ns) + GRACE_NS

        inside = [a for a in mine if lo <= a.time_ns <= hi]
        wrong = [
            a
            for a in inside
            if a.metric not in (fa.metric, fb.metric) and not a.detector.startswith("stuck")
        ]
        out.append(
            {
                "seed": seed,
                "device": d,
                "first": first,
                "second": second,
                "first_delay_s": delay(mine, fa),
                "second_delay_s": delay(mine, fb),
                "anomalies": len(mine),
                "wrong_metric": len(wrong),
                "outside": len(mine) - len(inside),
            }
        )
    return out


def delay(found: list[Any], f: Any) -> float | None:
    """Seconds from the fault's start to the first anomaly naming its metric, if any."""
    hits = [a.time_ns for a in found if a.metric == f.metric]
    hits = [t for t in hits if f.start_ns <= t <= f.end_ns + GRACE_NS]
    return (min(hits) - f.start_ns) / 1e9 if hits else None


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    firsts = [r["first_delay_s"] for r in rows if r["first_delay_s"] is not None]
    seconds = [r["second_delay_s"] for r in rows if r["second_delay_s"] is not None]
    return {
        "faults": 2 * len(rows),
        "first_found": len(firsts),
        "second_found": len(seconds),
        "recall": round((len(firsts) + len(seconds)) / (2 * len(rows)), 4),
        "anomalies": sum(r["anomalies"] for r in rows),
        "wrong_metric": sum(r["wrong_metric"] for r in rows),
        "outside": sum(r["outside"] for r in rows),
        "median_first_delay_s": median(firsts) if firsts else None,
        "median_second_delay_s": median(seconds) if seconds else None,
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated fleet seeds")
    ap.add_argument("--gap-min", type=float, default=20.0, help="second fault's start after")
    ap.add_argument("--processes", type=int, default=2)
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    out: dict[str, Any] = {"seeds": seeds, "gap_min": args.gap_min, "pairs": len(pairs())}
    for incidents in (2, 1):
        jobs = [(s, a, b, args.gap_min, incidents) for s in seeds for a, b in pairs()]
        with Pool(args.processes) as pool:
            rows = [r for part in pool.map(run, jobs) for r in part]
        result = summary(rows)
        by_pair = {}
        for a, b in pairs():
            mine = [r for r in rows if (r["first"], r["second"]) == (a, b)]
            by_pair[f"{a}->{b}"] = [
                sum(r["first_delay_s"] is not None for r in mine),
                sum(r["second_delay_s"] is not None for r in mine),
                len(mine),
            ]
        out[f"max_incidents_{incidents}"] = {**result, "by_pair": by_pair, "runs": rows}
        print(
            f"mv_max_incidents {incidents}: first found {result['first_found']}, second found "
            f"{result['second_found']} of {len(rows)} pairs (recall {result['recall']:.2f}); "
            f"{result['anomalies']} anomalies, {result['wrong_metric']} naming neither "
            f"faulted metric, {result['outside']} outside the faults; median delay "
            f"{result['median_first_delay_s']} s / {result['median_second_delay_s']} s"
        )
    path = ROOT / "bench" / "results" / "detection_sim_overlap.json"
    save_json(out, path)
