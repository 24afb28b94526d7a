"""Per-metric streaming detectors (River-style ``learn_one`` / ``score_one``).

Each component answers one question about the newest value and returns a raw score;
:class:`StreamingEnsemble` calibrates each component per series (tail probability against
that component's own recent history), keeps the most surprising one and adds a refractory
period so one incident yields one early alarm.

>>> det = StreamingEnsemble(warmup=50)
>>> for i in range(200):
...     det.learn_one(10.0 + 0.1 * ((i * 7) % 5))
>>> det.score_one(10.2) < 0.3 < det.score_one(25.0)
True
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import pack_floats, register, unpack_floats
from .calibration import AnomalyLikelihood, RollingRobust, tail_to_score


def _mean_with(window: deque[float], x: float, size: int) -> float:
    """The mean of the last ``size`` values of ``window`` (a deque of at most ``size``)
    and ``x`` after them, without storing ``x``: scoring must not learn."""
    n = len(window)
    drop = window[0] if n == size else 0.0
    return (sum(window) - drop + x) / min(n + 1, size)


@register("robust_z")
class RobustZScore:
    """Distance of the value from the median of the last ``window`` values, in robust sigmas."""

    def __init__(self, window: int = 750, every: int = 8) -> None:
        self.ref = RollingRobust(window, every)

    def score_one(self, x: float) -> float:
        return abs(self.ref.z(x)) if len(self.ref) >= 8 else 0.0

    def signed(self, x: float) -> float:
        return self.ref.z(x) if len(self.ref) >= 8 else 0.0

    def learn_one(self, x: float) -> None:
        self.ref.add(x)

    def state_dict(self) -> dict[str, Any]:
        return {"ref": self.ref.state_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.ref.load_state(state["ref"])


class _Window:
    """The last ``size`` raw values, for components that look back a fixed distance."""

    def __init__(self, size: int) -> None:
        self.buf: deque[float] = deque(maxlen=max(1, size))

    def ago(self, k: int) -> float | None:
        """The value ``k`` steps before the next one (1 = the latest learned)."""
        return self.buf[-k] if len(self.buf) >= k else None


@register("level_shift")
class LevelShift:
    """Mean of the last ``short`` values against the values before: catches steps and drifts."""

    def __init__(self, short: int = 8) -> None:
        self.short = short
        self.win: deque[float] = deque(maxlen=short)

    def score_one(self, x: float) -> float:
        if not self.win:
            return x
        return _mean_with(self.win, x, self.short)

    def learn_one(self, x: float) -> None:
        self.win.append(x)

    def state_dict(self) -> dict[str, Any]:
        return {"short": self.short, "win": list(self.win)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.short = int(state["short"])
        self.win = deque((float(v) for v in state["win"]), maxlen=self.short)


@register("volatility")
class Volatility:
    """Mean absolute step over the last ``short`` values: catches noise, spikes, stuck sensors."""

    def __init__(self, short: int = 8) -> None:
        self.short = short
        self.prev: float | None = None
        self.steps: deque[float] = deque(maxlen=short)

    def score_one(self, x: float) -> float:
        step = abs(x - self.prev) if self.prev is not None else 0.0
        return _mean_with(self.steps, step, self.short)

    def learn_one(self, x: float) -> None:
        if self.prev is not None:
            self.steps.append(abs(x - self.prev))
        self.prev = x

    def state_dict(self) -> dict[str, Any]:
        return {"short": self.short, "prev": self.prev, "steps": list(self.steps)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.short = int(state["short"])
        self.prev = None if state["prev"] is None else float(state["prev"])
        self.steps = deque((float(v) for v in state["steps"]), maxlen=self.short)


@register("spike")
class Spike:
    """The value minus the median of the ``span`` values before it (a Hampel residual).

    A spike stands out against its neighbours even when the metric's history holds load
    swings far wider than the spike, which hide it from the ``value`` component; the
    median of a few values is not moved by the spike itself.
    """

    def __init__(self, span: int = 5) -> None:
        self.span = span
        self.win: deque[float] = deque(maxlen=span)

    @property
    def ready(self) -> bool:
        """Whether it scores (it has its ``span`` values before the next)."""
        return len(self.win) == self.span

    def median(self) -> float:
        """The median of the values before the next one (a few: sorting beats NumPy)."""
        w, k = sorted(self.win), len(self.win)
        return w[k // 2] if k % 2 else 0.5 * (w[k // 2 - 1] + w[k // 2])

    def score_one(self, x: float) -> float:
        return x - self.median() if len(self.win) == self.span else 0.0

    def learn_one(self, x: float) -> None:
        self.win.append(x)

    def state_dict(self) -> dict[str, Any]:
        return {"span": self.span, "win": list(self.win)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.span = int(state["span"])
        self.win = deque((float(v) for v in state["win"]), maxlen=self.span)


@register("seasonal")
class SeasonalResidual:
    """Difference from the value one season ago, averaged over ``short`` values.

    The season length is found from the autocorrelation of the first ``detect_after``
    values (strongest peak with correlation above ``min_acf``); without one the component
    stays silent.
    """

    def __init__(
        self,
        detect_after: int = 600,
        short: int = 8,
        min_acf: float = 0.5,
        period: int | None = None,
    ) -> None:
        self.detect_after = detect_after
        self.short = short
        self.min_acf = min_acf
        self.period = period
        self.hist: deque[float] = deque(maxlen=max(detect_after, (period or 0) + 1))
        self.resid: deque[float] = deque(maxlen=short)
        self.n = 0

    @staticmethod
    def find_period(values: np.ndarray, min_acf: float) -> int | None:
        x = values - values.mean()
        n = len(x)
        var = float(x @ x)
        if n < 32 or var <= 0.0:
            return None
        spec = np.fft.rfft(x, 2 * n)
        acf = np.fft.irfft(spec * np.conj(spec))[: n // 2] / var
        lo = 4
        # First local maximum after the first zero crossing: the fundamental season.
        below = np.nonzero(acf[lo:] < 0.0)[0]
        if len(below) == 0:
            return None
        start = lo + int(below[0])
        if start >= len(acf) - 1:
            return None
        k = start + int(np.argmax(acf[start:]))
        return k if acf[k] >= min_acf else None

    def _residual(self, x: float) -> float | None:
        if not self.period or len(self.hist) < self.period:
            return None
        return x - self.hist[-self.period]

    def score_one(self, x: float) -> float:
        r = self._residual(x)
        if r is None:
            return 0.0
        return _mean_with(self.resid, r, self.short)

    def learn_one(self, x: float) -> None:
        r = self._residual(x)
        if r is not None:
            self.resid.append(r)
        self.hist.append(x)
        self.n += 1
        if self.period is None and self.n == self.detect_after:
            self.period = self.find_period(np.asarray(self.hist, dtype=float), self.min_acf)
            if self.period:
                self.hist = deque(self.hist, maxlen=max(self.detect_after, self.period + 1))

    def state_dict(self) -> dict[str, Any]:
        return {
            "detect_after": self.detect_after,
            "short": self.short,
            "min_acf": self.min_acf,
            "period": self.period,
            "hist": list(self.hist),
            "resid": list(self.resid),
            "n": self.n,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.detect_after, self.short = int(state["detect_after"]), int(state["short"])
        self.min_acf = float(state["min_acf"])
        self.period = None if state["period"] is None else int(state["period"])
        self.hist = deque(state["hist"], maxlen=max(self.detect_after, (self.period or 0) + 1))
        self.resid = deque(state["resid"], maxlen=self.short)
        self.n = int(state["n"])


class _Tiling:
    """What followed each short run of bins, in one quantisation of the values.

    ``follow`` counts (context..., next bin) for contexts of 0 to ``order`` bins, ``seen``
    each context; past ``max_keys`` counts every count is halved (those at 1 forgotten),
    so memory stays bounded and the older patterns weigh less.
    """

    __slots__ = ("distinct", "follow", "last", "offset", "seen")

    def __init__(self, offset: float) -> None:
        self.offset = offset
        self.follow: dict[tuple[int, ...], int] = {}
        self.seen: dict[tuple[int, ...], int] = {}
        self.last: tuple[int, ...] = ()  # the latest bins, oldest first
        self.distinct = 0  # bins seen

    def surprise(self, b: int, alpha: float) -> float:
        """``-ln p`` of bin ``b`` next: each longer context's counts blended with the
        shorter one's estimate (``alpha`` pseudo-counts), as PPM-style predictors do."""
        n0 = self.seen.get((), 0)
        p = (self.follow.get((b,), 0) + 0.5) / (n0 + 0.5 * (self.distinct + 1))
        h = self.last
        for k in range(1, len(h) + 1):
            ctx = h[-k:]
            n = self.seen.get(ctx, 0)
            if n == 0:
                break
            p = (self.follow.get((*ctx, b), 0) + alpha * p) / (n + alpha)
        return -math.log(p)

    def learn(self, b: int, order: int, max_keys: int) -> None:
        h = self.last
        for k in range(len(h) + 1):
            ctx = h[len(h) - k :]
            key = (*ctx, b)
            count = self.follow.get(key, 0)
            if not count and not ctx:
                self.distinct += 1
            self.follow[key] = count + 1
            self.seen[ctx] = self.seen.get(ctx, 0) + 1
        self.last = (*h, b)[-order:]
        if len(self.follow) > max_keys:
            self._halve()

    def _halve(self) -> None:
        self.follow = {k: c // 2 for k, c in self.follow.items() if c > 1}
        seen: dict[tuple[int, ...], int] = {}
        for k, c in self.follow.items():
            seen[k[:-1]] = seen.get(k[:-1], 0) + c
        self.seen = seen
        self.distinct = sum(1 for k in self.follow if len(k) == 1)

    def state_dict(self) -> dict[str, Any]:
        return {
            "offset": self.offset,
            "follow": [[*k, c] for k, c in self.follow.items()],
            "last": list(self.last),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> _Tiling:
        t = cls(float(state["offset"]))
        for row in state["follow"]:
            key, c = tuple(int(v) for v in row[:-1]), int(row[-1])
            t.follow[key] = c
            t.seen[key[:-1]] = t.seen.get(key[:-1], 0) + c
        t.distinct = sum(1 for k in t.follow if len(k) == 1)
        t.last = tuple(int(v) for v in state["last"])
        return t


@register("pattern")
class PatternSurprise:
    """How unexpected the value is after the few before it, averaged over ``short`` values.

    The other components judge a value, an average or a step against their history; a
    series can change its *pattern* without any of them leaving their range (a typist's
    rhythm, a traffic curve that turns ragged, a cycle that skips a beat). Here the values
    are cut into bins (``bins`` across the middle 90 % of the first ``fit_after`` values),
    and a small variable-order Markov model (contexts of up to ``order`` bins, PPM-style
    blending) says how probable each new bin is after the ones before it: the raw output
    is ``-ln p``, averaged over the last ``short`` values as HTM averages its raw anomaly
    score. ``tilings`` quantisations offset by a fraction of a bin (tile coding) are
    averaged, so a value on a bin's edge does not flip the verdict.
    """

    def __init__(
        self,
        order: int = 3,
        bins: int = 20,
        tilings: int = 4,
        short: int = 16,
        fit_after: int = 200,
        alpha: float = 1.0,
        max_keys: int = 50_000,
    ) -> None:
        self.order, self.bins, self.tilings = order, bins, tilings
        self.short, self.fit_after, self.alpha, self.max_keys = short, fit_after, alpha, max_keys
        self.first: list[float] = []  # the values before the bins are fixed
        self.res = 0.0  # a bin's width; 0 until fitted
        self.anchor = 0.0
        self.tiles = [_Tiling(i / tilings) for i in range(tilings)]
        self.recent: deque[float] = deque(maxlen=short)

    @property
    def ready(self) -> bool:
        """Whether it scores (its bins are fitted and it has a whole context)."""
        return bool(self.res) and len(self.tiles[0].last) >= self.order

    def _fit(self) -> None:
        a = np.asarray(self.first, dtype=float)
        lo, hi = np.quantile(a, [0.05, 0.95])
        span = float(hi - lo)
        if span <= 0.0:  # a series that barely moved: its whole range, or a sliver
            span = max(float(a.max() - a.min()), abs(float(np.median(a))) * 1e-3, 1e-9)
        self.res, self.anchor = span / self.bins, float(np.median(a))
        for v in self.first:
            self._learn(v)
        self.first = []

    def _bin(self, x: float, tile: _Tiling) -> int:
        # Clamped: a wild reading over a sliver of a bin (a series flat while the bins
        # were fitted) would overflow; beyond 1e15 bins every value is as new anyway.
        return math.floor(min(max((x - self.anchor) / self.res + tile.offset, -1e15), 1e15))

    def _now(self, x: float) -> float | None:
        """The surprise of ``x`` next, averaged over the tilings (None before it can say)."""
        if not self.ready:
            return None
        total = sum(t.surprise(self._bin(x, t), self.alpha) for t in self.tiles)
        return total / self.tilings

    def score_one(self, x: float) -> float:
        s = self._now(x)
        if s is None:
            return 0.0
        return _mean_with(self.recent, s, self.short)

    def _learn(self, x: float) -> None:
        for t in self.tiles:
            t.learn(self._bin(x, t), self.order, self.max_keys)

    def learn_one(self, x: float) -> None:
        if not self.res:
            self.first.append(x)
            if len(self.first) >= self.fit_after:
                self._fit()
            return
        s = self._now(x)
        if s is not None:
            self.recent.append(s)
        self._learn(x)

    def state_dict(self) -> dict[str, Any]:
        return {
            "params": [self.order, self.bins, self.tilings, self.short, self.fit_after],
            "alpha": self.alpha,
            "max_keys": self.max_keys,
            "first": self.first,
            "res": self.res,
            "anchor": self.anchor,
            "tiles": [t.state_dict() for t in self.tiles],
            "recent": list(self.recent),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.order, self.bins, self.tilings, self.short, self.fit_after = (
            int(v) for v in state["params"]
        )
        self.alpha, self.max_keys = float(state["alpha"]), int(state["max_keys"])
        self.first = [float(v) for v in state["first"]]
        self.res, self.anchor = float(state["res"]), float(state["anchor"])
        self.tiles = [_Tiling.from_state(t) for t in state["tiles"]]
        self.recent = deque((float(v) for v in state["recent"]), maxlen=self.short)


COMPONENTS = ("value", "level", "volatility", "seasonal", "spike")
# Components a detector may be given besides the defaults: ``pattern`` (the NAB settings
# use it; live, its counts would take most of a metric's memory, about 17 MB against 1.3:
# bench/detection_memory.py --pattern).
OPTIONAL_COMPONENTS = ("pattern",)
KNOWN_COMPONENTS = COMPONENTS + OPTIONAL_COMPONENTS
# Components whose statistic is already a one-sided surprise (larger is rarer).
ONE_SIDED = frozenset({"value", "pattern"})
# Components whose statistic is in the metric's own units (a mean of readings), whose
# calibration keeps its window in float64; the others' are differences or z-scores
# (calibration.COMPACT).
IN_METRIC_UNITS = frozenset({"level", "level_long"})
# Components whose statistic can be replayed from the values a detector remembers, and
# the part that computes it.
REBUILDABLE: dict[str, type[Spike] | type[PatternSurprise]] = {
    "spike": Spike,
    "pattern": PatternSurprise,
}


@register("ensemble")
class StreamingEnsemble:
    """The per-metric detector used by default: calibrated components, most surprising wins.

    Components: ``value`` (the value itself), ``level`` (short-window mean), ``volatility``
    (short-window mean absolute step, two-sided so a signal that goes flat counts),
    ``seasonal`` (short-window mean of the difference to one season ago) and ``spike``
    (the value against the median of the few before it). Each raw
    component output is calibrated per series by an :class:`AnomalyLikelihood` over the
    last ``history`` values. The score is ``-log10(p)/10`` of the smallest tail probability,
    in [0, 1]. After the score reaches ``alert_level`` the detector stays quiet for
    ``refractory`` values (scores are capped just below the alert level), because one
    incident should raise one early alarm.

    ``tail_reference``: with only n values of history, nothing can look rarer than about
    1/n, so a short series could hardly ever alarm. Until a component has that many values,
    its tail probabilities are scaled by n / ``tail_reference``, so that "beyond anything
    seen so far" weighs the same in a young series as in one with that much history
    (0: off).

    ``glitch_sigma``: a value that far from the median (in MAD sigmas, on a signal that
    has some spread), after one that was not, is scored but not learned: a sensor glitch
    (65535, a float's maximum, one absurd reading) must not teach every statistic that
    such levels are ordinary, which would hide the next real fault for ``history`` values.
    The second such value in a row is learned (a change, not a glitch), and so is one
    like a glitch held before (within a factor of 2, same side): a spike that recurs, such
    as an hourly job's, is part of normal from its second time. (0: off.)

    ``tail_fit``: how a component's calibration extrapolates beyond the values it has
    seen (:data:`~.calibration.TAIL_FITS`): ``range`` (the frozen NAB settings) or
    ``quantiles`` (the live engine: steadier, so an alert level above what a mere new
    record scores can be used without losing the faults just beyond the history).

    ``calibrate_after``: values before the calibrations learn. The first statistics are
    measured against the median and MAD of a handful of values and come out wild (a |z|
    of 6 on white noise); learned, they stay the calibration's extremes for ``history``
    values and a young series scores even a 20-sigma spike as ordinary. (0: from the
    first value, as the frozen NAB settings do.)

    ``memory``: values over which each calibration also keeps its statistic's extremes
    (:class:`~.calibration.ExtremesMemory`, a few KB), when longer than ``history``: a
    value beyond everything the history holds is judged against what the longer span
    reached, so a machine's Monday start-up after an idle weekend is no record. (0: off,
    as the frozen NAB settings.)

    ``resolution_s``: the calibrations learn at most one value per this many seconds of
    reading time (each statistic's most surprising of the interval, its smallest tail
    probability, learned before the next interval's first reading is scored), when
    ``update`` is given the reading's time. A metric read every second then remembers as
    long a time as one read every 10 s (``history`` and ``memory`` count learned values),
    and a tail probability means "this far out in no 10-s interval before", so an alert
    level keeps its meaning at any rate (read per second and learned per reading, a
    two-shift machine's start and stop alarmed every day: 17280 values were 4.8 hours).
    Scoring stays per reading. (0: every value, as the frozen NAB settings and a caller
    without times.)

    ``refractory_warmups``: when set, the refractory period is that many warmups instead of
    ``refractory`` values. A benchmark such as NAB gives each series a warmup (probation)
    proportional to its length, so a quiet time in those units scales with the series; a
    fixed count of values is too long for a short series and too short for a long one.
    """

    def __init__(
        self,
        history: int = 750,
        short: int = 8,
        warmup: int = 100,
        refractory: int = 0,
        alert_level: float = 0.5,
        components: tuple[str, ...] = COMPONENTS,
        detect_after: int | None = None,
        weights: dict[str, float] | None = None,
        long: int = 0,
        tail_reference: int = 0,
        refractory_warmups: float = 0.0,
        glitch_sigma: float = 0.0,
        tail_fit: str = "range",
        calibrate_after: int = 0,
        memory: int = 0,
        resolution_s: float = 0.0,
    ) -> None:
        self.history = history
        self.memory = memory
        self.resolution_s = resolution_s
        # The interval being gathered (its index) and each statistic's most surprising
        # value in it so far with its tail probability, learned when a reading of a later
        # interval arrives.
        self.interval: int | None = None
        self.pending: dict[str, tuple[float, float]] = {}
        self.calibrate_after = calibrate_after
        self.tail_fit = tail_fit
        self.glitch_sigma = glitch_sigma
        self.glitch_before = False
        self.glitches: deque[float] = deque(maxlen=8)  # deviations of the glitches held
        self.refractory_warmups = refractory_warmups
        if refractory_warmups:
            refractory = int(refractory_warmups * warmup)
        self.tail_reference = tail_reference
        self.short = short
        self.long = long
        self.warmup = warmup
        self.refractory = refractory
        self.alert_level = alert_level
        self.weights = dict(weights or {})
        self.parts: dict[str, Any] = {
            "value": RobustZScore(history),
            "level": LevelShift(short),
            "volatility": Volatility(short),
            "seasonal": SeasonalResidual(detect_after or warmup, short),
            "spike": Spike(),
        }
        if "pattern" in components:  # built only when used: the costliest part
            self.parts["pattern"] = PatternSurprise()
        comps = list(components)
        if long:
            self.parts["level_long"] = LevelShift(long)
            self.parts["volatility_long"] = Volatility(long)
            # The long window of each listed short-window component.
            comps += [
                f"{c}_long"
                for c in ("level", "volatility")
                if c in comps and f"{c}_long" not in comps
            ]
        self.components = tuple(comps)
        self.cal: dict[str, AnomalyLikelihood] = {
            name: self._new_calibration(name) for name in self.components
        }
        self.n = 0
        self.quiet = 0
        self.last_tails: dict[str, float] = {}
        self.last_raw: dict[str, float] = {}  # the components' outputs, before calibration
        self.last_score = 0.0

    def _raw(self, x: float) -> dict[str, float]:
        out = {}
        for name in self.components:
            part = self.parts[name]
            out[name] = part.score_one(x)
        return out

    def _waiting(self) -> str | None:
        """The component that cannot say yet, if any: ``pattern`` before its bins are
        fitted. It scores nothing and its calibration does not learn the placeholder 0s
        (against a run of them its first real surprises were all records: a live metric
        alarmed as the component started). Only with ``calibrate_after`` (the live
        settings keep early junk out of the calibrations); the frozen NAB settings learn
        every statistic from the first value, placeholders included, as evaluated."""
        part = self.parts.get("pattern")
        if part is None or part.ready or not self.calibrate_after or "pattern" not in self.cal:
            return None
        return "pattern"

    def _score(self, x: float) -> tuple[float, dict[str, float], dict[str, float]]:
        raw = self._raw(x)
        waiting = self._waiting()
        tails = {
            name: 1.0 if name == waiting else self.cal[name].tail(v) for name, v in raw.items()
        }
        if self.n < self.warmup:
            return 0.0, raw, tails
        best = 0.0
        for name, p in tails.items():
            if self.tail_reference:
                p *= min(1.0, len(self.cal[name].stats) / self.tail_reference)
            s = tail_to_score(p) * self.weights.get(name, 1.0)
            best = max(best, s)
        return best, raw, tails

    def score_one(self, x: float) -> float:
        s, _, _ = self._score(x)
        if self.quiet > 0:
            s = min(s, self.alert_level * 0.999)
        return s

    def learn_one(self, x: float) -> None:
        self.update(x)

    def update(self, x: float, t: float | None = None) -> float:
        """Score ``x`` then learn it; the cheap path used by the engine and the harness.
        ``t``: the reading's time in seconds (for ``resolution_s``)."""
        if t is not None and self.resolution_s > 0.0:
            self._close_interval(math.floor(t / self.resolution_s))
        s, raw, tails = self._score(x)
        self.last_tails, self.last_raw = tails, raw
        self.last_score = s  # before the refractory period caps it
        if self.quiet > 0:
            self.quiet -= 1
            s = min(s, self.alert_level * 0.999)
        elif s >= self.alert_level and self.refractory:
            self.quiet = self.refractory
        dev = self._glitch(x)
        after_glitch, self.glitch_before = self.glitch_before, dev is not None
        if dev is not None and not after_glitch and not self._recurs(dev):
            self.glitches.append(dev)  # held: scored above, not learned
            self.n += 1
            return s
        if self.n >= self.calibrate_after:
            self._learn_calibrations(raw, tails, t)
        seasonal = self.parts["seasonal"]
        had_period = seasonal.period
        for part in self.parts.values():
            part.learn_one(x)
        if "seasonal" in self.cal and seasonal.period and not had_period:
            self._backfill_seasonal(seasonal)
        self.n += 1
        return s

    def _close_interval(self, interval: int) -> None:
        """A reading of ``interval`` arrived: the values gathered in an earlier one are
        learned before it is scored (readings 10 s apart score as when each was learned)."""
        if interval != self.interval:
            for name, (v, _) in self.pending.items():
                self.cal[name].learn(v)
            self.interval, self.pending = interval, {}

    def _learn_calibrations(
        self, raw: dict[str, float], tails: dict[str, float], t: float | None
    ) -> None:
        waiting = self._waiting()
        if self.resolution_s <= 0.0 or t is None:
            for name, v in raw.items():
                if name != waiting:
                    self.cal[name].learn(v)
            return
        # Each statistic's most surprising value of the interval: the smallest tail
        # probability (a two-shift machine's level sits far from its median all day, so
        # the distance from the centre would pick the wrong side), the distance from the
        # centre between equals (a young calibration answers 1.0 to everything).
        pending = self.pending
        for name, v in raw.items():
            if name == waiting:
                continue
            p = tails.get(name, 1.0)
            held = pending.get(name)
            if held is not None:
                if p > held[1]:
                    continue
                if p == held[1]:
                    center = self.cal[name].stats.center
                    if abs(v - center) <= abs(held[0] - center):
                        continue
            pending[name] = (v, p)

    def _new_calibration(self, name: str) -> AnomalyLikelihood:
        """An empty calibration for component ``name``: two-sided but for ``value`` and
        ``pattern``, whose statistics are already a distance and a surprise; its window
        compact (float32) but for the statistics in the metric's own units
        (``IN_METRIC_UNITS``)."""
        return AnomalyLikelihood(
            self.history,
            1,
            two_sided=name not in ONE_SIDED,
            tail_fit=self.tail_fit,
            memory=self.memory,
            compact=name not in IN_METRIC_UNITS,
        )

    def set_history(self, history: int) -> None:
        """Remember ``history`` values from now on, keeping what is remembered (the
        latest of it when shorter): a saved detector takes a changed history on at an
        upgrade instead of learning afresh."""
        self.history = history
        self.parts["value"].ref.resize(history)
        for cal in self.cal.values():
            cal.stats.resize(history)

    def set_memory(self, memory: int) -> None:
        """Remember the statistics' extremes over ``memory`` values from now on (0: off),
        starting from the histories: a saved detector takes it on at an upgrade."""
        self.memory = memory
        for cal in self.cal.values():
            cal.stats.set_memory(memory)

    def add_component(self, name: str) -> None:
        """Start watching ``name`` (one of :data:`REBUILDABLE`) with its calibration rebuilt
        from the values the ``value`` component remembers: a detector saved before the
        component existed takes it on at an upgrade, and one a rule now gives it (``pattern``)
        takes it on at once, instead of learning afresh."""
        if name in self.components:
            return
        if name not in REBUILDABLE:
            raise ValueError(f"component {name!r} cannot be rebuilt; one of {list(REBUILDABLE)}")
        part = REBUILDABLE[name]()
        cal = self._new_calibration(name)
        for x in self.parts["value"].ref.buf.tolist():
            if part.ready:
                cal.learn(part.score_one(x))
            part.learn_one(x)
        self.parts[name], self.cal[name] = part, cal
        self.components += (name,)

    @property
    def fit_in_use(self) -> str:
        """``quantiles`` once every component's calibration extrapolates by quantiles,
        else ``range``: a young series scores the same fault lower (see the engine's
        ``streaming_min_score_young``)."""
        fits = {c.stats.fit_in_use for c in self.cal.values()}
        return "quantiles" if fits == {"quantiles"} else "range"

    def _glitch(self, x: float) -> float | None:
        """The deviation of ``x`` from the median when it is glitch-sized, else None."""
        if not self.glitch_sigma:
            return None
        ref = self.parts["value"].ref
        if len(ref) < 100 or ref.mad_sigma <= 0.0:
            return None
        dev = x - ref.center
        return dev if abs(dev) > self.glitch_sigma * ref.mad_sigma else None

    def _recurs(self, dev: float) -> bool:
        return any(0.5 <= dev / held <= 2.0 for held in self.glitches if held)

    def _backfill_seasonal(self, seasonal: SeasonalResidual) -> None:
        # The season was just found: replay the stored history so the seasonal calibration
        # starts with a full picture instead of a run of zeros.
        cal = self._new_calibration("seasonal")
        hist = list(seasonal.hist)
        p, k = seasonal.period or 0, seasonal.short
        resid: deque[float] = deque(maxlen=k)
        for j in range(p, len(hist)):
            resid.append(hist[j] - hist[j - p])
            cal.learn(sum(resid) / len(resid))
        self.cal["seasonal"] = cal

    def params(self) -> dict[str, Any]:
        """The constructor arguments this detector was built with (``from_state`` uses them)."""
        return {
            "history": self.history,
            "short": self.short,
            "long": self.long,
            "warmup": self.warmup,
            "refractory": self.refractory,
            "alert_level": self.alert_level,
            "components": list(self.components),
            "weights": self.weights,
            "tail_reference": self.tail_reference,
            "refractory_warmups": self.refractory_warmups,
            "glitch_sigma": self.glitch_sigma,
            "tail_fit": self.tail_fit,
            "calibrate_after": self.calibrate_after,
            "memory": self.memory,
            "resolution_s": self.resolution_s,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "params": self.params(),
            "parts": {k: p.state_dict() for k, p in self.parts.items()},
            "cal": {k: c.state_dict() for k, c in self.cal.items()},
            "n": self.n,
            "quiet": self.quiet,
            "glitch_before": self.glitch_before,
            "glitches": list(self.glitches),
            **({"interval": self.interval, "pending": self.pending} if self.pending else {}),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        for k, p in self.parts.items():
            if k in state["parts"]:  # a state saved before a part existed: it starts fresh
                p.load_state(state["parts"][k])
        for k, c in self.cal.items():
            c.load_state(state["cal"][k])
        self.n, self.quiet = int(state["n"]), int(state["quiet"])
        self.glitch_before = bool(state.get("glitch_before", False))
        self.glitches.extend(float(d) for d in state.get("glitches", ()))
        if state.get("pending"):
            self.interval = int(state["interval"])
            self.pending = {str(k): (float(v), float(p)) for k, (v, p) in state["pending"].items()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> StreamingEnsemble:
        params = dict(state["params"])
        params["components"] = tuple(c for c in params["components"] if not c.endswith("_long"))
        det = cls(**params)
        det.load_state(state)
        return det


@register("stuck")
class StuckSensor:
    """Counts how long the value has repeated exactly, against the longest repeat seen.

    Score: the current run length divided by ``max(min_run, factor * longest normal run)``,
    so 1.0 means "repeated for longer than this sensor ever did". Sensors that are
    naturally quantised (long repeats in normal operation) raise the bar by themselves.

    A signal that has taken only 2 to ``DISTINCT - 1`` distinct values so far is a state
    (a door, a run signal, a machine mode), not a measurement: holding a value is what it
    does, so it is not watched (``discrete``; it scores 0). One that never changed is still
    watched (a dead sensor), and so is one that has ever shown ``DISTINCT`` values.

    A signal that repeats its previous value in at least ``QUANTISED`` of its readings
    (whole degrees, counts) holds values by nature, longest where it turns: it is judged
    only after ``learn_for`` readings, once its longest holds are known. Before, a
    temperature read in whole degrees was "stuck" 19 times in its first two days.
    """

    DISTINCT = 5
    QUANTISED = 0.05

    def __init__(self, min_run: int = 12, factor: float = 3.0, learn_for: int = 8640) -> None:
        self.min_run = min_run
        self.factor = factor
        self.learn_for = learn_for
        self.prev: float | None = None
        self.run = 0
        self.longest = 0
        self.values: set[float] = set()  # distinct values seen, up to DISTINCT
        self.n = 0  # readings learned
        self.repeats = 0  # readings equal to the one before, in runs that ended normally
        self.raised = False  # the current run was reported
        self.step: float | None = None  # the smallest change between readings seen

    @property
    def discrete(self) -> bool:
        return 2 <= len(self.values) < self.DISTINCT

    @property
    def quantised(self) -> bool:
        return len(self.values) > 1 and self.repeats >= self.QUANTISED * self.n

    @property
    def bar(self) -> float:
        """Repeats beyond which a run looks stuck."""
        return max(self.min_run, self.factor * self.longest)

    def just_stuck(self) -> bool:
        """Whether the value just learned made the run reach the bar (raise once a run);
        never for a state signal, nor for a quantised one still being learned."""
        if self.run < max(1, math.ceil(self.bar)) or self.raised or self.discrete:
            return False
        if self.quantised and self.n < self.learn_for:
            return False
        self.raised = True
        return True

    def score_one(self, x: float) -> float:
        if self.discrete:
            return 0.0
        run = self.run + 1 if self.prev is not None and x == self.prev else 0
        return run / self.bar

    def learn_one(self, x: float) -> None:
        if self.prev is not None and x == self.prev:
            self.run += 1
        else:
            # Runs are learned once finished and only if they did not look stuck, so a
            # stuck period does not teach the detector that stuck is normal; but a run
            # that ended by the metric's smallest change (a whole-degree temperature
            # moving on by one degree) was the signal holding, however long: else a slow
            # quantised signal whose first holds outlast 12 readings never learned its
            # holds and every one was "stuck" (16 a day at 10 s), and one read every second
            # was "stuck" at each daily turning point. A stuck sensor that recovers jumps
            # to wherever the value went, not by one step (it was reported; the next hold
            # as long is not).
            if self.prev is not None:
                change = abs(x - self.prev)
                ended_by_a_step = self.step is not None and change <= self.step
                if self.run and (self.run < self.bar or ended_by_a_step):
                    self.longest = max(self.longest, self.run)
                    self.repeats += self.run
                self.step = change if self.step is None else min(self.step, change)
            self.run = 0
            self.raised = False
        self.prev = x
        self.n += 1
        if len(self.values) < self.DISTINCT:
            self.values.add(x)

    def state_dict(self) -> dict[str, Any]:
        return {
            "min_run": self.min_run,
            "factor": self.factor,
            "learn_for": self.learn_for,
            "prev": self.prev,
            "run": self.run,
            "longest": self.longest,
            "values": sorted(self.values),
            "n": self.n,
            "repeats": self.repeats,
            "raised": self.raised,
            "step": self.step,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.min_run, self.factor = int(state["min_run"]), float(state["factor"])
        self.prev = None if state["prev"] is None else float(state["prev"])
        self.run, self.longest = int(state["run"]), int(state["longest"])
        self.values = {float(v) for v in state.get("values", ())}
        # Saved before these were kept: as if learned long enough, and the run reported
        # when it is past the bar (it was reported where it reached it).
        self.learn_for = int(state.get("learn_for", self.learn_for))
        self.n = int(state.get("n", self.learn_for))
        self.repeats = int(state.get("repeats", 0))
        self.raised = bool(state.get("raised", self.run >= math.ceil(self.bar)))
        step = state.get("step")
        self.step = None if step is None else float(step)


@dataclass(slots=True, frozen=True)
class Burst:
    """Spikes of one metric close together, improbable at its own rate of spikes."""

    time_s: float  # the last spike's reading
    value: float  # ... its value
    reference: float  # ... the level of the readings around it
    count: int  # spikes within the window
    span_s: float  # from the first to the last of them
    peak_sigma: float  # the largest, in robust spreads (signed)
    p: float  # chance of that many at the metric's usual rate (Poisson)
    usual_per_day: float  # the metric's usual rate of spikes


def poisson_tail(k: int, mu: float) -> float:
    """P(N >= k) for N ~ Poisson(mu), summed from k up (exact for the tiny mu of rare
    events, where 1 - cdf would round to 0)."""
    if k <= 0:
        return 1.0
    term = math.exp(-mu) * mu**k / math.factorial(k)
    total, i = 0.0, k
    while term > total * 1e-16 and i < k + 1000:
        total += term
        i += 1
        term *= mu / i
    return min(1.0, total)


class SpikeBurst:
    """Repeated spikes: single readings that leave the readings on both sides of them.

    A spike is a reading at least ``sigma`` spreads from the median of the ``BEFORE``
    readings before it and the ``AFTER`` after it, and at least half as far, on the same
    side, from each side's median alone (a Hampel test that looks both ways: a step, a
    ramp or a load change is not a spike). The spread is that of readings against their
    predecessors' median, 1.4826 times their median size, the larger of two stochastic
    quantiles (a few floats to keep, no window): over the metric's history (steps of
    ``RATE`` after the first ``FIRST``) and over its last fifty or so readings (steps of
    ``FAST``: a machine noisier running than idle is judged by its running spread a few
    minutes after it starts). Around a regime change the readings on each side, ``NEAR``
    of them, say more: where their spread is over ``GUARD`` times that, the reading is not
    judged (a machine that just started running; 71 "bursts" in 4 days on noise switching
    between 1 and 3 sigma every two hours when judged by the history's spread alone), and
    ``LOCAL`` times theirs is the least spread. Theirs, read from 16 readings, was once
    the spread itself whenever larger, and lost a 6-sigma spike now and then to the noise
    of so few: read every second, five 6-sigma spikes in 10 minutes were found in 10 to 15
    of 20 fleets after a day of history; with the quantile of the last fifty, 16 to 20
    (``bench/detection_spikes.py``, docs/detection.md).

    One spike in noise is no news at 86,400 readings a day; ``count`` within ``window_s``
    are, when the metric's own rate of spikes (learned, forgetting over a week, with one
    spike assumed) makes that many that close improbable (Poisson, ``p <= max_p``): an
    intermittent contact, a failing sensor, a knocking bearing. It sees what a device
    model's 10-s rows average away (a lone spike read every second is a tenth of itself
    there). Judged ``NEAR`` readings late.
    """

    BEFORE = 5
    AFTER = 3
    NEAR = 8
    FIRST = 64
    RATE = 0.001
    FAST = 0.02  # the recent spread's step: ~50 readings to follow a change of spread
    GUARD = 1.5  # a spread around the reading this many times larger: not judged
    LOCAL = 0.8  # the spread around the reading, discounted for the noise of 16 readings
    FORGET_S = 7 * 86400.0

    def __init__(
        self,
        sigma: float = 4.0,
        window_s: float = 600.0,
        count: int = 3,
        max_p: float = 1e-6,
        learn_s: float = 3600.0,
    ) -> None:
        self.sigma, self.window_s, self.count = sigma, window_s, count
        self.max_p, self.learn_s = max_p, learn_s
        # (time, value, its distance from the median of the BEFORE readings before it)
        self.recent: deque[tuple[float, float, float]] = deque(maxlen=2 * self.NEAR + 1)
        self._first: list[float] = []  # the first residual sizes, until FIRST
        self.size = 0.0  # the median size of a residual, once FIRST are known
        self.fast = 0.0  # the same, over the last ~1/FAST readings that moved
        self.scale = 0.0  # 0: not known yet (or the metric never moved)
        self.exposure_s = 0.0  # time watched, forgetting over FORGET_S
        self.spikes = 0.0  # spikes seen in it, forgetting likewise
        self.last_s: float | None = None
        self.window: deque[tuple[float, float]] = deque()  # (time, sigma) of recent spikes
        self.step: float | None = None  # the smallest change between readings seen

    @property
    def ready(self) -> bool:
        """Whether it may raise a burst: on, its spread known, watched ``learn_s``."""
        return bool(self.count) and self.scale > 0 and self.exposure_s >= self.learn_s

    @property
    def usual_per_day(self) -> float | None:
        """The rate of spikes a burst is measured against (one assumed), a day."""
        if self.exposure_s <= 0:
            return None
        return round((self.spikes + 1.0) / self.exposure_s * 86400.0, 3)

    def update(self, x: float, t_s: float) -> Burst | None:
        """Learn one reading; the burst its arrival completes, if any."""
        if self.last_s is not None:
            dt = min(max(t_s - self.last_s, 0.0), 3600.0)  # a gap is not time watched
            keep = math.exp(-dt / self.FORGET_S)
            self.exposure_s = self.exposure_s * keep + dt
            self.spikes *= keep
        self.last_s = t_s
        recent = self.recent
        back = 0.0
        if len(recent) >= self.BEFORE:
            # Sorting five floats in Python beats NumPy's median on them (~1 us vs ~10).
            before = sorted([recent[-k][1] for k in range(1, self.BEFORE + 1)])
            back = x - before[self.BEFORE // 2]
        if recent and x != recent[-1][1]:
            change = abs(x - recent[-1][1])
            self.step = change if self.step is None else min(self.step, change)
            # The spread of the readings that moved: a stuck hour would teach it zeros,
            # and the recovered sensor's noise read as spikes of 30 sigma.
            if len(recent) >= self.BEFORE:
                self._learn_size(abs(back))
        recent.append((t_s, x, back))
        if len(recent) < recent.maxlen or not self.scale:  # type: ignore[operator]
            return None
        c = self.NEAR
        t_c, x_c, back = recent[c]  # its distance from the side before, kept as it came
        if abs(back) < 0.5 * self.sigma * self.scale:
            return None
        after = sorted([recent[k][1] for k in range(c + 1, c + 1 + self.AFTER)])
        ahead = x_c - after[self.AFTER // 2]
        least = min(abs(back), abs(ahead))
        # A whole-degree reading one degree off and back is the signal between two
        # values (at a plateau, many times an hour), not a spike: it must leave by more.
        if (
            back * ahead <= 0
            or least < 0.5 * self.sigma * self.scale
            or least <= (self.step or 0.0)
        ):
            return None
        # How far, from the level on both sides (the 8 readings' median: steadier than
        # either side's, so a 6-sigma spike is not lost to the noise of a median of 3).
        both = sorted([recent[k][1] for k in range(c - self.BEFORE, c + 1 + self.AFTER) if k != c])
        off = x_c - 0.5 * (both[len(both) // 2 - 1] + both[len(both) // 2])
        if abs(off) < self.sigma * self.scale:
            return None
        # The spread around it: the median of the sizes near it but for the two largest
        # (another spike of the same burst a few readings away is not noise).
        near = sorted(self._near_sizes(c))
        local = 1.4826 * near[(len(near) - 2) // 2]
        spread = max(self.scale, 1.4826 * self.fast)
        if local > self.GUARD * spread:
            return None
        spread = max(spread, self.LOCAL * local)
        if abs(off) < self.sigma * spread or least < 0.5 * self.sigma * spread:
            return None
        z = off / spread
        level = x_c - off
        seen = self.spikes
        self.spikes += 1.0
        while self.window and self.window[0][0] < t_c - self.window_s:
            self.window.popleft()
        self.window.append((t_c, z))
        if len(self.window) < self.count or not self.ready:
            return None
        # The usual rate, from the spikes before this window's (one assumed, so a metric
        # watched for a short time is not taken to never spike).
        rate = (max(seen - (len(self.window) - 1), 0.0) + 1.0) / self.exposure_s
        p = poisson_tail(len(self.window), rate * self.window_s)
        if p > self.max_p:
            return None
        peak = max((s for _, s in self.window), key=abs)
        burst = Burst(
            t_c, x_c, level, len(self.window), t_c - self.window[0][0], peak, p, rate * 86400.0
        )
        self.window.clear()  # these spikes are reported; the next burst needs new ones
        return burst

    def _near_sizes(self, c: int) -> list[float]:
        """The sizes of the readings around ``recent[c]`` against their predecessors'
        median, ``c``'s own left out of the medians it is in (the spike lifts them by an
        order statistic, and the readings after it read larger than the noise is)."""
        recent, n = self.recent, self.BEFORE
        sizes = []
        for k in range(len(recent)):
            if k == c:
                continue
            if c < k <= c + n:
                before = sorted([recent[k - j][1] for j in range(1, n + 2) if k - j != c])
                sizes.append(abs(recent[k][1] - before[n // 2]))
            else:
                sizes.append(abs(recent[k][2]))
        return sizes

    def _learn_size(self, r: float) -> None:
        if self.fast:  # the recent spread: the same update, fifty times the step
            self.fast *= 1.0 + self.FAST if r > self.fast else 1.0 - self.FAST
        elif self.size:
            self.fast = self.size
        if self.size:
            # Up a little when above the median, down as much when below: it settles
            # where half the sizes are larger, and follows a spread that changes.
            self.size *= 1.0 + self.RATE if r > self.size else 1.0 - self.RATE
        else:
            self._first.append(r)
            if len(self._first) < self.FIRST:
                return
            # A quantised signal's moves are mostly one step: its median size is that.
            self.size = float(np.median(self._first)) or float(np.mean(self._first))
            self._first = []
        self.scale = 1.4826 * self.size

    def state_dict(self) -> dict[str, Any]:
        return {
            "sigma": self.sigma,
            "window_s": self.window_s,
            "count": self.count,
            "max_p": self.max_p,
            "learn_s": self.learn_s,
            # Packed (exact, half the size of JSON numbers): every metric's device file has it.
            "recent": pack_floats(np.array(self.recent, dtype=float).ravel()),
            "first": self._first,
            "size": self.size,
            "fast": self.fast,
            "exposure_s": self.exposure_s,
            "spikes": self.spikes,
            "last_s": self.last_s,
            "window": [list(ts) for ts in self.window],
            "step": self.step,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.sigma, self.window_s = float(state["sigma"]), float(state["window_s"])
        self.count, self.max_p = int(state["count"]), float(state["max_p"])
        self.learn_s = float(state["learn_s"])
        recent = unpack_floats(state["recent"]).reshape(-1, 3)
        self.recent = deque(
            ((float(t), float(v), float(r)) for t, v, r in recent), maxlen=2 * self.NEAR + 1
        )
        self._first = [float(r) for r in state["first"]]
        self.size = float(state["size"])
        self.scale = 1.4826 * self.size
        # A state saved before the recent spread was kept starts it at the history's.
        self.fast = float(state.get("fast", self.size))
        self.exposure_s, self.spikes = float(state["exposure_s"]), float(state["spikes"])
        self.last_s = None if state["last_s"] is None else float(state["last_s"])
        self.window = deque((float(t), float(s)) for t, s in state["window"])
        self.step = None if state.get("step") is None else float(state["step"])
