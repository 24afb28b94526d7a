"""NAB files the frozen settings were *not* chosen on: the full corpus minus the 18 shared files.

The frozen NAB parameters and threshold were picked on ``../shared/benchmarks/nab`` (18 files),
so that score flatters them. This scores the same frozen settings on the other 40 files of
NAB v1.1 beside the published detectors' own result files, each with its published corpus
thresholds, all by the same scorer. It needs a NAB checkout (not shipped here)::

    git clone https://github.com/numenta/NAB var/NAB   # the shared files are commit ea702d75cc22
    python bench/detection_nab_unseen.py [--nab var/NAB]

Without a checkout (``--nab``, else ``$MILLSTREAM_NAB_DIR``, else ``var/NAB``) it tries that
``git clone`` itself; if that fails too (no network) it says how to get one and writes
``{"skipped": ...}``, so ``make bench`` still runs the rest. Writes
bench/results/detection_nab_unseen.json. Run from the repository root.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from millstream_cloud.detection.eval import nab, runners

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._common import ensure_checkout  # noqa: E402

SHARED = ROOT / ".." / "shared" / "benchmarks" / "nab" / "data"
PUBLISHED = ("ARTime", "numenta")


def row(res: dict[str, Any]) -> dict[str, float]:
    return {nab.PROFILE_KEYS[p]: round(r.normalised, 2) for p, r in res.items()}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    default = Path(os.environ.get("MILLSTREAM_NAB_DIR", ROOT / "var" / "NAB"))
    ap.add_argument("--nab", type=Path, default=default, help="a NAB checkout (data/, labels/)")
    args = ap.parse_args()
    path = ROOT / "bench" / "results" / "detection_nab_unseen.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    ensure_checkout(args.nab, "data", "https://github.com/numenta/NAB", path, "--nab")
    t0 = time.perf_counter()
    tuned = {str(p.relative_to(SHARED)) for p in SHARED.glob("*/*.csv")}
    every = nab.load_corpus(args.nab / "data", args.nab / "labels")
    files = [f for f in every if f.name not in tuned]
    settings = runners.load_frozen()
    ours = [
        runners.streaming_scores(f.values, settings, int(nab.probation_length(len(f.values))))
        for f in files
    ]
    table: dict[str, Any] = {
        "millstream (frozen)": row(nab.score_corpus(files, ours, settings["nab"]["thresholds"]))
    }
    cfg = json.loads((args.nab / "config" / "thresholds.json").read_text(encoding="utf-8"))
    for det in PUBLISHED:
        th = {p: v["threshold"] for p, v in cfg[det].items()}
        table[f"{det} (corpus thresholds)"] = row(
            nab.score_corpus(files, nab.published_scores(args.nab / "results", det, files), th)
        )
    out = {
        "files": len(files),
        "windows": sum(len(f.windows) for f in files),
        "excluded_tuning_files": len(every) - len(files),
        "scores": table,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(f"NAB, {out['files']} files not used for tuning ({out['windows']} windows)")
    print(f"{'detector':32s} {'standard':>9s} {'low FP':>8s} {'low FN':>8s}")
    for name, r in table.items():
        print(f"{name:32s} {r['standard']:9.1f} {r['low_fp']:8.1f} {r['low_fn']:8.1f}")
    path.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {path}")
