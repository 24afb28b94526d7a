"""What the demo's detection finds: the demo's simulated fleet (10 motors, the agent's
simulator with `make demo`'s fault settings) fed to the detection engine with the demo's
warm-up, as stored batches of about 5 s. Per fleet (simulator seed): injected faults found
by type (an anomaly naming the device and metric between the fault's start and 60 s after
its end), anomalies outside any fault (``stray``), and anomalies of the same fleet run
without faults (``healthy``). Writes bench/results/detection_demo.json (or
detection_demo_<seeds>.json). Run from the repository root:

    python bench/detection_demo.py [--seeds 1] [--minutes 10] [--history 12h]

Seed 1 is the fleet the demo-fault test runs; docs/detection.md reports seeds 2-13 too.
``--history 12h`` runs the default demo instead: each machine's healthy past first (a
reading every 10 s), the live defaults, the faults the device models find (stuck, shift,
overheat);
a fault that began less than its settling time before the end (groundtruth.SETTLE_S) and
was not found yet is counted as ``recent``, not missed. JSON keys as without it, plus
``history_h``, ``recent`` and ``median_delay_s`` (per fault type); the file is detection_demo_history[_<seeds>].json.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from statistics import median

from detection_sim import parse_seeds

from millstream_agent.collectors._options import parse_duration
from millstream_agent.collectors.simulated import SimulatedCollector
from millstream_cloud.detection.eval import groundtruth
from millstream_cloud.model import Anomaly

ROOT = Path(__file__).resolve().parents[1]
# As in scripts/demo.py: the fleet's fault arguments (its detection settings:
# groundtruth.demo_settings()).
FAULTS = {"fault_rate_per_hour": 20.0, "fault_types": ["stuck", "spike"]}
FAULTS_WITH_HISTORY = {"fault_rate_per_hour": 20.0, "fault_types": ["stuck", "shift", "overheat"]}
START_AFTER = "150s"
T0 = 1_764_000_000.0  # a fixed start: the simulator's daily waves follow the clock


SLACK_S = groundtruth.SLACK_S


def run_fleet(
    seed: int, faults: bool, seconds: int, history_s: float = 0.0
) -> tuple[list[Anomaly], list[dict]]:
    """The anomalies the engine raises on one demo fleet, and the faults injected."""
    kinds = FAULTS_WITH_HISTORY if history_s else FAULTS
    options = {**kinds, "fault_start_after": START_AFTER} if faults else {}
    options.setdefault("fault_rate_per_hour", 0.0)
    machines = [
        SimulatedCollector(
            "machine",
            {"kind": "motor", "metrics": 10, "seed": seed, "device": f"demo-plant-{i:04d}"}
            | options,
        )
        for i in range(1, 11)
    ]
    return groundtruth.run_demo_fleet(machines, T0, seconds, history_s=history_s)


def score_fleet(seed: int, seconds: int, history_s: float = 0.0) -> dict:
    found, truth = run_fleet(seed, True, seconds, history_s)
    judged = dict(judged_before_s=T0 + seconds - 10, settle_s=groundtruth.SETTLE_S)
    result = groundtruth.compare(
        truth, [groundtruth.raised(a) for a in found], SLACK_S, **(judged if history_s else {})
    )
    healthy, _ = run_fleet(seed, False, seconds, history_s)
    delays: dict[str, list[float]] = {}
    for f in truth:
        hit = [a.time_ns / 1e9 for a in found if groundtruth.covers(f, groundtruth.raised(a))]
        if hit:
            delays.setdefault(f["fault"], []).append(min(hit) - groundtruth.timestamp(f["start"]))
    return {
        "delays_s": {k: sorted(round(d, 1) for d in v) for k, v in delays.items()},
        "recent": result["recent"],
        "faults": result["faults"],
        "stray": [_brief(found[i]) for i in result["stray"]],
        "misnamed": len(result["misnamed"]),
        "healthy": [_brief(a) for a in healthy],
    }


def _brief(a: Anomaly) -> dict:
    return {
        "device": a.device,
        "metric": a.metric,
        "detector": a.detector,
        "score": round(a.score, 3),
        "after_s": round(a.time_ns / 1e9 - T0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seeds", type=parse_seeds, default=(1,), help="e.g. 1 or 2-13")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--history", default="0", help="the fleet's past first, e.g. 12h")
    args = ap.parse_args()
    seconds = int(args.minutes * 60)
    history_s = parse_duration(args.history, "--history")
    per_seed = {}
    pooled: dict[str, Counter[str]] = {}
    for seed in args.seeds:
        r = per_seed[str(seed)] = score_fleet(seed, seconds, history_s)
        for kind, c in r["faults"].items():
            pooled.setdefault(kind, Counter()).update(c)
        faults = ", ".join(f"{k} {c['found']}/{c['of']}" for k, c in sorted(r["faults"].items()))
        print(
            f"seed {seed}: {faults}; recent {r['recent']}; stray {len(r['stray'])}"
            f" ({r['misnamed']} on a faulty device, another metric);"
            f" healthy run {len(r['healthy'])}"
        )
        sys.stdout.flush()
    pooled_delays: dict[str, list[float]] = {}
    for r in per_seed.values():
        for kind, ds in r["delays_s"].items():
            pooled_delays.setdefault(kind, []).extend(ds)
    out = {
        "median_delay_s": {k: median(v) for k, v in sorted(pooled_delays.items())},
        "history_h": history_s / 3600,
        "recent": sum(r["recent"] for r in per_seed.values()),
        "minutes": args.minutes,
        "seeds": list(args.seeds),
        "faults": {k: dict(c) for k, c in pooled.items()},
        "stray": sum(len(r["stray"]) for r in per_seed.values()),
        "misnamed": sum(r["misnamed"] for r in per_seed.values()),
        "healthy": sum(len(r["healthy"]) for r in per_seed.values()),
        "per_seed": per_seed,
    }
    faults = ", ".join(f"{k} {c['found']}/{c['of']}" for k, c in sorted(out["faults"].items()))
    delays = ", ".join(f"{k} {v:.0f} s" for k, v in out["median_delay_s"].items())
    print(
        f"pooled: {faults}; stray {out['stray']} ({out['misnamed']} on a faulty device, "
        f"another metric); healthy runs {out['healthy']}"
    )
    print(f"median delay from a fault's start to its first anomaly: {delays}")
    base = "detection_demo_history" if history_s else "detection_demo"
    name = f"{base}.json" if args.seeds == (1,) else f"{base}_{args.seeds[0]}-{args.seeds[-1]}.json"
    path = ROOT / "bench" / "results" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
