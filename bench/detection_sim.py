"""Fault simulator, seeds 0-2 (recall, precision, median delay); writes
bench/results/detection_sim.json. Run from the repository root: ``python bench/detection_sim.py``.

``--seeds 100-109`` scores other fleets instead (the held-out seeds in docs/detection.md) and
writes bench/results/detection_sim_<first>-<last>.json. ``--jitter-ms 400`` stamps each
reading up to 400 ms after its sample's time (metrics read one after another) and adds
``_jitter<ms>`` to the file name. ``--step-s 1 --hours 20 --devices 6`` runs fleets read
every second (the agent's default; shorter and smaller, about 1.5 minutes a seed) and adds
``_step1`` to the name; ``--engine '{"mv_resolution_s": 0}'`` overrides engine settings
(added to the name as ``_engine``). ``--curves`` runs machines whose metrics follow powers
of the load (a pump's pressure and power by the affinity laws: ``sim.CURVES``), the same
random draws otherwise, and adds ``_curves``. ``--hours 72 --fault-after 40`` starts the
faults after 40 hours instead of 14 (models trained on more of the machines' loads) and adds
``_fault_after40h``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import median

from millstream_cloud.detection.eval import runners
from millstream_cloud.detection.eval.sim import SimConfig, least_hours

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)


def parse_seeds(text: str) -> tuple[int, ...]:
    """``0,1,2`` or ``100-109``."""
    if "-" in text:
        lo, hi = (int(x) for x in text.split("-", 1))
        return tuple(range(lo, hi + 1))
    return tuple(int(x) for x in text.split(","))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=parse_seeds, default=SEEDS, help="e.g. 0,1,2 or 100-109")
    ap.add_argument("--jitter-ms", type=float, default=0.0, help="late stamps, up to (ms)")
    ap.add_argument("--step-s", type=float, default=10.0, help="seconds between samples")
    ap.add_argument("--hours", type=float, default=36.0)
    ap.add_argument("--devices", type=int, default=12)
    ap.add_argument("--engine", type=json.loads, default={}, help="engine settings (JSON)")
    ap.add_argument("--curves", action="store_true", help="metrics follow powers of the load")
    ap.add_argument("--fault-after", type=float, default=14.0, help="earliest fault onset (h)")
    args = ap.parse_args()
    if args.hours < least_hours(args.fault_after):
        ap.error(
            f"--hours {args.hours:g}: at least {least_hours(args.fault_after):g} with faults "
            f"from hour {args.fault_after:g} (they last up to 2 h, with an hour to spare)"
        )
    SEEDS = args.seeds
    settings = runners.load_frozen()
    settings["engine"] = {**settings.get("engine", {}), **args.engine}
    per_seed = {}
    tp_faults = n_faults = 0
    tp_anoms = n_anoms = 0
    delays: list[float] = []
    false_by_day: list[int] = []
    for seed in SEEDS:
        cfg = SimConfig(
            seed=seed,
            step_s=args.step_s,
            hours=args.hours,
            devices=args.devices,
            curves=args.curves,
            fault_after_h=args.fault_after,
        )
        r = runners.run_sim(settings, config=cfg, jitter_ms=args.jitter_ms)
        per_seed[str(seed)] = r
        n_faults += len(r["faults"])
        tp_faults += sum(f["detected"] for f in r["faults"])
        n_anoms += r["anomalies"]
        tp_anoms += r["anomalies"] - len(r["false_positives"])
        delays += [f["delay_s"] for f in r["faults"] if f["detected"]]
        for a in r["false_positives"]:
            day = int((a["time_ns"] - cfg.start_ns) // (86_400 * 10**9))
            false_by_day += [0] * (day + 1 - len(false_by_day))
            false_by_day[day] += 1
        print(
            f"seed {seed}: recall {r['recall']:.2f} precision {r['precision']:.2f} "
            f"median delay {r['median_delay_s']} s, {r['us_per_reading']} us/reading"
        )
    out = {
        "seeds": list(SEEDS),
        "jitter_ms": args.jitter_ms,
        "step_s": args.step_s,
        "hours": args.hours,
        "devices": args.devices,
        "engine": args.engine,
        "curves": args.curves,
        "fault_after_h": args.fault_after,
        "recall": round(tp_faults / n_faults, 4),
        "precision": round(tp_anoms / n_anoms, 4) if n_anoms else 1.0,
        "median_delay_s": round(median(delays), 1) if delays else None,
        "false_by_day": false_by_day,  # anomalies outside every fault, by day of the run
        "per_seed": per_seed,
    }
    print(
        f"pooled over seeds {SEEDS}: recall {out['recall']:.2f} precision "
        f"{out['precision']:.2f} median delay {out['median_delay_s']} s"
    )
    name = "detection_sim" if SEEDS == (0, 1, 2) else f"detection_sim_{SEEDS[0]}-{SEEDS[-1]}"
    if args.jitter_ms:
        name += f"_jitter{args.jitter_ms:g}"
    if args.step_s != 10.0:
        name += f"_step{args.step_s:g}"
    if args.engine:
        name += "_engine"
    if args.curves:
        name += "_curves"
    if args.fault_after != 14.0:
        name += f"_fault_after{args.fault_after:g}h"
    path = ROOT / "bench" / "results" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {path}")
