"""SKAB runs the frozen settings were *not* chosen on: the 14 runs of SKAB's ``other`` folder.

The frozen SKAB settings (smoothing, on/off factors, the slow-channel rule) were chosen by
looking at the scores on ``../shared/benchmarks/skab`` (valve1 + valve2), so that score
flatters them. This scores the same settings on the ``other`` runs and on all 34 runs,
beside the published detectors (SKAB's leaderboard for the 34; their published prediction
files rescored for ``other``, see ``runners.SKAB_REFERENCE_OTHER``). Then, like for like, all
detectors on the rows Conv-AE's published predictions cover (each run's last 118 test rows
left out: Conv-AE never flags them; key ``scored_rows``, valve1 + valve2 from the shared
files as well). It needs a SKAB
checkout (not shipped here)::

    git clone https://github.com/waico/SKAB var/SKAB
    python bench/detection_skab_unseen.py [--skab var/SKAB]

Without a checkout (``--skab``, else ``$MILLSTREAM_SKAB_DIR``, else ``var/SKAB``) it tries that
``git clone`` itself; if that fails too (no network) it says how to get one and writes
``{"skipped": ...}``. Writes bench/results/detection_skab_unseen.json. Run from the
repository root.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from millstream_cloud.detection.eval import runners

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._common import ensure_checkout  # noqa: E402


def row(res: dict[str, Any]) -> dict[str, float]:
    return {"f1": res["f1"], "far": res["far"], "mar": res["mar"]}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    default = Path(os.environ.get("MILLSTREAM_SKAB_DIR", ROOT / "var" / "SKAB"))
    ap.add_argument("--skab", type=Path, default=default, help="a SKAB checkout (data/)")
    args = ap.parse_args()
    path = ROOT / "bench" / "results" / "detection_skab_unseen.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = args.skab / "data"
    ensure_checkout(args.skab, "data/other", "https://github.com/waico/SKAB", path, "--skab")
    settings = runners.load_frozen()
    other = runners.run_skab(data / "other", settings)
    every = runners.run_skab(data, settings)
    out = {
        "other": {"runs": other["runs"], "millstream (frozen)": row(other)},
        "all": {"runs": every["runs"], "millstream (frozen)": row(every)},
        "slow_channels_excluded": {
            "other": other["slow_channels_excluded"],
            "all": every["slow_channels_excluded"],
        },
    }
    for name, (f1, far, mar) in runners.SKAB_REFERENCE_OTHER.items():
        out["other"][name] = {"f1": f1, "far": far, "mar": mar}
    for name, (f1, far, mar) in runners.SKAB_REFERENCE_CORPUS.items():
        out["all"][name] = {"f1": f1, "far": far, "mar": mar}
    # SKAB's changepoint score of the same predictions, beside the published detectors'.
    keys = ("standard", "low_fp", "low_fn", "missed_cps", "fps")
    out["changepoint"] = {
        "other": {"millstream (frozen)": other["changepoint"]},
        "all": {"millstream (frozen)": every["changepoint"]},
    }
    for key in ("other", "all"):
        for name, cells in runners.SKAB_CHANGEPOINT[key].items():
            out["changepoint"][key][name] = dict(zip(keys, cells, strict=True))
    tail = runners.SKAB_CONV_AE_BLIND_TAIL
    valve = ROOT / ".." / "shared" / "benchmarks" / "skab" / "data"
    scored: dict[str, Any] = {"unscored_tail_rows": tail}
    for key, folder in (("valve", valve), ("other", data / "other"), ("all", data)):
        if key == "valve" and not valve.is_dir():
            continue
        ours = runners.run_skab(folder, settings, unscored_tail=tail)
        scored[key] = {"millstream (frozen)": row(ours)}
        for name, (f1, far, mar) in runners.SKAB_REFERENCE_SCORED_ROWS[key].items():
            scored[key][name] = {"f1": f1, "far": far, "mar": mar}
    out["scored_rows"] = scored
    for key, title in (
        ("other", "the 14 `other` runs (not used for any choice)"),
        ("all", "all 34 runs (SKAB's leaderboard)"),
    ):
        print(f"SKAB, {title}")
        print(f"  {'detector':22s} {'F1':>5s} {'FAR %':>7s} {'MAR %':>7s}")
        for name, r in out[key].items():
            if isinstance(r, dict):
                print(f"  {name:22s} {r['f1']:5.2f} {r['far']:7.2f} {r['mar']:7.2f}")
    print("Changepoints (SKAB's NAB-style score): standard, low FP, low FN, missed, FPs")
    for key in ("other", "all"):
        print(f"  {key}")
        for name, r in out["changepoint"][key].items():
            cells = " ".join(f"{r[k]:7.2f}" for k in keys[:3])
            print(f"    {name:20s} {cells} {r['missed_cps']:5d} {r['fps']:5d}")
    print(f"Like for like: each run's last {tail} test rows left out (Conv-AE never flags them)")
    for key in ("valve", "other", "all"):
        if key not in scored:
            continue
        print(f"  {key}")
        for name, r in scored[key].items():
            print(f"    {name:20s} {r['f1']:5.2f} {r['far']:7.2f} {r['mar']:7.2f}")
    path.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {path}")
