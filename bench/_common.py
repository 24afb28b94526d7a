"""Helpers shared by the benchmarks: /proc readings, the agent's sample config, results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kb(pid: int) -> int:
    """Resident set size of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def sample_config(broker_url: str, queue_path: Path) -> str:
    """`millstream-agent sample-config` for this broker and queue file, as the user gets it."""
    return subprocess.run(
        [sys.executable, "-m", "millstream_agent.cli", "sample-config",
         "--broker", broker_url, "--queue-path", str(queue_path)],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip


def write_result(result: dict, out: str | Path) -> None:
    """Write a benchmark's figures to its JSON file and print them."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
