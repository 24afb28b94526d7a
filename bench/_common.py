"""Helpers shared by the benchmarks: /proc readings, the agent's sample config, results,
benchmark checkouts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

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


def save_json(out: dict, path: Path) -> None:
    """Write a benchmark's figures to ``path`` (keys sorted) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {path}")


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


# --- saves of the detection state (bench/detection_state.py, bench/detection_save.py) ---


class TimedLock:
    """A lock that remembers the longest time it was held."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.longest = 0.0
        self._t0 = 0.0

    def __enter__(self) -> None:
        self.lock.acquire()
        self._t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.longest = max(self.longest, time.perf_counter() - self._t0)
        self.lock.release()


def size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def files(directory: Path) -> dict[Path, tuple[int, int]]:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*.*")}


def written(before: dict[Path, tuple[int, int]], after: dict[Path, tuple[int, int]]) -> int:
    """Bytes a save wrote: files it rewrote whole, and what it appended to rows files."""
    out = 0
    for p, (n, mtime) in after.items():
        old = before.get(p)
        if old is None or old[1] != mtime:
            out += n - old[0] if old is not None and p.suffix == ".rows" else n
    return out


def timed_save(engine: Any, where: Path) -> tuple[float, TimedLock]:
    """Save ``engine`` (a DetectionEngine) under ``where``: wall time and its guard."""
    lock = TimedLock()
    t0 = time.perf_counter()
    engine.save(where, guard=lock)
    return time.perf_counter() - t0, lock
