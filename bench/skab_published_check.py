"""Check our SKAB scorers against SKAB's published leaderboard, from its prediction files.

SKAB publishes each detector's predictions as pickled pandas Series (``results/*.pkl`` in
its repository, one per run's test part). This reads them, scores them with
``millstream_cloud.detection.eval.skab`` (outlier F1/FAR/MAR and the changepoint score) on
all 34 runs and on the valve subset, and prints them beside the published rows
(``runners.SKAB_CHANGEPOINT["all"]`` and ``["valve"]``): they should agree to the last digit.

It needs pandas (not a dependency of the service: ``pip install pandas`` into the venv, or
run it with any Python that has both pandas and this package) and a SKAB checkout. The
pickles are unpickled, which runs code: use a checkout of waico/SKAB you trust::

    git clone https://github.com/waico/SKAB var/SKAB
    python bench/skab_published_check.py --skab var/SKAB

Writes bench/results/skab_published_check.json. Run from the repository root.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from millstream_cloud.detection.eval import runners, skab

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._common import ensure_checkout  # noqa: E402

# SKAB's own file names -> the leaderboard's; Isolation forest and ArimaFD predictions are
# max-filtered over 30 rows before they become changepoints (as SKAB's notebooks do).
DETECTORS = {
    "Conv_AE": ("Conv-AE", False),
    "Isolation_Forest": ("Isolation forest", True),
    "LSTM_AE": ("LSTM-AE", False),
    "MSET": ("MSET", False),
    "T2-q": ("T-squared+Q (PCA)", False),
    "T2": ("T-squared", False),
    "Vanilla_AE": ("Vanilla AE", False),
    "Arima_anomaly_detection": ("ArimaFD", True),
}


def _max_filter(p: np.ndarray, rows: int = 30) -> np.ndarray:
    return np.array([p[max(0, i - rows + 1) : i + 1].max() for i in range(len(p))])


def score(pkl: Path, runs: dict[float, skab.SkabRun], subset: str, filtered: bool) -> Any:
    import pandas as pd

    outliers, changes = [], []
    for series in pd.read_pickle(pkl):
        first = pd.Timestamp(series.index[0]).tz_localize("UTC").timestamp()
        run = runs[first]  # the run whose test part starts at that row
        if not run.name.startswith(subset):
            continue
        n = len(series)
        p = (series.to_numpy(dtype=float) > 0.5).astype(np.int8)
        outliers.append((run.anomaly[400 : 400 + n], p))
        q = _max_filter(p) if filtered else p
        assert run.seconds is not None and run.changepoint is not None
        changes.append((run.seconds[400 : 400 + n], run.changepoint[400 : 400 + n], q))
    out = skab.score_runs(outliers)
    return {"f1": out.f1, "far": out.far, "mar": out.mar} | skab.score_changepoints(
        changes
    ).as_dict()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--skab", type=Path, default=ROOT / "var" / "SKAB", help="a SKAB checkout")
    args = ap.parse_args()
    path = ROOT / "bench" / "results" / "skab_published_check.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import pandas  # noqa: F401
    except ImportError:  # not a dependency: skipped, so `make bench` runs the rest
        why = "needs pandas (pip install pandas; see the docstring)"
        print(f"skipped: {why}", file=sys.stderr)
        path.write_text(json.dumps({"skipped": why}) + "\n", encoding="utf-8")
        return 0
    ensure_checkout(args.skab, "results", "https://github.com/waico/SKAB", path, "--skab")
    runs = {r.seconds[400]: r for r in skab.load_runs(args.skab / "data") if r.seconds is not None}
    result: dict[str, Any] = {}
    for subset, label, published in (
        ("", "all 34 runs", runners.SKAB_CHANGEPOINT["all"]),
        ("valve", "valve1 + valve2", runners.SKAB_CHANGEPOINT["valve"]),
    ):
        print(f"{label}: ours from the prediction files | published changepoint row")
        result[label] = {}
        for file, (name, filtered) in DETECTORS.items():
            pkl = args.skab / "results" / f"results-{file}.pkl"
            if not pkl.exists():
                continue
            ours = score(pkl, runs, subset, filtered)
            result[label][name] = ours
            cells = (ours["standard"], ours["low_fp"], ours["low_fn"])
            ref = published.get(name)
            print(
                f"  {name:20s} F1 {ours['f1']:.2f} FAR {ours['far']:6.2f} MAR {ours['mar']:6.2f}"
                f" | cp {cells} missed {ours['missed_cps']} FPs {ours['fps']}"
                + (f" | published {ref}" if ref else "")
            )
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
