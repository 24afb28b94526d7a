"""`millstream-agent simulate --devices 1000 --rate 1 --metrics 10` on one core.

10,000 readings/s from 1,000 devices, each its own MQTT session, all on one event loop.
Measures the simulator's CPU (utime+stime from /proc, % of one core), its RSS, how many
devices connected, and generated/published/acknowledged from its last stdout line.
The simulator is pinned to one CPU (taskset) when available; Mosquitto runs beside it.

    python bench/agent_simulate.py [--devices 1000] [--seconds 60]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._common import cpu_seconds, rss_kb  # noqa: E402
from tests.support.servers import mosquitto_server  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=1.0)
    ap.add_argument("--metrics", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=60.0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="agent-sim-"))
    broker = mosquitto_server(work / "mosquitto", persistence=False).start()
    url = f"mqtt://127.0.0.1:{broker.port}"
    cmd = [
        sys.executable,
        "-m",
        "millstream_agent.cli",
        "simulate",
        "--devices",
        str(args.devices),
        "--rate",
        str(args.rate),
        "--metrics",
        str(args.metrics),
        "--duration",
        str(args.seconds),
        "--broker",
        url,
    ]
    pinned = shutil.which("taskset") is not None and (os.cpu_count() or 1) > 1
    argv = (["taskset", "-c", "0"] if pinned else []) + cmd
    err = open(work / "simulate.log", "wb")  # noqa: SIM115
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err)
    try:
        time.sleep(min(10.0, args.seconds / 3))  # connect and settle
        c0, t0 = cpu_seconds(proc.pid), time.monotonic()
        rss = []
        while proc.poll() is None and time.monotonic() - started < args.seconds - 2:
            time.sleep(1.0)
            rss.append(rss_kb(proc.pid))
        c1, t1 = cpu_seconds(proc.pid), time.monotonic()
        out, _ = proc.communicate(timeout=args.seconds + 120)
    finally:
        if proc.poll() is None:
            proc.kill()
        broker.stop()
    elapsed = time.monotonic() - started
    counts = json.loads(out.decode().strip().splitlines()[-1])
    log = (work / "simulate.log").read_text(errors="replace")
    connected = log.count(" connected to ")
    expected = args.devices * args.rate * args.metrics
    result = {
        "benchmark": "agent_simulate",
        "command": " ".join(["millstream-agent", *cmd[3:]]),
        "pinned_to_one_cpu": pinned,
        "devices": args.devices,
        "devices_connected": connected,
        "seconds": args.seconds,
        "wall_seconds_including_drain": round(elapsed, 1),
        "target_readings_per_second": expected,
        "acknowledged_readings_per_second": round(counts["acknowledged"] / args.seconds),
        "cpu_percent_of_one_core_steady": round(100.0 * (c1 - c0) / (t1 - t0), 1),
        "rss_mb_max": round(max(rss, default=0) / 1024, 1),
        **counts,
    }
    result["pass"] = (
        connected >= args.devices
        and counts["generated"] == counts["acknowledged"]
        and result["acknowledged_readings_per_second"] >= 0.97 * expected
        and result["cpu_percent_of_one_core_steady"] < 100
    )
    out_path = ROOT / "bench" / "results" / "agent_simulate.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
