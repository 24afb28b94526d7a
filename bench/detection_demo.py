"""What the demo's detection finds: the demo's simulated fleet (10 motors, the agent's
simulator with `make demo`'s fault settings) fed to the detection engine with the demo's
warm-up, as stored batches of about 5 s. Per fleet (simulator seed): injected faults found
by type (an anomaly naming the device and metric between the fault's start and 60 s after
its end), anomalies outside any fault (``stray``), and anomalies of the same fleet run
without faults (``healthy``). Writes bench/results/detection_demo.json (or
detection_demo_<seeds>.json). Run from the repository root:

    python bench/detection_demo.py [--seeds 1] [--minutes 10]

Seed 1 is the fleet the demo-fault test runs; docs/detection.md reports seeds 2-13 too.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from detection_sim import parse_seeds

from millstream_agent.collectors.simulated import SimulatedCollector
from millstream_cloud.detection.eval import groundtruth
from millstream_cloud.model import Anomaly

ROOT = Path(__file__).resolve().parents[1]
# As in scripts/demo.py: the fleet's fault arguments (its detection settings:
# groundtruth.demo_settings()).
FAULTS = {"fault_rate_per_hour": 20.0, "fault_types": ["stuck", "spike"]}
START_AFTER = "150s"
T0 = 1_764_000_000.0  # a fixed start: the simulator's daily waves follow the clock


SLACK_S = groundtruth.SLACK_S


def run_fleet(seed: int, faults: bool, seconds: int) -> tuple[list[Anomaly], list[dict]]:
    """The anomalies the engine raises on one demo fleet, and the faults injected."""
    options = {**FAULTS, "fault_start_after": START_AFTER} if faults else {}
    options.setdefault("fault_rate_per_hour", 0.0)
    machines = [
        SimulatedCollector(
            "machine",
            {"kind": "motor", "metrics": 10, "seed": seed, "device": f"demo-plant-{i:04d}"}
            | options,
        )
        for i in range(1, 11)
    ]
    return groundtruth.run_demo_fleet(machines, T0, seconds)


def score_fleet(seed: int, seconds: int) -> dict:
    found, truth = run_fleet(seed, True, seconds)
    result = groundtruth.compare(truth, [groundtruth.raised(a) for a in found], SLACK_S)
    healthy, _ = run_fleet(seed, False, seconds)
    return {
        "faults": result["faults"],
        "stray": [_brief(found[i]) for i in result["stray"]],
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
    args = ap.parse_args()
    seconds = int(args.minutes * 60)
    per_seed = {}
    pooled: dict[str, Counter[str]] = {}
    for seed in args.seeds:
        r = per_seed[str(seed)] = score_fleet(seed, seconds)
        for kind, c in r["faults"].items():
            pooled.setdefault(kind, Counter()).update(c)
        faults = ", ".join(f"{k} {c['found']}/{c['of']}" for k, c in sorted(r["faults"].items()))
        print(f"seed {seed}: {faults}; stray {len(r['stray'])}; healthy run {len(r['healthy'])}")
        sys.stdout.flush()
    out = {
        "minutes": args.minutes,
        "seeds": list(args.seeds),
        "faults": {k: dict(c) for k, c in pooled.items()},
        "stray": sum(len(r["stray"]) for r in per_seed.values()),
        "healthy": sum(len(r["healthy"]) for r in per_seed.values()),
        "per_seed": per_seed,
    }
    faults = ", ".join(f"{k} {c['found']}/{c['of']}" for k, c in sorted(out["faults"].items()))
    print(f"pooled: {faults}; stray {out['stray']}; healthy runs {out['healthy']}")
    name = (
        "detection_demo.json"
        if args.seeds == (1,)
        else (f"detection_demo_{args.seeds[0]}-{args.seeds[-1]}.json")
    )
    path = ROOT / "bench" / "results" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
