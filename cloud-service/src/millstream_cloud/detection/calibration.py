"""Turning raw detector scores into calibrated likelihoods and stable on/off decisions.

These objects are deliberately separate from the detectors (STYLE.md): a detector says how
unusual a value is in its own units; a calibrator learns, per series, what is usual for that
detector's output and answers with a tail probability; a hysteresis gate turns that into a
state that does not flap.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from typing import Any, Literal

import numpy as np

from .base import pack_floats, unpack_floats
from .window import SAVING_TO, SavedRows, loaded, read_ref

LOG_FLOOR = 1e-10  # tail probabilities below this all map to score 1.0
# A calibration's sorted snapshot keeps each tail exactly (the largest and smallest eighth
# of its values, past every quantile the tail fits read) and the body as this many
# quantiles: a value inside the body has a tail probability over 0.1 (a score under 0.1,
# far below any alarm), so its rank need not be exact, and the snapshot takes a quarter of
# the window's memory instead of all of it.
TAIL_KEPT = 8
BODY_GRID = 65
_GRID = np.arange(BODY_GRID)


def tail_to_score(p: float) -> float:
    """Map a tail probability to [0, 1]: 0.1 -> 0.1, 1e-5 -> 0.5, 1e-10 -> 1.0."""
    return min(1.0, -math.log10(max(p, LOG_FLOOR)) / 10.0)


def gaussian_tail(z: float, two_sided: bool = False) -> float:
    """Upper (or two-sided) tail probability of a standard normal at ``z``."""
    if two_sided:
        return math.erfc(abs(z) / math.sqrt(2.0))
    return 0.5 * math.erfc(z / math.sqrt(2.0))


# How the tail beyond the observed range is extrapolated (see RollingRobust.tail):
# "range": exponential, scaled by the spread from the 10 % quantile to the extreme (the
# first method, kept for the frozen NAB settings); "quantiles": a generalised Pareto tail
# over the 90 % quantile (peaks over threshold, as in SPOT, Siffer et al., KDD 2017), its
# scale and shape matched to the 90, 99 and 99.9 % quantiles (from 200 values, the largest
# value standing in for the 99.9 % quantile until there are 1000; "range" before 200).
TAIL_FITS = ("range", "quantiles")
QUANTILE_FIT_MIN = 200  # values before "quantiles" is used: its 99 % quantile rests on 2


def _gpd_by_quantiles(u: float, q99: float, top: float, rarity: float) -> tuple[float, float]:
    """Scale and shape of a generalised Pareto tail over ``u`` (the 90 % quantile) that
    passes through the 99 % quantile and ``top``, a value ``rarity`` times rarer than
    ``u`` (100 for the 99.9 % quantile; a young series uses its largest value).

    The spacing from ``u`` grows by ``(k**shape - 1) / shape`` for a value k times rarer,
    so the ratio of the two spacings fixes the shape: 0 (exponential) for light tails,
    clamped there (a Gaussian's lighter-than-exponential tail is not trusted beyond what
    was seen), up to 1 for heavy ones (a Student t, a spiky signal). Quantiles are stable
    where the single extreme of the "range" fit is not."""
    d1 = q99 - u
    shape = 0.0
    if d1 > 0:
        ratio = (top - u) / d1

        def spacing(xi: float) -> float:
            if xi < 1e-9:
                return math.log(rarity) / math.log(10.0)
            return float((rarity**xi - 1.0) / (10.0**xi - 1.0))

        if ratio >= spacing(1.0):
            shape = 1.0
        elif ratio > spacing(0.0):
            lo, hi = 0.0, 1.0
            for _ in range(30):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if spacing(mid) < ratio else (lo, mid)
            shape = 0.5 * (lo + hi)
    if shape < 1e-6:
        return d1 / math.log(10), 0.0
    return d1 * shape / (10**shape - 1.0), shape


def _steps(arr: np.ndarray, k: int) -> tuple[float, float]:
    """The smallest step between distinct values among the top ``k`` of sorted ``arr``,
    and among the bottom ``k``; where those values are all one, the step to the next
    distinct value (0: ``arr`` holds one value)."""
    diffs = np.diff(arr)
    where = np.flatnonzero(diffs > 0)
    if not where.size:
        return 0.0, 0.0
    top = where[where >= len(arr) - 1 - k]
    bottom = where[where < k]
    hi = diffs[top].min() if top.size else diffs[where[-1]]
    lo = diffs[bottom].min() if bottom.size else diffs[where[0]]
    return float(hi), float(lo)


DETACHED = 0.01  # the chance, under the fitted tail, of a largest value as far out


def _typical_max_scale(excess: float, n: int) -> float:
    """Scale of the exponential tail over the 90 % quantile under which ``excess`` (the
    largest of ``n`` values, over that quantile) is the typical largest of the n / 10
    values beyond it (their expected maximum is about scale * ln(n / 10))."""
    return excess / math.log(max(n // 10, 3))


def _detached_scale(excess: float, n: int, scale: float, shape: float) -> float:
    """``scale``, or wider when the largest value (``excess`` over the tail's threshold)
    stands where the fitted tail gives it under a :data:`DETACHED` chance among the n / 10
    values beyond the threshold: a cluster of rare extremes apart from the rest (start-up
    steps), which the quantiles do not see. A new record of a drifting statistic creeps
    past its largest value and is found long before that one looks detached."""
    if (n // 10) * math.exp(_log_survival(excess, scale, shape)) >= DETACHED:
        return scale
    return max(scale, _typical_max_scale(excess, n))


def _log_survival(excess: float, scale: float, shape: float) -> float:
    """log P(X > u + excess | X > u) of a generalised Pareto tail."""
    if shape == 0.0:
        return -excess / scale
    return -math.log1p(shape * excess / scale) / shape


class ExtremesMemory:
    """The ``keep`` largest and smallest values of each of ``blocks`` blocks covering the
    last ``span`` values: what a statistic reached over a long span (a week) for a few
    KB, where keeping every value would cost megabytes.

    A calibration with a shorter detailed history asks it only about the values that
    history has forgotten (blocks wholly older than its window): a factory's Monday
    start-up is then judged against last week's start-ups, not only against the idle
    weekend the last two days hold, while a level creeping past its recent records is
    judged exactly as without it. Whole blocks expire, oldest first.
    """

    def __init__(self, span: int, blocks: int = 168, keep: int = 4) -> None:
        self.span, self.keep = span, keep
        self.block = max(1, span // blocks)
        # The finished blocks, a ring of rows (oldest at ``_first``; a span shorter than
        # ``blocks`` values has blocks of one value, as many as it covers): each block's
        # largest and smallest values, ascending, and how many values had been added when
        # it finished. Arrays, not a deque of small ones: 8 bytes a value, not 40.
        self._cap = max(1, min(blocks, span // self.block))
        self._alloc(min(keep, self.block))
        self.top: list[float] = []  # the current block's largest, ascending
        self.bottom: list[float] = []  # ... and smallest, ascending
        self.count = 0  # values in the current block
        self.added = 0  # values ever added
        self._cache: tuple[tuple[int, int], np.ndarray, np.ndarray] | None = None

    def _alloc(self, width: int) -> None:
        self._tops = np.empty((self._cap, width))
        self._bottoms = np.empty((self._cap, width))
        self._ends = np.zeros(self._cap, dtype=np.int64)
        self._first = self._len = 0

    def _order(self, k: int) -> np.ndarray:
        """Ring rows of the ``k`` oldest finished blocks, oldest first."""
        return (self._first + np.arange(k)) % self._cap

    def _finish(self, top: list[float], bottom: list[float], end: int) -> None:
        if self._len < self._cap:
            i = (self._first + self._len) % self._cap
            self._len += 1
        else:  # the oldest block expires
            i, self._first = self._first, (self._first + 1) % self._cap
        self._tops[i], self._bottoms[i], self._ends[i] = top, bottom, end

    @property
    def covered(self) -> int:
        return self._len * self.block + self.count

    def add(self, x: float) -> None:
        top, bottom = self.top, self.bottom
        if len(top) < self.keep:
            bisect.insort(top, x)
        elif x > top[0]:
            top.pop(0)
            bisect.insort(top, x)
        if len(bottom) < self.keep:
            bisect.insort(bottom, x)
        elif x < bottom[-1]:
            bottom.pop()
            bisect.insort(bottom, x)
        self.count += 1
        self.added += 1
        if self.count == self.block:
            self._finish(top, bottom, self.added)
            self.top, self.bottom, self.count = [], [], 0

    def extend(self, values: np.ndarray) -> None:
        for x in values.tolist():
            self.add(x)

    def forgotten(self, window: int) -> tuple[np.ndarray, np.ndarray]:
        """The kept values of the blocks older than the last ``window`` values, ascending:
        the largest, then the smallest."""
        # Blocks finish every ``block`` values, so those older than the window are the
        # first k: no need to look at each (this runs for every value beyond the history).
        first = int(self._ends[self._first]) if self._len else 0
        k = max(0, min(self._len, (self.added - window - first) // self.block + 1))
        key = (first, k)
        if self._cache is None or self._cache[0] != key:
            rows = self._order(k)
            self._cache = (
                key,
                np.sort(self._tops[rows], axis=None),
                np.sort(self._bottoms[rows], axis=None),
            )
        return self._cache[1], self._cache[2]

    def tail_hi(self, x: float, seen: float, window: int, u: float, scale: float) -> float | None:
        """Upper tail probability of ``x`` over the span, when values older than the last
        ``window`` reached beyond ``seen`` (the largest value the detailed history holds)
        and ``x`` is beyond ``seen`` too; else None. Beyond the largest value remembered,
        an exponential tail over ``u`` (the history's tail threshold), no thinner than
        ``scale`` (the history's) nor than the one under which that value is typical."""
        tops, _ = self.forgotten(window)
        return self._tail(tops, x, seen, u, scale)

    def tail_lo(self, x: float, seen: float, window: int, u: float, scale: float) -> float | None:
        """The lower tail, as :meth:`tail_hi` (``seen``: the history's smallest value)."""
        _, bottoms = self.forgotten(window)
        return self._tail(-bottoms[::-1], -x, -seen, -u, scale)

    def _tail(
        self, tops: np.ndarray, x: float, seen: float, u: float, scale: float
    ) -> float | None:
        if not tops.size or tops[-1] <= seen or x <= seen:
            return None
        n = self.covered
        k = tops.size - int(np.searchsorted(tops, x, side="left"))
        if k:
            return (k + 1) / (n + 1)
        top = float(tops[-1])
        scale = max(scale, _typical_max_scale(top - u, n), 1e-12)
        return math.exp(-(x - top) / scale) / (n + 1)

    def state_dict(self) -> dict[str, Any]:
        # A finished block holds min(keep, block) values a side: one array a side.
        rows = self._order(self._len)
        return {
            "span": self.span,
            "block": self.block,
            "keep": self.keep,
            "tops": pack_floats(self._tops[rows].ravel()),
            "bottoms": pack_floats(self._bottoms[rows].ravel()),
            "ends": self._ends[rows].tolist(),
            "top": self.top,
            "bottom": self.bottom,
            "count": self.count,
            "added": self.added,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.span, self.block, self.keep = (
            int(state["span"]),
            int(state["block"]),
            int(state["keep"]),
        )
        ends = [int(e) for e in state["ends"]]
        width = min(self.keep, self.block)
        tops = unpack_floats(state["tops"]).reshape(len(ends), width)
        bottoms = unpack_floats(state["bottoms"]).reshape(len(ends), width)
        self._alloc(width)
        for top, bottom, end in zip(tops, bottoms, ends, strict=True):
            self._finish(top.tolist(), bottom.tolist(), end)
        self.top = [float(v) for v in state["top"]]
        self.bottom = [float(v) for v in state["bottom"]]
        self.count, self.added, self._cache = int(state["count"]), int(state["added"]), None


# The window of a statistic that is a difference or a ratio (a step, a spike, a z-score)
# may be kept as float32: half the memory, and seven significant digits of a value are
# more than a tail probability reads. Not one in the metric's own units (a level, the
# readings themselves): an energy counter at 1e8 would be kept to the nearest 8.
COMPACT = np.float32
F32_MAX = float(np.finfo(np.float32).max)


class RollingRobust:
    """Median and MAD-based sigma of the last ``size`` values, refreshed every ``every``.

    The window is a NumPy ring buffer; the sorted copy used for tail probabilities is
    rebuilt at a cadence that grows with the window (``size // 100``), so the cost per
    value stays flat while the reference moves by at most 1 % between refreshes.
    """

    def __init__(
        self,
        size: int,
        every: int = 8,
        tail_fit: str = "range",
        memory: int = 0,
        compact: bool = False,
    ) -> None:
        if tail_fit not in TAIL_FITS:
            raise ValueError(f"tail_fit {tail_fit!r}: one of {', '.join(TAIL_FITS)}")
        self.size = size
        self.dtype = COMPACT if compact else np.float64  # of the window (see COMPACT)
        # Extremes over a span longer than the window (0: none), see ExtremesMemory.
        self.memory = ExtremesMemory(memory) if memory > size else None
        self.every = max(1, every)
        self.tail_fit = tail_fit
        self._ring = np.empty(size, dtype=self.dtype)
        self._pos = 0
        self._count = 0
        self.width, self.epoch, self.total = 1, 0, 0  # for a save's rows file (RowsWriter)
        self.saved: SavedRows | None = None
        self.center = 0.0
        self.sigma = 0.0
        self.mad_sigma = 0.0  # before the fallbacks: 0 for a mostly constant signal
        self.sorted = np.empty(0)  # the snapshot's tails (see TAIL_KEPT), ascending
        self.n_sorted = 0  # values in the snapshot
        # Quantiles of the rest and their indices in the whole snapshot (lists: bisect is
        # quicker than NumPy on 65 values); None: ``sorted`` is the whole snapshot.
        self._body: list[float] | None = None
        self._body_pos: list[int] = []
        self._lo_part = self._hi_part = self.sorted
        self._body_min = self._body_max = 0.0
        self.lo_tail = self.hi_tail = 1.0
        self.lo_shape = self.hi_shape = 0.0  # generalised Pareto shapes (0: exponential)
        self.lo_u = self.hi_u = 0.0  # the tails' thresholds
        self._since = 0
        # The values the adds since the last refresh overwrote: with the older part of
        # the window they make up the sorted snapshot the tails are read from.
        self._overwritten: list[float] = []

    @property
    def buf(self) -> np.ndarray:
        """The window's values, oldest first (float64)."""
        if self._count < self.size:
            return self._ring[: self._count].astype(float)
        return np.concatenate((self._ring[self._pos :], self._ring[: self._pos])).astype(float)

    @property
    def maxlen(self) -> int:
        return self.size

    @property
    def itemsize(self) -> int:
        """Bytes a value in its rows file: a compact window saves float32, exactly."""
        return 4 if self.dtype is COMPACT else 8

    def values(self) -> np.ndarray:
        return self.buf

    def latest(self, k: int) -> np.ndarray:
        """The latest ``k`` values (at most those kept), oldest first (a copy)."""
        k = min(k, self._count)
        return self._ring[(self._pos - k + np.arange(k)) % self.size]

    def add(self, x: float) -> None:
        self.total += 1
        if self.memory is not None:
            self.memory.add(x)
        if self._count == self.size:  # the value overwritten may be in the snapshot
            self._overwritten.append(float(self._ring[self._pos]))
        if self.dtype is COMPACT and not -F32_MAX <= x <= F32_MAX:
            x = math.copysign(F32_MAX, x)  # a glitch of 1e300: the largest it can hold
        self._ring[self._pos] = x
        self._pos = (self._pos + 1) % self.size
        self._count = min(self._count + 1, self.size)
        self._since += 1
        if self._since >= max(self.every, self._count // 100) or self._count < 2 * self.every:
            self._refresh()

    def _refresh(self) -> None:
        self._since = 0
        self._overwritten = []
        self._use_snapshot(np.sort(self._ring[: self._count]).astype(float))

    def _keep(self, arr: np.ndarray) -> None:
        """Keep the tails of the sorted ``arr`` exactly and its body as quantiles."""
        n = len(arr)
        k = n // TAIL_KEPT + 2
        self.n_sorted = n
        if n <= 2 * k + BODY_GRID:
            self.sorted, self._body = arr, None
            return
        pos = k + _GRID * (n - 2 * k - 1) // (BODY_GRID - 1)  # evenly over the body
        self._body = arr[pos].tolist()
        self._body_pos = pos.tolist()
        self._body_min, self._body_max = self._body[0], self._body[-1]
        self.sorted = np.concatenate((arr[:k], arr[n - k :]))
        self._lo_part, self._hi_part = self.sorted[:k], self.sorted[k:]

    def _rank(self, x: float, side: Literal["left", "right"]) -> int:
        """``np.searchsorted`` of ``x`` in the whole snapshot: exact in the tails,
        interpolated between the body's quantiles."""
        g = self._body
        if g is None:
            return int(np.searchsorted(self.sorted, x, side=side))
        if x < self._body_min or (x == self._body_min and side == "left"):
            return int(np.searchsorted(self._lo_part, x, side=side))
        if not (x < self._body_max or (x == self._body_max and side == "left")):
            # Beyond the body (a NaN too: it sorts last).
            hi = self._hi_part
            return self.n_sorted - len(hi) + int(np.searchsorted(hi, x, side=side))
        pos = self._body_pos
        j, j_right = bisect.bisect_left(g, x), bisect.bisect_right(g, x)
        if j_right > j:  # x is one of the quantiles: the ends of its run of ties
            return pos[j] if side == "left" else pos[j_right - 1] + 1
        a, b = g[j - 1], g[j]
        return round(pos[j - 1] + (pos[j] - pos[j - 1]) * (x - a) / (b - a))

    def _use_snapshot(self, arr: np.ndarray) -> None:
        self._keep(arr)
        n = len(arr)
        self.center = float(arr[n // 2]) if n % 2 else float(0.5 * (arr[n // 2 - 1] + arr[n // 2]))
        mad = float(np.median(np.abs(arr - self.center)))
        sigma = self.mad_sigma = 1.4826 * mad
        if sigma <= 0.0:
            # Mostly constant signal: fall back to the standard deviation, then to a floor
            # relative to the level, so a single change is still measurable.
            sigma = float(arr.std())
        floor = 1e-3 * max(abs(self.center), 1e-6)
        self.sigma = max(sigma, floor)
        self.hi_shape = self.lo_shape = 0.0
        self.hi_u, self.lo_u = float(arr[-1]), float(arr[0])
        if self.tail_fit == "quantiles" and n >= QUANTILE_FIT_MIN:
            # The 99 % quantile rests on at least 2 values; the third point is the 99.9 %
            # quantile from 1000 values on, the largest value (1 in n + 1) before.
            k90, k99, k999 = n // 10, n // 100, n // 1000
            rarity = 100.0 if k999 else 0.1 * (n + 1)
            self.hi_u, self.lo_u = float(arr[-1 - k90]), float(arr[k90])
            hi, self.hi_shape = _gpd_by_quantiles(
                self.hi_u, float(arr[-1 - k99]), float(arr[-1 - k999]), rarity
            )
            # The lower tail is the upper tail of the negated values.
            lo, self.lo_shape = _gpd_by_quantiles(
                -self.lo_u, -float(arr[k99]), -float(arr[k999]), rarity
            )
        else:
            # Spread of each tail (10 % quantile to the extreme), for extrapolating beyond it.
            k = max(1, n // 10)
            hi = float(arr[-1] - arr[-1 - k]) if n > k else 0.0
            lo = float(arr[k] - arr[0]) if n > k else 0.0
        self.hi_tail = max(hi, 0.05 * self.sigma)
        self.lo_tail = max(lo, 0.05 * self.sigma)
        hi_shape, lo_shape = self.hi_shape, self.lo_shape
        if self.tail_fit == "quantiles" and n >= QUANTILE_FIT_MIN:
            # A statistic of a quantised metric (whole degrees) takes few values: its
            # quantiles tie and the fitted tail collapses, so one step of its resolution
            # beyond the largest value seen read as p 1e-9. A tail is never thinner than
            # that step.
            hi_step, lo_step = _steps(arr, n // 10)
            self.hi_tail = max(self.hi_tail, hi_step)
            self.lo_tail = max(self.lo_tail, lo_step)
            # Where the largest value could not come from the fitted tail (a machine's
            # start-up step, twice a day, against the steps of its noise), the fit read a
            # start-up a little larger than the last as p 1e-6 and an alarm: beyond such
            # a value the tail is the exponential one under which it is typical.
            self.hi_tail = _detached_scale(float(arr[-1]) - self.hi_u, n, self.hi_tail, hi_shape)
            self.lo_tail = _detached_scale(self.lo_u - float(arr[0]), n, self.lo_tail, lo_shape)

    def tail(self, x: float, two_sided: bool = False) -> float:
        """Tail probability of ``x``: empirical inside the observed range, a
        peaks-over-threshold extrapolation beyond it (``tail_fit``), so it needs no
        Gaussian shape."""
        arr = self.sorted
        n = self.n_sorted
        if n == 0:
            return 1.0
        above = n - self._rank(x, "left")
        p_hi = (above + 1) / (n + 1)
        if x > arr[-1]:
            p_hi *= self._beyond(x - self.hi_u, arr[-1] - self.hi_u, self.hi_tail, self.hi_shape)
            if self.memory is not None:
                p_mem = self.memory.tail_hi(x, arr[-1], self._count, self.hi_u, self.hi_tail)
                p_hi = max(p_hi, p_mem or 0.0)
        if not two_sided:
            return p_hi
        below = self._rank(x, "right")
        p_lo = (below + 1) / (n + 1)
        if x < arr[0]:
            p_lo *= self._beyond(self.lo_u - x, self.lo_u - arr[0], self.lo_tail, self.lo_shape)
            if self.memory is not None:
                p_mem = self.memory.tail_lo(x, arr[0], self._count, self.lo_u, self.lo_tail)
                p_lo = max(p_lo, p_mem or 0.0)
        return min(1.0, 2.0 * min(p_hi, p_lo))

    @staticmethod
    def _beyond(excess: float, seen: float, scale: float, shape: float) -> float:
        """How much rarer an excess over the tail's threshold is than the largest seen."""
        return math.exp(_log_survival(excess, scale, shape) - _log_survival(seen, scale, shape))

    @property
    def fit_in_use(self) -> str:
        """The tail fit that scores now: ``range`` until ``quantiles`` has its values."""
        if self.tail_fit == "quantiles" and self.n_sorted >= QUANTILE_FIT_MIN:
            return "quantiles"
        return "range"

    def z(self, x: float) -> float:
        return (x - self.center) / self.sigma if self._count else 0.0

    def __len__(self) -> int:
        return self._count

    def resize(self, size: int) -> None:
        """Remember ``size`` values from now on, keeping the latest of those remembered."""
        vals = self.buf[-size:]
        self.size = size
        self.epoch, self.total = self.epoch + 1, len(vals)
        self._ring = np.empty(size, dtype=self.dtype)
        self._ring[: len(vals)] = vals
        self._count = len(vals)
        self._pos = self._count % size
        if self._count:
            self._refresh()

    def _held(self, values: np.ndarray) -> np.ndarray:
        """``values`` as the window holds them (a compact one: rounded to float32, as a
        state saved before it was compact is loaded)."""
        if self.dtype is not COMPACT:
            return values
        return np.clip(values, -F32_MAX, F32_MAX).astype(COMPACT).astype(float)

    def _stale(self, snapshot: np.ndarray, buf: np.ndarray) -> np.ndarray:
        """The values the adds since the last refresh overwrote, from the whole sorted
        ``snapshot`` and the window ``buf`` (a restored window's, saved before the compact
        form; one that runs keeps them as they go)."""
        vals, counts = np.unique(snapshot, return_counts=True)
        older, older_counts = np.unique(buf[: len(buf) - self._since], return_counts=True)
        counts[np.searchsorted(vals, older)] -= older_counts
        return np.repeat(vals, counts)

    def state_dict(self) -> dict[str, Any]:
        # The snapshot is kept as the few values it holds beyond the window, with the
        # refresh counter, so a restored detector scores exactly like the one saved.
        writer = SAVING_TO.get()
        return {
            "size": self.size,
            "every": self.every,
            "tail_fit": self.tail_fit,
            "buf": writer.stub(self, "ring") if writer and self._count else pack_floats(self.buf),
            "stale": pack_floats(np.array(self._overwritten)),
            "since": self._since,
            **({"memory": self.memory.state_dict()} if self.memory is not None else {}),
        }

    def set_memory(self, span: int) -> None:
        """Remember extremes over ``span`` values from now on (0: none), starting from
        the values the window holds."""
        self.memory = ExtremesMemory(span) if span > self.size else None
        if self.memory is not None:
            self.memory.extend(self.buf)

    def load_state(self, state: dict[str, Any]) -> None:
        self.size, self.every = int(state["size"]), int(state["every"])
        self.tail_fit = str(state.get("tail_fit", "range"))
        ref = state["buf"] if isinstance(state["buf"], dict) and "file" in state["buf"] else None
        vals = (read_ref(ref).ravel() if ref else unpack_floats(state["buf"]))[-self.size :]
        vals = self._held(vals)
        self._ring = np.empty(self.size, dtype=self.dtype)
        self._ring[: len(vals)] = vals
        self._count = self.total = len(vals)
        self._pos = self._count % self.size
        self.epoch += 1
        self.saved = loaded(ref, self)
        self._since = int(state.get("since", 0))
        if self.memory is not None:
            if "memory" in state:
                self.memory.load_state(state["memory"])
            else:  # saved before the memory existed: it starts from the window
                self.set_memory(self.memory.span)
        self._overwritten = []
        if not self._count:
            return
        if "stale" in state:
            older = vals[: len(vals) - self._since]
            stale = self._held(unpack_floats(state["stale"]))
            self._use_snapshot(np.sort(np.concatenate((older, stale))))
            self._overwritten = stale.tolist()
        elif state.get("snapshot"):  # saved before the compact form
            snapshot = self._held(np.asarray(state["snapshot"], dtype=float))
            self._use_snapshot(snapshot)
            self._overwritten = self._stale(snapshot, self.buf).tolist()
        else:
            self._refresh()


class AnomalyLikelihood:
    """Per-series calibration in the spirit of Numenta's anomaly likelihood.

    The short-term mean of the raw score (last ``short`` values) is compared with the
    long-term distribution of that same short-term mean (last ``history`` values, robust
    centre and spread). The answer is the tail probability of the current short-term mean:
    small means "this series has not produced scores this high in a while".
    """

    def __init__(
        self,
        history: int = 750,
        short: int = 1,
        two_sided: bool = False,
        tail_fit: str = "range",
        memory: int = 0,
        compact: bool = False,
    ) -> None:
        self.short = max(1, short)
        self.two_sided = two_sided
        self.recent: deque[float] = deque(maxlen=self.short)
        self.stats = RollingRobust(history, tail_fit=tail_fit, memory=memory, compact=compact)

    def _mean_with(self, raw: float) -> float:
        n = len(self.recent)
        if n < self.short:
            return (sum(self.recent) + raw) / (n + 1)
        return (sum(self.recent) - self.recent[0] + raw) / self.short

    def tail(self, raw: float) -> float:
        """Tail probability of ``raw`` (with the recent history) without learning it."""
        if len(self.stats) < 16:
            return 1.0
        return self.stats.tail(self._mean_with(raw), self.two_sided)

    def learn(self, raw: float) -> None:
        m = self._mean_with(raw)
        self.recent.append(raw)
        self.stats.add(m)

    def state_dict(self) -> dict[str, Any]:
        return {
            "short": self.short,
            "two_sided": self.two_sided,
            "recent": list(self.recent),
            "stats": self.stats.state_dict(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.short = int(state["short"])
        self.two_sided = bool(state["two_sided"])
        self.recent = deque((float(v) for v in state["recent"]), maxlen=self.short)
        self.stats.load_state(state["stats"])


class Hysteresis:
    """On/off gate: switches on at ``on`` and only back off below ``off`` (``off < on``).

    ``min_on`` keeps a raised state for at least that many updates, so a borderline signal
    gives one anomaly, not a burst of them.
    """

    def __init__(self, on: float, off: float | None = None, min_on: int = 0) -> None:
        self.on = on
        self.off = on * 0.8 if off is None else off
        if self.off > self.on:
            raise ValueError(f"hysteresis off level {self.off} is above on level {self.on}")
        self.min_on = min_on
        self.active = False
        self._held = 0

    def update(self, score: float) -> tuple[bool, bool]:
        """Returns (active, rising_edge)."""
        if not self.active:
            if score >= self.on:
                self.active, self._held = True, 0
                return True, True
            return False, False
        self._held += 1
        if score < self.off and self._held >= self.min_on:
            self.active = False
        return self.active, False

    def hold(self) -> None:
        """Switch on without a rising edge: something else judged the signal raised."""
        if not self.active:
            self.active, self._held = True, 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "on": self.on,
            "off": self.off,
            "min_on": self.min_on,
            "active": self.active,
            "held": self._held,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.on, self.off = float(state["on"]), float(state["off"])
        self.min_on = int(state["min_on"])
        self.active, self._held = bool(state["active"]), int(state["held"])
