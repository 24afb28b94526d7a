"""Detection throughput with the devices split over several processes (detection.processes).

Feeds the simulator's fleet (24 devices x 4 metrics, one reading every 10 s, batches of
``--every`` samples per device: 6 = 576 readings, about the in-process chunk; 60 = 5,760,
about what the sink hands a ``PartitionedEngine``) through one ``DetectionEngine`` and
through ``PartitionedEngine`` with 2 processes (``--processes 1,2,3`` for more), alternated
over ``--rounds``, and reports readings scored per second of wall-clock time while the
per-metric ensembles run (first 12 h) and once the per-device models are trained. The
findings must be the same whatever the count (checked here too). On these 2-core machines
more processes than cores cannot help; the figure to read is 1 against 2.
Writes bench/results/detection_processes.json (``_every<N>`` for other batch sizes). Run
from the repository root.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from millstream_cloud.detection.engine import DetectionEngine, device_partition
from millstream_cloud.detection.eval.sim import SimConfig, simulate
from millstream_cloud.detection.parallel import EngineSpec, PartitionedEngine
from millstream_cloud.model import Anomaly

ROOT = Path(__file__).resolve().parents[1]


def run(processes: int, phases: dict[str, list]) -> tuple[dict[str, object], list[tuple]]:
    engine: DetectionEngine | PartitionedEngine
    if processes == 1:
        engine = DetectionEngine()
    else:
        engine = PartitionedEngine(EngineSpec(DetectionEngine().settings), processes)
    found: list[Anomaly] = []
    out: dict[str, object] = {}
    try:
        for name, part in phases.items():
            n = sum(len(b) for b in part)
            t0 = time.perf_counter()
            for b in part:
                found += engine.observe(b)
            s = time.perf_counter() - t0
            out[name] = {"readings": n, "seconds": round(s, 2), "readings_per_s": round(n / s)}
        found += engine.flush()
    finally:
        if isinstance(engine, PartitionedEngine):
            engine.close()
    return out, sorted((a.device, a.metric, a.time_ns, a.detector) for a in found)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--processes", default="1,2", help="counts to compare (default 1,2)")
    ap.add_argument("--devices", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3, help="runs of each count, alternated")
    ap.add_argument(
        "--every", type=int, default=6, help="samples of every device per batch (6: 576 readings)"
    )
    args = ap.parse_args()
    fleet = simulate(SimConfig(seed=0, devices=args.devices, hours=16.0, faults=()))
    batches = list(fleet.batches(args.every))
    split = int(len(batches) * 12.5 / 16)  # the models train after 12 h of rows
    phases = {
        "warmup (per-metric ensembles)": batches[:split],
        "trained (per-device models)": batches[split:],
    }
    devices = sorted({r.device for r in batches[0]})
    counts = [int(x) for x in args.processes.split(",")]
    rates: dict[int, dict[str, list[int]]] = {p: {k: [] for k in phases} for p in counts}
    same: dict[int, bool] = {p: True for p in counts}
    reference = None
    # Alternated, because these shared machines' speed drifts by tens of percent.
    for rnd in range(args.rounds):
        for p in counts:
            figures, found = run(p, phases)
            reference = found if reference is None else reference
            same[p] = same[p] and found == reference
            for k in phases:
                rates[p][k].append(int(figures[k]["readings_per_s"]))  # type: ignore[index]
            cells = "  ".join(
                f"{k.split(' ')[0]} {v['readings_per_s']:>7,}" for k, v in figures.items()
            )
            print(f"round {rnd + 1}: {p} process(es)  {cells} readings/s", flush=True)
    runs: dict[str, object] = {}
    for p in counts:
        share = [sum(device_partition(d, p) == k for d in devices) for k in range(p)]
        runs[str(p)] = {
            "devices_per_process": share,
            "same_findings": same[p],
            **{
                k: {"readings_per_s": sorted(v), "median": sorted(v)[len(v) // 2]}
                for k, v in rates[p].items()
            },
        }
    result: dict[str, object] = {
        "every": args.every,
        "cores": os.cpu_count(),
        "devices": len(devices),
        "rounds": args.rounds,
        "runs": runs,
    }
    print(f"{'processes':<10} {'devices each':<14} " + "  ".join(f"{k:<34}" for k in phases))
    for p in counts:
        r = runs[str(p)]
        cells = "  ".join(
            f"median {r[k]['median']:>7,} (range {min(rates[p][k]):,}-{max(rates[p][k]):,})".ljust(
                34
            )
            for k in phases
        )  # type: ignore[index]
        print(f"{p:<10} {r['devices_per_process']!s:<14} {cells}  same findings: {same[p]}")  # type: ignore[index]
    name = "detection_processes" + ("" if args.every == 6 else f"_every{args.every}")
    path = ROOT / "bench" / "results" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {path}")
