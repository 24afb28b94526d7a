"""The per-metric ensemble tuned on the whole NAB corpus, as the published leaders were.

ARTime was developed with NAB as its test bed, and the other published detectors' parameters
and thresholds were chosen on the corpus too, so their corpus rows are figures on data
their settings were chosen on. This gives the like-for-like figure: the ensemble's six
parameters tuned on all 58 files by coordinate descent from the frozen values (thresholds
swept per profile, as NAB does), next to the frozen settings and ARTime's published row.
It says what the detector family can reach in-sample; it is **not** an estimate for
unseen data and the tuned values are not adopted (docs/detection.md). Needs a NAB checkout
as ``detection_nab_unseen.py`` does; about 30 minutes on one core.
Writes bench/results/detection_nab_insample.json. Run from the repository root.
"""

from __future__ import annotations

import argparse
import copy
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

GRID: dict[str, list[float]] = {
    "refractory_warmups": [0.2, 0.3, 0.4, 0.5, 0.6],
    "tail_reference": [0, 1500, 3000, 6000],
    "short": [3, 4, 6, 8],
    "long": [16, 24, 32, 48],
    "history": [3000, 4000, 6000, 9000],
    "alert_level": [0.3, 0.35, 0.4, 0.45],
}


def corpus_row(
    files: list[nab.NabFile], base: dict[str, Any], params: dict[str, Any]
) -> list[float]:
    settings = copy.deepcopy(base)
    settings["streaming"]["params"] = dict(params)
    scores = [
        runners.streaming_scores(f.values, settings, int(nab.probation_length(len(f.values))))
        for f in files
    ]
    return [round(r.normalised, 2) for r in nab.score_corpus(files, scores, None).values()]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    default = Path(os.environ.get("MILLSTREAM_NAB_DIR", ROOT / "var" / "NAB"))
    ap.add_argument("--nab", type=Path, default=default, help="a NAB checkout (data/, labels/)")
    ap.add_argument("--rounds", type=int, default=2, help="coordinate-descent rounds")
    args = ap.parse_args()
    path = ROOT / "bench" / "results" / "detection_nab_insample.json"
    ensure_checkout(args.nab, "data", "https://github.com/numenta/NAB", path, "--nab")
    t0 = time.perf_counter()
    files = nab.load_corpus(args.nab / "data", args.nab / "labels")
    base = runners.load_frozen()
    current = dict(base["streaming"]["params"])
    frozen = best = corpus_row(files, base, current)
    print(f"frozen settings, thresholds swept on the corpus: {frozen}", flush=True)
    trials = [{"params": dict(current), "scores": frozen}]
    for rnd in range(args.rounds):
        improved = False
        for key, values in GRID.items():
            for value in values:
                if value == current[key]:
                    continue
                trial = {**current, key: value}
                row = corpus_row(files, base, trial)
                trials.append({"params": trial, "scores": row})
                print(f"  {key}={value}: {row}", flush=True)
                if row[0] > best[0] + 0.05:
                    best, current, improved = row, trial, True
        print(f"round {rnd + 1}: best {best} with {current}", flush=True)
        if not improved:
            break
    cfg = json.loads((args.nab / "config" / "thresholds.json").read_text(encoding="utf-8"))
    art_thresholds = {p: v["threshold"] for p, v in cfg["ARTime"].items()}
    art = nab.published_scores(args.nab / "results", "ARTime", files)
    art_row = [
        round(r.normalised, 2) for r in nab.score_corpus(files, art, art_thresholds).values()
    ]
    keys = ("standard", "low_fp", "low_fn")
    result = {
        "files": len(files),
        "frozen_swept": dict(zip(keys, frozen, strict=True)),
        "tuned_in_sample": dict(zip(keys, best, strict=True)),
        "tuned_params": current,
        "artime_published": dict(zip(keys, art_row, strict=True)),
        "trials": trials,
        "seconds": round(time.perf_counter() - t0),
    }
    print(f"in-sample best {best} ({current}); ARTime {art_row}; {result['seconds']} s")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")
