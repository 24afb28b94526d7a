"""SKAB loading and outlier-detection scoring, following SKAB's published conventions.

* every ``*.csv`` below the data folder that carries an ``anomaly`` column is a run
  (``anomaly-free/`` and files without labels are skipped, so is anything that is not CSV);
* the first 400 rows of each run are training data, only the rest is scored;
* TP/FP/FN/TN are pooled over all runs; F1 = TP / (TP + (FP + FN) / 2),
  FAR = 100 FP / (FP + TN), MAR = 100 FN / (FN + TP), rounded to 2 decimals.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import EvalInputError, finite_number

TRAIN_ROWS = 400
LABEL_COLUMNS = ("anomaly", "changepoint")


@dataclass(slots=True)
class SkabRun:
    name: str  # path relative to the data folder, e.g. "valve1/0.csv"
    columns: list[str]  # sensor channels, in file order
    values: np.ndarray  # rows x channels
    anomaly: np.ndarray  # 0/1 per row


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
    vals = np.empty((len(rows), len(sensors)))
    lab = np.empty(len(rows), dtype=np.int8)
    for k, (no, r) in enumerate(rows):
        if len(r) != len(header):
            raise EvalInputError(f"{path} line {no}: {len(r)} fields, the header has {len(header)}")
        where = f"{path} line {no}"
        vals[k] = [finite_number(r[i], where, header[i], "a number") for i in idx]
        lab[k] = finite_number(r[a_idx], where, "anomaly", "a number") > 0.5
    return SkabRun(path.relative_to(root).as_posix(), sensors, vals, lab)


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
