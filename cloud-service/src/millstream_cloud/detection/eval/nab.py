"""NAB scoring, following the rules published with the Numenta Anomaly Benchmark v1.1.

Implemented from the rule description in ``shared/benchmarks/README.md``:

* probationary period: the first ``min(floor(0.15 * N), 0.15 * 5000)`` rows are not scored;
* windows from ``combined_windows.json`` (both ends inclusive);
* scaled sigmoid ``2 / (1 + exp(5 y)) - 1`` (``-1`` for ``y >= 3``) weighting early detections
  in a window and false positives by distance past the preceding window;
* per window only the best (earliest) detection counts, a missed window costs ``-A_FN``;
* one threshold per profile for the whole corpus (detection means ``score >= threshold``),
  optionally swept over every distinct score value;
* normalisation ``100 * (S - S_null) / (S_perfect - S_null)``.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import EvalInputError, finite_number

PROFILES: dict[str, dict[str, float]] = {
    "standard": {"tp": 1.0, "fp": 0.11, "fn": 1.0},
    "reward_low_FP_rate": {"tp": 1.0, "fp": 0.22, "fn": 1.0},
    "reward_low_FN_rate": {"tp": 1.0, "fp": 0.11, "fn": 2.0},
}
# The JSON keys of the contract, per NAB profile name.
PROFILE_KEYS: dict[str, str] = {
    "standard": "standard",
    "reward_low_FP_rate": "low_fp",
    "reward_low_FN_rate": "low_fn",
}
PROBATION_PERCENT = 0.15


def scaled_sigmoid(y: float) -> float:
    """NAB's scaled sigmoid: about +0.987 at y=-1, 0 at y=0, -1 from y=3 on."""
    if y >= 3.0:
        return -1.0
    return 2.0 / (1.0 + math.exp(5.0 * y)) - 1.0


MAX_TP = scaled_sigmoid(-1.0)


def probation_length(n_rows: int) -> float:
    """Rows at the start of a file that are neither scored nor penalised."""
    return min(math.floor(PROBATION_PERCENT * n_rows), PROBATION_PERCENT * 5000)


def parse_time(text: str) -> datetime:
    """NAB's ``YYYY-MM-DD HH:MM:SS[.f]``, or any ISO 8601 time (``T``, an offset: as UTC)."""
    text = text.strip()
    for fmt in ("%Y-%m-%d %H:%M:%S.%f", "%Y-%m-%d %H:%M:%S"):
        try:
            return datetime.strptime(text, fmt)
        except ValueError:
            continue
    try:
        t = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    except ValueError:
        raise ValueError(f"unrecognised NAB timestamp {text!r}") from None
    # Windows and rows compare naive times; an offset is honoured by converting to UTC.
    return t.astimezone(timezone.utc).replace(tzinfo=None) if t.tzinfo else t


@dataclass(slots=True)
class NabFile:
    """One data file with its windows, ready to score."""

    name: str  # "<category>/<file>.csv", the key in combined_windows.json
    timestamps: list[datetime]
    values: np.ndarray
    windows: list[tuple[datetime, datetime]] = field(default_factory=list)


@dataclass(slots=True)
class _Rows:
    """Per scorable row: the detector score, the row's weight if detected, its window id."""

    scores: np.ndarray
    weights: np.ndarray  # A_TP-scaled sigmoid inside windows, A_FP-scaled outside
    window: np.ndarray  # global window index, -1 outside windows


def read_series(path: Path, value_column: str = "value") -> tuple[list[datetime], np.ndarray]:
    """Read a NAB-style CSV (``timestamp`` plus a value column), any line endings.

    A row that is not a time and a finite number stops the run with the file and line:
    scored without it, every later row's place in its window would be off."""
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in ("timestamp", value_column) if c not in (reader.fieldnames or [])]
        if missing:
            raise EvalInputError(
                f"{path}: no {' or '.join(repr(c) for c in missing)} column "
                f"(header: {', '.join(reader.fieldnames or []) or 'empty file'})"
            )
        ts: list[datetime] = []
        vals: list[float] = []
        for row in reader:
            where = f"{path} line {reader.line_num}"
            stamp, text = row["timestamp"] or "", row[value_column] or ""
            try:
                ts.append(parse_time(stamp))
            except ValueError as exc:
                raise EvalInputError(f"{where}: {exc}") from None
            vals.append(finite_number(text, where, value_column))
    return ts, np.asarray(vals, dtype=float)


def load_windows(labels_dir: Path) -> dict[str, list[tuple[datetime, datetime]]]:
    path = labels_dir / "combined_windows.json"
    if not path.is_file():
        raise EvalInputError(f"{path}: not found (NAB's labels/combined_windows.json)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8-sig"))
        return {
            key.replace("\\", "/"): [(parse_time(a), parse_time(b)) for a, b in wins]
            for key, wins in raw.items()
        }
    except (ValueError, TypeError, AttributeError) as exc:
        raise EvalInputError(
            f"{path}: not NAB's windows file, a JSON object of file name -> list of "
            f"[start, end] times ({exc})"
        ) from None


def load_corpus(
    data_dir: Path, labels_dir: Path, unlisted: list[str] | None = None
) -> list[NabFile]:
    """Every CSV under ``data_dir`` that the windows file knows, sorted by name; the
    names of the others go into ``unlisted`` (NAB scores only labelled files)."""
    windows = load_windows(labels_dir)
    files: list[NabFile] = []
    for path in sorted(data_dir.rglob("*.csv")):
        key = path.relative_to(data_dir).as_posix()
        if key not in windows:
            if unlisted is not None:
                unlisted.append(key)
            continue
        ts, vals = read_series(path)
        files.append(NabFile(key, ts, vals, windows[key]))
    if not files:
        raise FileNotFoundError(
            f"no CSV under {data_dir} is listed in {labels_dir / 'combined_windows.json'}"
        )
    return files


def _row_weights(
    timestamps: Sequence[datetime],
    windows: Sequence[tuple[datetime, datetime]],
    profile: Mapping[str, float],
    window_offset: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weight and window id of every row, and the mask of rows past the probation period."""
    n = len(timestamps)
    first_index: dict[datetime, int] = {}
    for i, t in enumerate(timestamps):
        first_index.setdefault(t, i)
    pending = list(windows)
    weights = np.empty(n)
    window_id = np.full(n, -1, dtype=np.int64)
    cur: tuple[datetime, datetime] | None = None
    cur_right = cur_width = 0.0
    prev_right: float | None = None
    prev_width = 0.0
    k = window_offset - 1
    for i, t in enumerate(timestamps):
        if pending and t == pending[0][0]:
            cur = pending.pop(0)
            k += 1
            cur_right = float(first_index[cur[1]])
            cur_width = cur_right - first_index[cur[0]] + 1.0
        if cur is not None:
            weights[i] = scaled_sigmoid(-(cur_right - i + 1.0) / cur_width) * profile["tp"] / MAX_TP
            window_id[i] = k
        else:
            # Before the first window every FP costs the full weight (distance >= 3).
            dist = 3.0 if prev_right is None else abs(prev_right - i) / (prev_width - 1.0)
            weights[i] = scaled_sigmoid(dist) * profile["fp"]
        if cur is not None and t == cur[1]:
            prev_right, prev_width = float(i), cur_width
            cur = None
    scorable = np.arange(n) >= probation_length(n)
    return weights, window_id, scorable


def _prepare(
    files: Sequence[NabFile], scores: Sequence[np.ndarray], profile: Mapping[str, float]
) -> tuple[_Rows, int]:
    all_s, all_w, all_k = [], [], []
    n_windows = 0
    for f, s in zip(files, scores, strict=True):
        if len(s) != len(f.timestamps):
            raise ValueError(f"{f.name}: {len(s)} scores for {len(f.timestamps)} rows")
        w, k, ok = _row_weights(f.timestamps, f.windows, profile, n_windows)
        n_windows += len(f.windows)
        all_s.append(np.asarray(s, dtype=float)[ok])
        all_w.append(w[ok])
        all_k.append(k[ok])
    rows = _Rows(np.concatenate(all_s), np.concatenate(all_w), np.concatenate(all_k))
    return rows, n_windows


def _raw_score(rows: _Rows, n_windows: int, fn: float, threshold: float) -> float:
    hit = rows.scores >= threshold
    total = float(rows.weights[hit & (rows.window < 0)].sum())
    best = np.full(n_windows, -fn)
    in_win = hit & (rows.window >= 0)
    np.maximum.at(best, rows.window[in_win], rows.weights[in_win])
    return total + float(best.sum())


def _sweep(rows: _Rows, n_windows: int, fn: float) -> tuple[float, float]:
    """Best (threshold, raw score) over every distinct score value, as NAB's optimiser does."""
    order = np.argsort(-rows.scores, kind="stable")
    s, w, k = rows.scores[order], rows.weights[order], rows.window[order]
    best_win = [-fn] * n_windows
    total = -fn * n_windows
    best_thr, best_score = 1.1, total
    i, n = 0, len(s)
    while i < n:
        thr = s[i]
        while i < n and s[i] == thr:
            if k[i] < 0:
                total += w[i]
            elif w[i] > best_win[k[i]]:
                total += w[i] - best_win[k[i]]
                best_win[k[i]] = w[i]
            i += 1
        if total > best_score:
            best_thr, best_score = float(thr), float(total)
    return best_thr, best_score


@dataclass(slots=True)
class ProfileResult:
    profile: str
    threshold: float
    raw: float
    normalised: float


def normalise(raw: float, n_windows: int, profile: Mapping[str, float]) -> float:
    if n_windows == 0:
        return 0.0
    null = -profile["fn"] * n_windows
    perfect = profile["tp"] * n_windows
    return 100.0 * (raw - null) / (perfect - null)


def score_corpus(
    files: Sequence[NabFile],
    scores: Sequence[np.ndarray],
    thresholds: Mapping[str, float] | None = None,
    profiles: Iterable[str] = tuple(PROFILES),
) -> dict[str, ProfileResult]:
    """Score one detector on a corpus, per profile.

    With ``thresholds`` (profile name -> threshold) those are used as given (NAB's
    "corpus threshold"); without, each profile's threshold is swept on these files.
    """
    out: dict[str, ProfileResult] = {}
    for name in profiles:
        prof = PROFILES[name]
        rows, n_windows = _prepare(files, scores, prof)
        if thresholds is None:
            thr, raw = _sweep(rows, n_windows, prof["fn"])
        else:
            thr = float(thresholds[name])
            raw = _raw_score(rows, n_windows, prof["fn"], thr)
        out[name] = ProfileResult(name, thr, raw, normalise(raw, n_windows, prof))
    return out


def published_scores(
    results_dir: Path, detector: str, files: Sequence[NabFile]
) -> list[np.ndarray]:
    """A published detector's ``anomaly_score`` column for each file, read from NAB's
    ``results/<detector>/<category>/<detector>_<file>`` layout."""
    out = []
    for f in files:
        category, name = f.name.split("/")
        path = results_dir / detector / category / f"{detector}_{name}"
        with path.open(newline="") as fh:
            out.append(np.array([float(r["anomaly_score"]) for r in csv.DictReader(fh)]))
    return out
