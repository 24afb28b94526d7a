"""Helpers shared by the benchmarks: /proc readings, the agent's sample config, results,
benchmark checkouts."""

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


def ensure_checkout(checkout: Path, probe: str, url: str, result: Path, flag: str) -> None:
    """Make sure ``checkout`` holds a clone of ``url`` (``probe`` inside it must exist),
    cloning it if not; when that fails too (no network), say how to get one, write
    ``{"skipped": ...}`` to ``result`` and exit 0, so ``make bench`` runs the rest."""
    if (checkout / probe).is_dir():
        return
    cmd = ["git", "clone", "--quiet", url, str(checkout)]
    if subprocess.run(cmd, check=False).returncode == 0:
        return
    why = f"no checkout at {checkout} and `git clone {url}` failed"
    print(f"skipped: {why}; clone it elsewhere and pass {flag} DIR", file=sys.stderr)
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_text(json.dumps({"skipped": why}) + "\n", encoding="utf-8")
    sys.exit(0)
