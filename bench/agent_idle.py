"""Idle footprint of `millstream-agent run -c` with the sample-config output.

Starts Mosquitto, writes `millstream-agent sample-config --broker ...` (10 simulated
metrics at 1 Hz, disk queue with fsync full, self-monitoring every 10 s), runs the agent
connected, lets it settle, then samples RSS and CPU from /proc for --seconds.
Targets (issue 4): RSS <= 30 MB, CPU <= 1 % of one core.

    python bench/agent_idle.py [--seconds 60]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._common import cpu_seconds, rss_kb, sample_config  # noqa: E402
from tests.support.servers import mosquitto_server  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--settle", type=float, default=10.0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="agent-idle-"))
    broker = mosquitto_server(work / "mosquitto").start()
    agent = None
    try:
        url = f"mqtt://127.0.0.1:{broker.port}"
        sample = sample_config(url, work / "queue.db")
        config = work / "agent.yaml"
        config.write_text(sample)
        log = open(work / "agent.log", "wb")  # noqa: SIM115
        agent = subprocess.Popen(
            [sys.executable, "-m", "millstream_agent.cli", "run", "-c", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        time.sleep(args.settle)
        if agent.poll() is not None:
            raise SystemExit("agent exited:\n" + (work / "agent.log").read_text())
        c0, t0 = cpu_seconds(agent.pid), time.monotonic()
        samples = []
        while time.monotonic() - t0 < args.seconds:
            time.sleep(1.0)
            samples.append(rss_kb(agent.pid))
        c1, t1 = cpu_seconds(agent.pid), time.monotonic()
        connected = "connected to" in (work / "agent.log").read_text()
        result = {
            "benchmark": "agent_idle",
            "command": f"millstream-agent run -c <sample-config --broker {url}>",
            "seconds": round(t1 - t0, 1),
            "rss_mb_max": round(max(samples) / 1024, 2),
            "rss_mb_mean": round(sum(samples) / len(samples) / 1024, 2),
            "cpu_percent_of_one_core": round(100.0 * (c1 - c0) / (t1 - t0), 3),
            "connected": connected,
            "targets": {"rss_mb_max": 30, "cpu_percent_of_one_core": 1},
            "python": platform.python_version(),
            "machine": platform.machine(),
        }
        result["pass"] = (
            connected and result["rss_mb_max"] <= 30 and result["cpu_percent_of_one_core"] <= 1
        )
    finally:
        if agent is not None and agent.poll() is None:
            agent.terminate()
            agent.wait(timeout=20)
        broker.stop()
    out = ROOT / "bench" / "results" / "agent_idle.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
