"""SKAB (shared valve1 + valve2) with the frozen settings; writes bench/results/detection_skab.json.

Run from the repository root: ``python bench/detection_skab.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from millstream_cloud.detection.eval.cli import main

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / ".." / "shared" / "benchmarks" / "skab"

if __name__ == "__main__":
    out = ROOT / "bench" / "results" / "detection_skab.json"
    sys.exit(
        main(["eval", "skab", "--data", str(BENCH / "data"), "--json", str(out), *sys.argv[1:]])
    )
