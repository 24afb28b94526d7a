"""SKAB loading and outlier-detection scoring, following SKAB's published conventions.

* every ``*.csv`` below the data folder that carries an ``anomaly`` column is a run
  (``anomaly-free/`` and files without labels are skipped, so is anything that is not CSV);
* the first 400 rows of each run are training data, only the rest is scored;
* TP/FP/FN/TN are pooled over all runs; F1 = TP / (TP + (FP + FN) / 2),
  FAR = 100 FP / (FP + TN), MAR = 100 FN / (FN + TP), rounded to 2 decimals.
"""

from __future__ import annotations

import io
import itertools
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import EvalInputError, finite_number

TRAIN_ROWS = 400
# SKAB's changepoint score (its own variant of NAB): a window of this many seconds to the
# right of each true changepoint; (A_TP, A_FP, A_FN) per profile, as NAB's.
CHANGEPOINT_WINDOW_S = 60.0
GRID = 1000
CHANGEPOINT_PROFILES: dict[str, tuple[float, float, float]] = {
    "standard": (1.0, -0.11, -1.0),
    "low_fp": (1.0, -0.22, -1.0),
    "low_fn": (1.0, -0.11, -2.0),
}
LABEL_COLUMNS = ("anomaly", "changepoint")


@dataclass(slots=True)
class SkabRun:
    name: str  # path relative to the data folder, e.g. "valve1/0.csv"
    columns: list[str]  # sensor channels, in file order
    values: np.ndarray  # rows x channels
    anomaly: np.ndarray  # 0/1 per row
    # For the changepoint score; None when the file has no such column.
    changepoint: np.ndarray | None = None  # 0/1 per row
    seconds: np.ndarray | None = None  # the row's ``datetime`` in seconds


def _read_table(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and the non-blank rows with their line numbers (for error messages)."""
    # Decode once and split on any line ending: SKAB ships CRLF, copies may be LF or mixed.
    text = path.read_bytes().decode("utf-8-sig")
    lines = [
        (no, ln)
        for no, ln in enumerate(io.StringIO(text, newline=None).read().splitlines(), 1)
        if ln.strip()
    ]
    if not lines:
        return [], []
    first = lines[0][1]
    sep = ";" if first.count(";") >= first.count(",") else ","
    header = [h.strip() for h in first.split(sep)]
    return header, [(no, ln.split(sep)) for no, ln in lines[1:]]


def read_run(path: Path, root: Path) -> SkabRun | None:
    """One run, or ``None`` when the file is not a labelled SKAB table.

    A labelled table with a row that is short, long or not numeric is an error naming the
    line: dropped silently, it would shift nothing but change the scores unnoticed."""
    try:
        header, rows = _read_table(path)
    except (UnicodeDecodeError, OSError):
        return None
    if "anomaly" not in header or not rows:
        return None
    sensors = [h for h in header if h not in LABEL_COLUMNS and h != "datetime"]
    idx = [header.index(c) for c in sensors]
    a_idx = header.index("anomaly")
    c_idx = header.index("changepoint") if "changepoint" in header else None
    t_idx = header.index("datetime") if "datetime" in header else None
    vals = np.empty((len(rows), len(sensors)))
    lab = np.empty(len(rows), dtype=np.int8)
    cps = np.zeros(len(rows), dtype=np.int8) if c_idx is not None else None
    secs = np.empty(len(rows)) if t_idx is not None else None
    for k, (no, r) in enumerate(rows):
        if len(r) != len(header):
            raise EvalInputError(f"{path} line {no}: {len(r)} fields, the header has {len(header)}")
        where = f"{path} line {no}"
        vals[k] = [finite_number(r[i], where, header[i], "a number") for i in idx]
        lab[k] = finite_number(r[a_idx], where, "anomaly", "a number") > 0.5
        if cps is not None and c_idx is not None:
            cps[k] = finite_number(r[c_idx], where, "changepoint", "a number") > 0.5
        if secs is not None and t_idx is not None:
            secs[k] = _seconds(r[t_idx], where)
    return SkabRun(path.relative_to(root).as_posix(), sensors, vals, lab, cps, secs)


def _seconds(text: str, where: str) -> float:
    try:
        return datetime.fromisoformat(text.strip()).replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        raise EvalInputError(
            f"{where}: datetime {text.strip()!r} is not a time (YYYY-MM-DD hh:mm:ss)"
        ) from None


def load_runs(data_dir: Path) -> list[SkabRun]:
    """Every labelled run below ``data_dir`` in a stable order (folder, then file number)."""

    def key(p: Path) -> tuple[str, int, str]:
        stem = p.stem
        return (p.parent.as_posix(), int(stem) if stem.isdigit() else 1 << 30, stem)

    runs = []
    for path in sorted(data_dir.rglob("*.csv"), key=key):
        run = read_run(path, data_dir)
        if run is not None:
            runs.append(run)
    if not runs:
        raise FileNotFoundError(
            f"no labelled SKAB run (CSV with an 'anomaly' column) in {data_dir}"
        )
    return runs


def unlabelled_files(data_dir: Path, runs: Iterable[SkabRun]) -> list[str]:
    """The CSV files below ``data_dir`` that are not scored runs, but for SKAB's own
    ``anomaly-free/`` folder (expected to be skipped): a run with a misspelt label
    column, an empty file, a table of something else. Said, so a score over fewer runs
    than the folder holds is not taken for the whole folder's."""
    scored = {r.name for r in runs}
    return sorted(
        name
        for name in (p.relative_to(data_dir).as_posix() for p in data_dir.rglob("*.csv"))
        if name not in scored and "anomaly-free" not in name.split("/")[:-1]
    )


@dataclass(slots=True)
class SkabScore:
    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def f1(self) -> float:
        denom = self.tp + (self.fp + self.fn) / 2
        return round(self.tp / denom, 2) if denom else 0.0

    @property
    def far(self) -> float:
        denom = self.fp + self.tn
        return round(100.0 * self.fp / denom, 2) if denom else 0.0

    @property
    def mar(self) -> float:
        denom = self.fn + self.tp
        return round(100.0 * self.fn / denom, 2) if denom else 0.0


def score_runs(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> SkabScore:
    """Pool the confusion counts of (truth, prediction) pairs over the test parts."""
    tp = fp = fn = tn = 0
    for truth, pred in pairs:
        t = np.asarray(truth, dtype=bool)
        p = np.asarray(pred, dtype=bool)
        tp += int(np.sum(t & p))
        fp += int(np.sum(~t & p))
        fn += int(np.sum(t & ~p))
        tn += int(np.sum(~t & ~p))
    return SkabScore(tp, fp, fn, tn)


def lag_autocorrelation(x: np.ndarray, lag: int) -> float:
    """Autocorrelation of ``x`` at ``lag``; 1.0 for a constant series (it cannot move)."""
    x = np.asarray(x, dtype=float) - float(np.mean(x))
    var = float(x @ x)
    if var <= 0.0 or len(x) <= lag:
        return 1.0
    return float(x[:-lag] @ x[lag:]) / var


def slow_channels(runs: list[SkabRun], train_rows: int, lag: int, max_acf: float) -> set[str]:
    """Channels that wander slowly in the training rows (thermal lag, for instance).

    Such a channel's training mean does not describe the rest of the run, so a fixed model
    would flag its drift as a fault. The decision uses training rows only: the mean, over
    runs, of each channel's autocorrelation at ``lag`` rows within its first ``train_rows``.
    """
    acf: dict[str, list[float]] = {}
    for run in runs:
        train = run.values[:train_rows]
        for j, name in enumerate(run.columns):
            acf.setdefault(name, []).append(lag_autocorrelation(train[:, j], lag))
    return {name for name, v in acf.items() if float(np.mean(v)) > max_acf}


@dataclass(slots=True)
class ChangepointScore:
    """SKAB's changepoint score over the test parts: the three profiles (normalised, 0 for
    the null detector, 100 for the perfect one), windows missed and changepoints predicted
    outside every window."""

    standard: float
    low_fp: float
    low_fn: float
    missed_cps: int
    fps: int
    windows: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def predicted_changepoints(pred: np.ndarray) -> np.ndarray:
    """Rows where a binary prediction switches on or off (the first row counts as a switch
    when it is on): SKAB turns outlier predictions into changepoints this way."""
    p = np.asarray(pred, dtype=np.int8)
    if len(p) == 0:
        return np.zeros(0, dtype=bool)
    return np.abs(np.diff(p, prepend=0)) > 0


def changepoint_windows(seconds: np.ndarray, changepoint: np.ndarray) -> list[tuple[float, float]]:
    """[cp, cp + 60 s] for each true changepoint; where one overlaps the next, the later
    one starts where the earlier ends."""
    starts = seconds[np.asarray(changepoint, dtype=bool)]
    wins = [[float(t), float(t) + CHANGEPOINT_WINDOW_S] for t in starts]
    for a, b in itertools.pairwise(wins):
        if a[1] >= b[0]:
            b[0] = a[1]
    return [(a, b) for a, b in wins]


def _window_reward(rel: float, tp: float, fp: float) -> float:
    """A_TP at the window's start (``rel`` 0) falling to A_FP at its end (1), along a tanh.

    As SKAB computes it, on a grid of 1,000 points from start to end: a detection in the
    i-th thousandth of the window gets the i-th point's value (this reproduces its
    published rows to the last digit, where the exact position is 0.01 off in some)."""
    step = min(int(rel * GRID), GRID - 1)
    x = -math.pi / 2 + math.pi * step / (GRID - 1)
    return fp + (tp - fp) / 2 * (1 - math.tanh(x) / math.tanh(math.pi / 2))


def score_changepoints(
    runs: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> ChangepointScore:
    """Score binary predictions as changepoints, pooled over the runs' test parts, each
    given as (seconds, true changepoint flags, prediction) of its scored rows."""
    per_window: list[float | None] = []  # position of the first prediction in each window
    outside = 0
    for seconds, truth, pred in runs:
        wins = changepoint_windows(np.asarray(seconds, dtype=float), truth)
        times = np.asarray(seconds, dtype=float)[predicted_changepoints(pred)]
        inside = np.zeros(len(times), dtype=bool)
        for start, end in wins:
            hit = (times >= start) & (times <= end)
            inside |= hit
            first = times[hit]
            per_window.append(_relative(float(first[0]), start, end) if len(first) else None)
        outside += int((~inside).sum())
    n = len(per_window)
    scores = {}
    for name, (a_tp, a_fp, a_fn) in CHANGEPOINT_PROFILES.items():
        total = a_fp * outside
        for rel in per_window:
            total += a_fn if rel is None else _window_reward(rel, a_tp, a_fp)
        null, perfect = a_fn * n, a_tp * n
        scores[name] = round(100.0 * (total - null) / (perfect - null), 2) if n else 0.0
    missed = sum(rel is None for rel in per_window)
    return ChangepointScore(
        scores["standard"], scores["low_fp"], scores["low_fn"], missed, outside, n
    )


def _relative(t: float, start: float, end: float) -> float:
    return (t - start) / (end - start) if end > start else 0.0
