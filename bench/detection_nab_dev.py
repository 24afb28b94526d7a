"""A change to the frozen NAB settings tried the way docs/detection.md tries them: on the
"dev" files only (the 18 shared files plus half A of the other 40), threshold swept on
them, against the frozen settings on the same files; half B (the other 20, which decide)
only when asked (``--files b``), and rarely. The halves: the 40 files not shared, sorted by
path, alternately (A: 1st, 3rd, ...; B: 2nd, 4th, ...). Needs a NAB checkout as
``detection_nab_unseen.py`` does. Examples::

    python bench/detection_nab_dev.py --set '{"memory": 100000}'
    python bench/detection_nab_dev.py --files 18 --set '{"short": 8}' --set '{"long": 24}'

Writes bench/results/detection_nab_dev.json. Run from the repository root.
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

SHARED = ROOT / ".." / "shared" / "benchmarks" / "nab" / "data"


def subsets(every: list[nab.NabFile]) -> dict[str, list[nab.NabFile]]:
    shared = {str(p.relative_to(SHARED)) for p in SHARED.glob("*/*.csv")}
    tuned = [f for f in every if f.name in shared]
    others = sorted((f for f in every if f.name not in shared), key=lambda f: f.name)
    a, b = others[0::2], others[1::2]
    return {"dev": tuned + a, "18": tuned, "a": a, "b": b}


def scores(files: list[nab.NabFile], settings: dict[str, Any]) -> dict[str, Any]:
    out = [
        runners.streaming_scores(f.values, settings, int(nab.probation_length(len(f.values))))
        for f in files
    ]
    swept = nab.score_corpus(files, out, None)
    frozen = nab.score_corpus(files, out, settings["nab"]["thresholds"])
    return {
        "swept": {nab.PROFILE_KEYS[p]: round(r.normalised, 2) for p, r in swept.items()},
        "at_frozen_thresholds": {
            nab.PROFILE_KEYS[p]: round(r.normalised, 2) for p, r in frozen.items()
        },
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    default = Path(os.environ.get("MILLSTREAM_NAB_DIR", ROOT / "var" / "NAB"))
    ap.add_argument("--nab", type=Path, default=default, help="a NAB checkout (data/, labels/)")
    ap.add_argument("--files", choices=("dev", "18", "a", "b"), default="dev")
    ap.add_argument(
        "--set", action="append", default=[], help="JSON of ensemble parameters to change"
    )
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "detection_nab_dev.json"))
    args = ap.parse_args()
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    ensure_checkout(args.nab, "data", "https://github.com/numenta/NAB", path, "--nab")
    t0 = time.perf_counter()
    files = subsets(nab.load_corpus(args.nab / "data", args.nab / "labels"))[args.files]
    base = runners.load_frozen()
    rows = []
    for change in [{}] + [json.loads(s) for s in args.set]:
        settings = copy.deepcopy(base)
        settings["streaming"]["params"].update(change)
        row = {"change": change, **scores(files, settings)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "files": args.files,
        "count": len(files),
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")
