"""NAB (shared 18-file subset) with the frozen settings; writes bench/results/detection_nab.json.

Run from the repository root: ``python bench/detection_nab.py [--sweep]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from millstream_cloud.detection.eval.cli import main

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / ".." / "shared" / "benchmarks" / "nab"

if __name__ == "__main__":
    out = ROOT / "bench" / "results" / "detection_nab.json"
    sys.exit(
        main(
            [
                "eval",
                "nab",
                "--data",
                str(BENCH / "data"),
                "--labels",
                str(BENCH / "labels"),
                "--json",
                str(out),
                *sys.argv[1:],
            ]
        )
    )
