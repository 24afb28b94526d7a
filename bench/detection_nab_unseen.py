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

How far apart are the detectors, given that 40 files are few? ``bootstrap`` (``--resamples``,
default 2000) draws the 40 files with replacement and scores every detector on the same
draw (a corpus's raw score is the sum of its files' at a fixed threshold, and so are the
null and perfect scores it is normalised by): the gap Millstream minus each published
detector, its median and 5-95 % range, and the share of draws in which Millstream is
ahead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from millstream_cloud.detection.eval import nab, runners

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._common import ensure_checkout  # noqa: E402

SHARED = ROOT / ".." / "shared" / "benchmarks" / "nab" / "data"
PUBLISHED = ("ARTime", "numenta")


def row(res: dict[str, Any]) -> dict[str, float]:
    return {nab.PROFILE_KEYS[p]: round(r.normalised, 2) for p, r in res.items()}


def per_file_raw(
    files: list[nab.NabFile], scores: list[np.ndarray], thresholds: dict[str, float]
) -> dict[str, np.ndarray]:
    """Each file's raw score per profile at the given thresholds."""
    out = {p: np.empty(len(files)) for p in nab.PROFILES}
    for i, (f, s) in enumerate(zip(files, scores, strict=True)):
        for p, r in nab.score_corpus([f], [s], thresholds).items():
            out[p][i] = r.raw
    return out


def bootstrap(
    raws: dict[str, dict[str, np.ndarray]], windows: np.ndarray, resamples: int, seed: int = 0
) -> dict[str, Any]:
    """The gap between the first detector of ``raws`` and each other, over draws of the
    files with replacement (the same draw for every detector)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(windows), size=(resamples, len(windows)))
    n_win = windows[draws].sum(axis=1)
    normalised: dict[str, dict[str, np.ndarray]] = {}
    for det, by_profile in raws.items():
        normalised[det] = {}
        for p, raw in by_profile.items():
            prof = nab.PROFILES[p]
            null, perfect = -prof["fn"] * n_win, prof["tp"] * n_win
            normalised[det][p] = 100.0 * (raw[draws].sum(axis=1) - null) / (perfect - null)
    ours, *others = raws
    gaps: dict[str, Any] = {}
    for det in others:
        gaps[det] = {}
        for p in nab.PROFILES:
            gap = normalised[ours][p] - normalised[det][p]
            lo, mid, hi = np.percentile(gap, [5, 50, 95])
            gaps[det][nab.PROFILE_KEYS[p]] = {
                "median": round(float(mid), 2),
                "p05": round(float(lo), 2),
                "p95": round(float(hi), 2),
                "ahead_share": round(float((gap > 0).mean()), 3),
            }
    return {"resamples": resamples, "seed": seed, "of": ours, "gap": gaps}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    default = Path(os.environ.get("MILLSTREAM_NAB_DIR", ROOT / "var" / "NAB"))
    ap.add_argument("--nab", type=Path, default=default, help="a NAB checkout (data/, labels/)")
    ap.add_argument("--resamples", type=int, default=2000, help="bootstrap draws (0: none)")
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
    raws = {"millstream (frozen)": per_file_raw(files, ours, settings["nab"]["thresholds"])}
    cfg = json.loads((args.nab / "config" / "thresholds.json").read_text(encoding="utf-8"))
    for det in PUBLISHED:
        th = {p: v["threshold"] for p, v in cfg[det].items()}
        theirs = nab.published_scores(args.nab / "results", det, files)
        table[f"{det} (corpus thresholds)"] = row(nab.score_corpus(files, theirs, th))
        raws[f"{det} (corpus thresholds)"] = per_file_raw(files, theirs, th)
    out = {
        "files": len(files),
        "windows": sum(len(f.windows) for f in files),
        "excluded_tuning_files": len(every) - len(files),
        "scores": table,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if args.resamples:
        windows = np.array([len(f.windows) for f in files])
        out["bootstrap"] = bootstrap(raws, windows, args.resamples)
    print(f"NAB, {out['files']} files not used for tuning ({out['windows']} windows)")
    print(f"{'detector':32s} {'standard':>9s} {'low FP':>8s} {'low FN':>8s}")
    for name, r in table.items():
        print(f"{name:32s} {r['standard']:9.1f} {r['low_fp']:8.1f} {r['low_fn']:8.1f}")
    if "bootstrap" in out:
        b = out["bootstrap"]
        print(f"gap, millstream minus each ({b['resamples']} draws of the files; 5-95 %, ahead):")
        for name, by in b["gap"].items():
            cells = "  ".join(
                f"{k} {g['median']:+.1f} [{g['p05']:+.1f}, {g['p95']:+.1f}] {g['ahead_share']:.0%}"
                for k, g in by.items()
            )
            print(f"  {name:30s} {cells}")
    path.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {path}")
