"""Planned stops: what the detectors report after a maintenance window (docs/detection.md,
*Maintenance windows*). Writes bench/results/detection_restart_<first>-<last>.json.

A simulated motor and pump (the cloud simulator's kinds: fast metrics follow the load, the
slow ones through a 20-minute thermal lag) run 30 or 48 hours at 10 s, stopped from hour 20
to 22 (fast metrics read about zero, the slow ones cool), inside a maintenance window set
over the stop (ending at the restart, or ``--window-after`` seconds after it). After a
healthy restart nothing should be reported; with a 6-sigma shift of one metric from the
restart on (the motor's vibration, the pump's motor current: a fault the work left) one
anomaly, named on that metric. Each run goes through the real service (sink, engine,
windows); what the sink hands on to the alert engine after the restart is counted.

Run from the repository root: ``python bench/detection_restart.py`` (seeds 0-5, 30 and 48
hours, about 10 minutes on 2 cores); ``--seeds 12-17`` scores other machines, and
``--no-window`` stops them unplanned (the "before restart" counts are then the stop's own
alerts). ``--fault-after 4`` starts the fault 4 hours after the restart instead, while the
stop's aftermath lasts (its metrics still distrusted), and ``--slow`` puts it on the
machines' slow metric (the bearing's, the fluid's temperature); what is handed on between
the restart and the fault's onset counts as false. ``--curves`` puts the machines' metrics
on the simulator's curves of the load (``sim.CURVES``, the same draws) and adds
``_curves`` to the file name.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import save_json

from millstream_cloud.detection.eval.sim import stopped
from millstream_cloud.services import Services
from millstream_cloud.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
S = 10**9
CASES = (("motor", "vibration_mm_s"), ("pump", "motor_current_a"))
SLOW_CASES = (("motor", "bearing_temp_c"), ("pump", "fluid_temp_c"))
STOP_H, RESTART_H = 20, 22


def _median_delay(faulty: list[dict]) -> float | None:
    """Hours from a fault's onset to its first report, the median over those reported."""
    first = [r["after_restart"][0]["hours_after"] for r in faulty if r["after_restart"]]
    return round(float(np.median(first)), 2) if first else None


def parse_seeds(text: str) -> list[int]:
    """``0,1,2`` or ``12-17``."""
    if "-" in text:
        lo, hi = (int(x) for x in text.split("-", 1))
        return list(range(lo, hi + 1))
    return [int(x) for x in text.split(",")]


def run(
    kind: str,
    metric: str,
    shift: float,
    seed: int,
    hours: float,
    after_s: int | None,
    fault_after_h: float = 0.0,
    curves: bool = False,
) -> dict:
    """One machine through the service, with a window over its stop unless ``after_s``
    is None (an unplanned stop), the fault from ``fault_after_h`` after the restart."""
    t0 = (time.time_ns() // 3600 // S - 2) * 3600 * S
    restart = t0 + RESTART_H * 3600 * S
    onset = restart + int(fault_after_h * 3600) * S if shift else restart
    with tempfile.TemporaryDirectory() as d:
        services = Services.build(Settings(data_dir=d), with_subscriber=False)
        handed_on: list[Any] = []
        services.anomalies.hooks.append(handed_on.extend)
        try:
            sink = services.anomalies
            if after_s is not None:
                start, end = t0 + STOP_H * 3600 * S, restart + after_s * S
                sink.start_maintenance(f"{kind}-00", "sim", start, end, "stop", "")
            fault_h = RESTART_H + fault_after_h
            batches = stopped(
                kind, metric, shift, seed, t0, hours, STOP_H, RESTART_H, fault_h, curves
            )
            for batch in batches:
                sink.process(batch)
            kept = int(sink.maintenance_anomalies._value.get())
        finally:
            services.stop()
    after = [a for a in handed_on if a.time_ns >= onset]
    between = [a for a in handed_on if restart <= a.time_ns < onset]
    return {
        "kind": kind,
        "fault": metric if shift else None,
        "seed": seed,
        "hours": hours,
        "kept_as_expected": kept,
        "before_restart": len(handed_on) - len(after) - len(between),
        "before_onset": len(between),
        "after_restart": [
            {
                "hours_after": round((a.time_ns - onset) / S / 3600, 2),
                "metric": a.metric,
                "detector": a.detector,
                "explanation": a.explanation,
            }
            for a in after
        ],
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=parse_seeds, default=parse_seeds("0-5"))
    ap.add_argument("--hours", default="30,48", help="run lengths, comma-separated")
    ap.add_argument("--window-after", type=int, default=0, help="window end after restart, s")
    ap.add_argument("--no-window", action="store_true", help="unplanned stops: no window")
    ap.add_argument(
        "--fault-after", type=float, default=0.0, help="fault onset, hours after the restart"
    )
    ap.add_argument("--slow", action="store_true", help="the fault on the slow metric")
    ap.add_argument("--curves", action="store_true", help="machines on curves (sim.CURVES)")
    args = ap.parse_args()
    after_s = None if args.no_window else args.window_after
    runs = []
    for hours in (float(h) for h in args.hours.split(",")):
        for kind, metric in SLOW_CASES if args.slow else CASES:
            for shift in (0.0, 6.0):
                for seed in args.seeds:
                    r = run(
                        kind, metric, shift, seed, hours, after_s, args.fault_after, args.curves
                    )
                    runs.append(r)
                    got = [(x["hours_after"], x["metric"]) for x in r["after_restart"]]
                    print(f"{hours:g} h {kind} fault={r['fault']} seed {seed}: {got}", flush=True)
    healthy = [r for r in runs if r["fault"] is None]
    faulty = [r for r in runs if r["fault"] is not None]
    out = {
        "seeds": args.seeds,
        "hours": args.hours,
        "window_after_s": after_s,
        "fault_after_h": args.fault_after,
        "slow": args.slow,
        "curves": args.curves,
        "healthy_restarts": len(healthy),
        "healthy_with_false_anomalies": sum(bool(r["after_restart"]) for r in healthy),
        "false_anomalies": sum(len(r["after_restart"]) for r in healthy),
        "false_before_onset": sum(r["before_onset"] for r in faulty),
        "faults": len(faulty),
        "faults_reported": sum(bool(r["after_restart"]) for r in faulty),
        "faults_named_first": sum(
            bool(r["after_restart"]) and r["after_restart"][0]["metric"] == r["fault"]
            for r in faulty
        ),
        "fault_anomalies": sum(len(r["after_restart"]) for r in faulty),
        # Hours from the fault's onset to its first report, over the faults reported.
        "median_delay_h": _median_delay(faulty),
        "runs": runs,
    }
    print(
        f"healthy restarts: {out['healthy_with_false_anomalies']} of {out['healthy_restarts']}"
        f" with false anomalies ({out['false_anomalies']}); faults: {out['faults_reported']}"
        f" of {out['faults']} reported, {out['faults_named_first']} named on the faulty"
        f" metric first ({out['fault_anomalies']} anomalies), median {out['median_delay_h']} h"
        f" after onset; {out['false_before_onset']} anomalies before a fault's onset"
    )
    name = f"detection_restart_{args.seeds[0]}-{args.seeds[-1]}"
    if args.no_window:
        name += "_no_window"
    if args.fault_after:
        name += f"_fault_after_{args.fault_after:g}h"
    if args.slow:
        name += "_slow"
    if args.curves:
        name += "_curves"
    save_json(out, ROOT / "bench" / "results" / f"{name}.json")
