"""The live path: per-device detection state fed by the ingest pipeline, one call per batch.

>>> from millstream_cloud.model import Reading
>>> engine = DetectionEngine(EngineSettings(warmup=50, mv_train_rows=50))
>>> batch = [Reading("m1", "s", "temp", i * 10**9, 20.0 + (i % 3) * 0.1) for i in range(200)]
>>> engine.observe(batch)
[]
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote

import numpy as np

from ..hints import KeyedValueError
from ..model import Anomaly, Contribution, Reading
from .calibration import Hysteresis
from .explain import describe, explain
from .multivariate import DISTRUST_PROBE_ROWS, SHORT_BAR, VirtualSensorResidual
from .rules import Rule, check_bound, check_streaming, refuse_unknown, resolve
from .streaming import REBUILDABLE, SpikeBurst, StreamingEnsemble, StuckSensor
from .window import (
    LOADING_FROM,
    ROWS_SUFFIX,
    SAVING_TO,
    RowsWriter,
    RowWindow,
    owner,
    referred_files,
)

STATE_FILE = "detection-state.json"  # the header; each device's state in DEVICE_DIR
DEVICE_DIR = "devices"
STATE_VERSION = 3

log = logging.getLogger("millstream.detection")


@dataclass(slots=True)
class EngineSettings:
    """Everything the live detectors need; defaults are the frozen, documented choices.

    Per metric: a :class:`StreamingEnsemble` (``streaming`` parameters, ``warmup``
    readings before it may alarm). Per device with two or more metrics: a
    :class:`VirtualSensorResidual` model of how the metrics move together (``mv_*``),
    trained on the first ``mv_train_rows`` complete rows and retrained every
    ``mv_retrain_rows`` rows on the latest rows that raised nothing. ``mv_on``/``mv_off``
    are in sigmas of the averaged per-metric residual (prediction uncertainty included).
    """

    streaming: dict[str, Any] = field(
        default_factory=lambda: {
            # Two days of 10-s readings: a machine that starts and stops once a day (a
            # shift pattern) sees each step in its history; with 6000 (17 h) each was a
            # new record, two false alarms a day (bench/detection_single_metric.py).
            "history": 17280,
            # ... and the extremes of each statistic over a week (a few KB): a machine on a
            # five-day week starts on Monday after two idle days; judged against the two
            # days alone, every Monday start-up and stop was a record and an alarm
            # (bench/detection_weekly.py).
            "memory": 60480,
            # ... counted in 10-s intervals whatever the reading rate: a metric read every
            # second learns each statistic's most surprising value of each 10 s, else its
            # 17280 values were 4.8 hours and a two-shift machine's start and stop alarmed
            # every day (bench/detection_fast_metric.py).
            "resolution_s": 10.0,
            "short": 4,
            "long": 32,
            # A new record of any of a metric's statistics scores about 0.42 (1 in the
            # 17280 values remembered): live, on a healthy signal, that happens every few
            # hours, so an alarm needs clearly more, with a tail fit that extrapolates
            # steadily beyond the history (bench/detection_single_metric.py).
            "alert_level": 0.5,
            "tail_fit": "quantiles",
            # The first statistics rest on the median and MAD of a handful of values; in
            # the calibration they would stand as its extremes for `history` readings.
            "calibrate_after": 64,
            "refractory": 300,
            # One absurd reading (a sensor glitch) is reported but not learned, so it does
            # not hide the next fault for `history` readings (see StreamingEnsemble).
            "glitch_sigma": 50.0,
            # The NAB settings add tail_reference=3000 for short benchmark files; live,
            # the warm-up holds early alarms back instead, and an unreported early alarm
            # would start a refractory period that hides the next real one.
        }
    )
    warmup: int = 720
    streaming_alarms: bool = True  # raise per-metric anomalies, not only multivariate ones
    streaming_min_score: float = 0.7  # per-metric alarms on multi-metric devices need this
    # ... and this while the metric's calibration is young (under 200 values, its tail
    # still fitted by the range seen, which scores the same spike lower). The same bar by
    # default: on demo fleets 0.6 found 5 more of 88 spikes and raised one false anomaly.
    streaming_min_score_young: float = 0.7
    # A lone metric's alarm on a device with several metrics waits this many rows: if
    # another metric of the device reached its alert level within as many rows before or
    # after, the load changed (it moves several metrics, one after another) and the alarm
    # is dropped. 0: only alarms in the same row are compared.
    load_change_rows: int = 5
    # A metric of a device with several that stops reporting while the others go on, for
    # this many rows and five times its usual gap, is reported once as silent, and the
    # device model pauses (its rows would hold the last value forever). 0: off.
    silent_after_rows: int = 30
    # A device's readings this close in time (each metric once) are one row: metrics read
    # one after another (a Modbus poll, OPC UA source timestamps) do not share a timestamp
    # to the nanosecond. 0: only readings with the same timestamp.
    row_tolerance_ms: float = 1000.0
    # Once a device's multivariate model is trained it covers its metrics; keeping the
    # per-metric ensembles running as well costs most of the per-reading time.
    streaming_when_multivariate: bool = False
    stuck_min_run: int = 12  # readings; a sensor repeating longer than this (and 3x its
    # longest normal repeat) is reported as stuck
    # A metric that repeats its previous value by nature (in 5 % of its readings or more:
    # whole degrees, counts) holds values longest where it turns: judged for stuck only
    # after this many readings (a day at 10 s), once its longest holds are known.
    stuck_learn_readings: int = 8640
    # Bursts of spikes on any metric (SpikeBurst): `spike_count` readings within
    # `spike_window_s`, each `spike_sigma` robust spreads from the readings on both sides
    # of it, improbable at the metric's own rate of spikes (p <= 1e-6). It sees what a
    # device model's 10-s rows average away: read every second, a lone spike is a tenth of
    # itself there (bench/detection_sim.py --step-s 1). 0: off.
    spike_count: int = 3
    spike_sigma: float = 4.0
    spike_window_s: float = 600.0
    multivariate: bool = True
    mv_train_rows: int = 4320  # complete rows before the first model
    mv_window_rows: int = 60480  # rolling window each retrain learns from: a week at 10 s
    mv_retrain_rows: int = 1440
    mv_spans: tuple[int, ...] = (6, 30, 120, 480)
    mv_smooth_rows: int = 180
    mv_slow_span: int = 60  # rows each metric is smoothed over before the slow regression
    mv_extrapolation_penalty: float = 0.0
    mv_holdout: float = 0.3  # share of training rows held out to pick lags and measure spread
    mv_spike_sigma: float = 6.5  # a single row this far off counts on its own
    mv_pair_sigma: float = 4.5  # two rows this far off within mv_pair_rows count too
    mv_pair_rows: int = 60
    mv_on: float = 7.0
    mv_off: float = 3.5
    mv_min_on_rows: int = 30
    mv_quiet_rows: int = 360  # after an incident ends, its tail is not a new incident
    # (at least two of the slow model's lag spans, however long they are)
    # Incidents open at once on a device. While one is open its metric stops feeding the
    # model's predictions of the others (its virtual value stands in), so a second,
    # independent fault is told from the first one's spread; it must reach mv_second_on
    # (or mv_on, if higher), in sigmas of the spread its residual has with the virtual
    # values standing in (measured when first distrusted). 1: one incident per device,
    # whatever else goes wrong meanwhile.
    mv_max_incidents: int = 2
    mv_second_on: float = 9.0
    # A device with more metrics than this gets no device model (its metrics are watched
    # one by one), and a metric that joins a model this wide is watched on its own: a
    # week's fit of 200 metrics takes 30 s of CPU and 0.74 GB at its peak, growing faster
    # than the count (bench/detection_wide.py), and it holds the detection thread.
    mv_max_metrics: int = 200
    # The device model sees one row per this many seconds (the mean of the complete rows in
    # it), so its row counts (a week, 12 h of training, spans, smoothing) are 10-s rows
    # whatever the reading rate; read every second and modelled per row, the simulator's
    # fleets trained after 72 minutes and raised 34 false anomalies in 3 x 6 devices x 20 h
    # (bench/detection_sim.py --step-s 1). 0: every row.
    mv_resolution_s: float = 10.0


# (smallest, largest, whole number) of each numeric engine setting; a value outside fails
# when it is read, not when a device's model later divides by it or sizes a window.
# The largest row counts keep a device model's memory bounded (rows x metrics floats).
BOUNDS: dict[str, tuple[float, float | None, bool]] = {
    "warmup": (0, 10_000_000, True),
    "streaming_min_score": (0, 1, False),
    "streaming_min_score_young": (0, 1, False),
    "load_change_rows": (0, 10_000, True),
    "silent_after_rows": (0, 1_000_000, True),
    "row_tolerance_ms": (0, 3_600_000, False),
    "stuck_min_run": (2, 1_000_000, True),
    "stuck_learn_readings": (0, 100_000_000, True),
    "spike_count": (0, 1000, True),
    "spike_sigma": (1, None, False),
    "spike_window_s": (1, 604_800, False),
    "mv_train_rows": (10, 1_000_000, True),
    "mv_window_rows": (10, 1_000_000, True),
    "mv_retrain_rows": (1, 10_000_000, True),
    "mv_smooth_rows": (1, 100_000, True),
    "mv_slow_span": (1, 100_000, True),
    "mv_extrapolation_penalty": (0, None, False),
    "mv_holdout": (0.01, 0.99, False),
    "mv_spike_sigma": (0.1, None, False),
    "mv_pair_sigma": (0.1, None, False),
    "mv_pair_rows": (1, 1_000_000, True),
    "mv_on": (0.1, None, False),
    "mv_off": (0.1, None, False),
    "mv_min_on_rows": (1, 1_000_000, True),
    "mv_quiet_rows": (0, 10_000_000, True),
    "mv_max_incidents": (1, 64, True),
    "mv_max_metrics": (2, 100_000, True),
    "mv_second_on": (0.1, None, False),
    "mv_resolution_s": (0, 86_400, False),
}


def with_implied(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with the settings they imply unless said: raising (or lowering) the
    lone bar means it for young metrics too."""
    if "streaming_min_score" in values:
        values = {"streaming_min_score_young": values["streaming_min_score"], **values}
    return values


def settings_from_mapping(block: dict[str, Any] | None, pairs: bool = True) -> EngineSettings:
    """Build settings from a config block (e.g. the ``detection:`` section of the cloud's
    settings); an unknown key, a wrong type or a value out of range is an error that names
    the key. ``pairs``: also check settings that depend on each other (``mv_off`` below
    ``mv_on``) against the defaults; a rule's overrides are checked alone (``pairs=False``),
    as they apply over whatever the engine block set."""
    if not block:
        return EngineSettings()
    fields = EngineSettings.__dataclass_fields__
    refuse_unknown("detection settings", block, fields)
    defaults = EngineSettings()
    values = {key: _checked(key, value, getattr(defaults, key)) for key, value in block.items()}
    out = EngineSettings(**with_implied(values))
    if pairs:
        _check_pairs(out, "detection settings")
    return out


def _checked(key: str, value: Any, current: Any) -> Any:
    """One engine setting of the right type and in range, else a
    :class:`KeyedValueError` naming it (below ``streaming``, the parameter too)."""
    where = "detection settings: "
    if isinstance(current, bool):
        ok = isinstance(value, bool)
    elif isinstance(current, (int, float)):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(current, tuple):
        ok = isinstance(value, (list, tuple))
        value = tuple(value) if ok else value
    else:
        ok = isinstance(value, type(current))
    if not ok:
        raise KeyedValueError((key,), f"must be like {current!r}, got {value!r}", where)
    try:
        if key in BOUNDS:
            value = check_bound("", value, *BOUNDS[key])
        if key == "mv_spans":
            value = tuple(check_bound("", span, 1, 100_000, True) for span in value)
            if not value:
                raise ValueError("give one or more spans")
    except ValueError as exc:
        raise KeyedValueError((key,), str(exc), where) from None
    if key == "streaming":
        # Checked here, not when the first reading of a new series builds a detector.
        try:
            value = {**current, **check_streaming(value, "streaming")}
        except KeyedValueError as exc:
            raise KeyedValueError(("streaming", *exc.path), exc.problem, where) from None
    return value


def _check_pairs(s: EngineSettings, where: str) -> None:
    if s.mv_off >= s.mv_on:
        problem = (
            f"{s.mv_off:g}; must be below mv_on ({s.mv_on:g}): "
            "an incident ends when the residual falls below mv_off"
        )
        raise KeyedValueError(("mv_off",), problem, f"{where}: ")


def check_rules(base: EngineSettings, rules: Sequence[Rule]) -> None:
    """Each rule over ``base`` keeps the settings that depend on each other consistent.

    Rules that only together break them (one sets ``mv_off`` for a kind, another ``mv_on``
    for a device of it) are found when a device matches both: its detection fails, is
    logged and counted, and ``describe`` shows the error."""
    for i, rule in enumerate(rules):
        pair = {k: v for k, v in rule.overrides.items() if k in ("mv_on", "mv_off")}
        if pair:
            _check_pairs(replace(base, **pair), f"detection.rules[{i}]")


# A judgement's runner-up explaining at least this share of what its best explains is a
# near tie, parted by models without each (``DeviceModel._part_near_tie``), fitted on the
# latest NEAR_TIE_ROWS kept rows (a day at 10 s), on devices of up to
# NEAR_TIE_MAX_METRICS metrics: the two fits take 0.07 s at 4 metrics, 0.35 s at 16
# (1.3 s at 32, 6.5 s at 32 on a week of rows; synthetic rows), in the ingest loop.
NEAR_TIE = 0.9
# ... named on the runner-up only if it is out of line with the rest of the machine by
# this many sigmas more than the best (more than the noise of a difference of two z's).
NEAR_TIE_MARGIN = 2.0
NEAR_TIE_MAX_METRICS = 16
NEAR_TIE_ROWS = 8640
# The least number of smoothing windows (mv_smooth_rows) after a maintenance window
# before an incident still open is reported again (DetectionEngine.rearm; otherwise two
# of the model's lag spans, the incident's aftermath): a stop's own incident outlasts the
# restart by about one.
REARM_SMOOTHS = 2
# A young model (too young to choose squares) whose curves explain at least this share of
# a metric's line misfit doubts its lines (``VirtualSensorResidual._curve``: 0.00-0.04 on
# the simulator's straight-line machines, 0.28-0.96 on its curves) ...
CURVE_DOUBT = 0.2
# ... and it, or a model that chose squares, does not open an incident where the
# device's other metrics read beyond its training range by more than this share of it
# (``DeviceModel._beyond_reach``).
REACH = 0.05
# Rows (an hour of 10-s rows) between judgements of an incident still open after it was
# judged again (``DeviceModel._rejudge``).
REJUDGE_ROWS = 360
# A retrain held back by an incident's rows in its memory runs anyway this many retrain
# intervals after the last (``DeviceModel._may_fit``): a device with frequent incidents.
RETRAIN_OVERDUE = 3


class Incident(NamedTuple):
    """A device model's new incident."""

    time_ns: int
    score: float
    metric: int  # index of the metric held responsible
    z: np.ndarray  # residual vector, in sigmas
    row: np.ndarray
    smooth: bool  # whether ``z`` is the smoothed residual (not one row's)
    open: list[int]  # the metrics known to be wrong on the device (distrusted meanwhile)
    ended: list[int]  # those of them whose incident ended within its quiet period
    # What the slow model expected each metric to read in ``row`` (None: a spike,
    # explained against the rows just before it)
    expected: np.ndarray | None = None
    # Metrics whose expected value moved faster than they ever did, led by those out of
    # line (VirtualSensorResidual.led_by_others): their residuals are the others', not their own.
    led: tuple[int, ...] = ()
    # Reported after a maintenance window, the device judged again once the stop's
    # aftermath is over (DetectionEngine.rearm): out of line then, since the window or before.
    after_maintenance: bool = False
    # Reported while its incident goes on: out of line once the aftermath was over after
    # this metric of the incident came back in line at this time (a restart after a stop).
    back_in_line: tuple[int, int] | None = None


class DeviceModel:
    """Multivariate state of one device: aligned rows, virtual-sensor residuals, a gate."""

    def __init__(self, settings: EngineSettings) -> None:
        self.s = settings
        self.metrics: list[str] = []
        self.last: dict[str, float] = {}
        self.rows = RowWindow(_window_size(settings))  # with each row's anomaly flag
        self.model: VirtualSensorResidual | None = None
        self.gates: list[Hysteresis] = []
        self.quiet_m: list[int] = []
        self.open: set[int] = set()  # metrics with an incident in progress
        # Metrics the stuck check reported, until they move again: distrusted as inputs
        # like the open incidents' (their readings are known to be wrong), not reported.
        self.stuck: set[int] = set()
        # Metrics whose incident ended, with the rows left of its quiet period: still
        # distrusted (their lagged inputs hold the stand-in's values), not reported again,
        # while the other metrics may raise an incident of their own at mv_second_on.
        self.recovering: dict[int, int] = {}
        self.last_excursion: list[int] = []  # per metric: the row of its latest excursion
        self.prev_excursion: list[int] = []  # ... and of the one before
        self.prev_z = np.zeros((0, 0))  # fast residuals of the last two rows
        self.prev_x = np.zeros((0, 0))  # the last row
        self.prev_t = 0  # and its time
        self.n_rows = 0
        self.since_fit = 0
        # Per-metric alarms waiting for load_change_rows more rows, with the row they were
        # raised at; and which metrics reached their alert level at which recent row.
        self.row_no = 0
        self.held: list[tuple[int, Anomaly]] = []
        self.stirred: deque[tuple[int, str]] = deque()
        self.last_row_ns = 0
        self.row_gap_ns = 0  # time between the last two rows
        # Per metric: the row and time of its latest reading, its usual gap in rows, and
        # the metrics reported silent (until they report again).
        self.heard: dict[str, tuple[int, int]] = {}
        self.usual_gap: dict[str, float] = {}
        self.silent: set[str] = set()
        # Metrics first heard after the model was trained (a sensor added later), and the
        # rows of all metrics, theirs included, that the next model will be trained on.
        self.joining: list[str] = []
        self.next_rows = RowWindow(_window_size(settings))
        # Metrics (indexes) that only count up (parts made, energy used): the model sees
        # their increase per row, which follows the load, not the ever-growing total.
        self.counters: list[int] = []
        self.prev_raw: list[float] | None = None  # the last row scored, as read
        self.glitch_run: list[int] = []  # per metric: rows in a row it read a glitch
        self.glitched: list[tuple[int, int, float]] = []  # new glitches, for the engine
        # The interval being averaged for the model (mv_resolution_s): its index, the sum
        # of its rows, how many, its last row's time.
        self.bucket: list[Any] | None = None
        # Rows left until the device is judged again (``_judge_again``): after a maintenance
        # window (DetectionEngine.rearm), or after one of an open incident's metrics came
        # back in line (``rearm_back``: that metric and when); 0: none pending.
        self.rearm_rows = 0
        self.rearm_back: tuple[int, int] | None = None
        # The open incident (or the one whose quiet period this is) was judged again, or
        # reported by a judgement.
        self.judged_back = False
        # A window's judgement left the stop's incident open: nothing new opens on the
        # live stream until a replay reads it over (``_rejudge``) or it ends.
        self.after_window = False
        # The open incident's metrics reading below the model's training range (stopped).
        self.below: set[int] = set()
        # Something was reported in the open incident since a judgement last found nothing.
        self.judged_out = False
        # Rows until a judged incident still open is judged on a replay (``_rejudge``).
        self.rejudge_rows = REJUDGE_ROWS
        # Per metric, the latest row it read beyond the reach of a model of a machine on
        # curves (``_reach``): the residuals' averages hold those rows a while longer.
        self.reach_rows: list[int] = []

    # Settings the fitted model is made of, and settings of the gates that judge it.
    MODEL_KEYS = (
        "mv_spans",
        "mv_smooth_rows",
        "mv_slow_span",
        "mv_holdout",
        "mv_extrapolation_penalty",
    )
    GATE_KEYS = ("mv_on", "mv_off", "mv_min_on_rows")

    def apply_settings(self, s: EngineSettings) -> None:
        """Switch to new settings, keeping the rows learned so far.

        A changed model setting drops the model and refits it from the kept rows at the
        next batch (no new warm-up); a changed gate setting starts fresh gates."""
        old, self.s = self.s, s
        if old == s:
            return
        size = _window_size(s)
        if self.rows.maxlen != size:
            self.rows.resize(size)
            self.next_rows.resize(size)
        if not s.multivariate:  # turned off: what it learned would be stale if turned on
            self.model = None
            self.rows.clear()
            self.next_rows.clear()
            self.metrics += self.joining
            self.joining = []
            self.since_fit = 0
        elif self.model is not None and any(
            getattr(old, k) != getattr(s, k) for k in self.MODEL_KEYS
        ):
            self.model = None
            self.since_fit = s.mv_train_rows
        if any(getattr(old, k) != getattr(s, k) for k in self.GATE_KEYS):
            self.gates = []

    def add_metric(self, metric: str) -> None:
        """A metric the device starts reporting before its model exists. The rows kept so
        far lack it and cannot train a model of all its metrics: they are dropped, and the
        training rows are counted again from here."""
        self.metrics.append(metric)
        self.rows.clear()
        self.since_fit = 0

    @property
    def paused(self) -> bool:
        """Whether a metric of the model is silent (its rows would hold a stale value)."""
        return bool(self.silent) and any(m in self.silent for m in self.metrics)

    def _fit(self) -> None:
        fitted = self._fitted(self.rows, len(self.metrics))
        if fitted is not None:
            self._use(fitted)

    def _use(self, fitted: tuple[VirtualSensorResidual, list[int]]) -> None:
        """Score with a model just fitted on ``rows`` (and the counters it found)."""
        self.model, self.counters = fitted
        self.prev_raw = self.rows.last()
        self.since_fit = 0
        self._resume()

    def _resume(self) -> None:
        """Bring a new model's stream state (its averages, the recent residuals it
        averages) up to now. Fitted, it ends where its training rows end, and those skip
        the rows inside an incident: a model retrained mid-incident scored the next rows
        from the state of the last healthy one, without its distrusted metrics' stand-ins,
        and raised a false incident on a healthy metric as the lagged averages caught up.
        So it is run over the latest rows the way the live path would have run it.

        Not when nothing is distrusted (several incidents allowed): its averages then end
        where its training rows end, past incidents skipped as in training. Run over the
        rows as read, a stop among them (never in its training rows) went into a long
        lagged average the refit had chosen, and six hours after a healthy restart a
        healthy bearing temperature read 11 sigma above what the others predicted."""
        assert self.model is not None
        several = self.s.mv_max_incidents > 1
        distrust = self.known() if several else []
        if not distrust and (several or not self.rows.flags()[-self.model.memory_rows() :].any()):
            return  # its state is the stream's, incidents skipped as in its training
        X = self._recent_inputs(np.empty((0, len(self.metrics))))
        if len(X):
            if distrust:
                self._measure()
            self.model.residuals(X, distrust)

    def _fitted(
        self, rows: RowWindow, width: int
    ) -> tuple[VirtualSensorResidual, list[int]] | None:
        """A model of ``rows`` and the indexes of the metrics in it that are counters."""
        if len(rows) < max(50, width * 10):
            return None
        # Retraining replaces the model with one fitted on the latest rows; rows that were
        # inside a raised anomaly are dropped so a fault is not learned as normal. Asked
        # every batch while a long incident holds most rows (its flags first: no copy of
        # the window then).
        keep = ~rows.flags()
        if keep.sum() < len(keep) // 2:
            return None
        X = rows.values()
        counters = _counter_columns(X)
        X = _rates(X, counters, None)
        return self._new_model().fit(X if keep.all() else X[keep]), counters

    def _new_model(self) -> VirtualSensorResidual:
        """An unfitted device model with the device's settings."""
        return VirtualSensorResidual(
            tuple(self.s.mv_spans),
            self.s.mv_smooth_rows,
            holdout=self.s.mv_holdout,
            extrapolation_penalty=self.s.mv_extrapolation_penalty,
            slow_span=self.s.mv_slow_span,
        )

    def _part_near_tie(self, fit: np.ndarray, raw: np.ndarray) -> int:
        """The metric a judgement names: the one whose fault explains the residuals best
        (``fit``: ``VirtualSensorResidual.explained``), unless another explains them
        nearly as well (NEAR_TIE). Then the residuals cannot tell the two apart: on a
        young model of a curved machine each of a pair (a motor's vibration and bearing
        temperature, both on the load's square) is the other's best regressor, their
        leaks are all but parallel, and a 6-sigma vibration left by a stop's work was
        named on the temperature by 0.01 % of the squared sigmas explained. Each is then
        read against a model of the device without the other (fitted on the latest
        NEAR_TIE_ROWS rows kept for training, replayed over its memory and ``raw`` as
        read): the runner-up is named if it is out of line with the rest of the machine
        by NEAR_TIE_MARGIN sigmas more, the vibration at 3.6 sigma against the
        temperature's 0.5. By less, the best stays: a temperature still warming after
        the stop read 2.1-3.4 sigma below a model without the vibration. Not on wider
        devices (NEAR_TIE_MAX_METRICS: a fit each) nor on two metrics (no rest)."""
        j = int(np.argmax(fit))
        rest = fit.copy()
        rest[j] = -1.0
        b = int(np.argmax(rest))
        m = len(self.metrics)
        if rest[b] < NEAR_TIE * fit[j] or not 3 <= m <= NEAR_TIE_MAX_METRICS:
            return j
        keep = ~self.rows.flags()
        if keep.sum() < max(50, m * 10):
            return j
        X = _rates(self.rows.values(), self.counters, None)[keep][-NEAR_TIE_ROWS:]
        inputs = self._recent_inputs(raw)
        apart = []
        for c, partner in ((j, b), (b, j)):
            cols = [q for q in range(m) if q != partner]
            view, _, _ = self._new_model().fit(X[:, cols]).replay(inputs[:, cols])
            assert view.short_z_ is not None
            apart.append(abs(float(view.short_z_[-1][cols.index(c)])))
        return b if apart[1] >= apart[0] + NEAR_TIE_MARGIN else j

    def _take_joining(self) -> None:
        """Train a model of all metrics, the joining ones included, on the rows gathered
        since they joined, and switch to it (between incidents: gates start afresh)."""
        if self.open or self.recovering or any(g.active for g in self.gates):
            return
        fitted = self._fitted(self.next_rows, len(self.metrics) + len(self.joining))
        if fitted is None:
            return
        self.metrics += self.joining
        self.joining = []
        self.rows, self.next_rows = self.next_rows, RowWindow(self.next_rows.maxlen)
        self._use(fitted)
        self.gates, self.quiet_m, self.last_excursion, self.prev_excursion = [], [], [], []
        self.prev_z = self.prev_x = np.zeros((0, 0))

    # A value this many training ranges beyond the range of the model's training rows, and
    # as far from the row before, is a glitch (an error code, 65535, a bad read) ...
    GLITCH_RANGES = 10.0
    # ... unless it stays there longer than this many rows (then it is what is measured).
    GLITCH_ROWS = 3

    def _clean(self, x: np.ndarray, times: list[int]) -> tuple[np.ndarray, list[bool]]:
        """``x`` (rows) with its glitches replaced by the metric's value in the row before, and
        which rows held one; each new glitch goes to ``glitched`` (time, metric, value).

        The model never sees it: one 65535 in a motor's current went into every smoothed
        and lagged input of the model, was blamed on the vibration (the current's own
        leak explained it as well) and kept the device's incident open for hours, so a
        second glitch four hours later went unreported."""
        model = self.model
        assert model is not None
        lo, hi = model.training_range()
        reach = self.GLITCH_RANGES * (hi - lo)
        judged = reach > 0.0
        judged[model.fixed_] = False  # never moved in training: any change is far
        if len(self.glitch_run) != x.shape[1]:
            self.glitch_run = [0] * x.shape[1]
        above, below = hi + reach, lo - reach
        far = judged & ((x > above) | (x < below))
        if not far.any() and not any(self.glitch_run):
            return x, [False] * len(x)
        x = x.copy()
        before = self.prev_x[-1]
        flagged = []
        for k in range(len(x)):
            held = False
            for j in range(x.shape[1]):
                if far[k, j] and (self.glitch_run[j] or abs(x[k, j] - before[j]) > reach[j]):
                    self.glitch_run[j] += 1
                    if self.glitch_run[j] <= self.GLITCH_ROWS:
                        if self.glitch_run[j] == 1:
                            self.glitched.append((times[k], j, float(x[k, j])))
                        x[k, j] = before[j]
                        held = True
                else:
                    self.glitch_run[j] = 0
            flagged.append(held)
            before = x[k]
        return x, flagged

    def add_rows(
        self, rows: list[tuple[int, list[float]]], stuck: Iterable[str] = ()
    ) -> list[Incident]:
        """Score new complete rows in one matrix call and return the new incidents.

        One gate per metric; when a gate opens, the responsible metric is found by
        attribution, so a fault in one metric that leaks into the predictions of another
        is still reported under its own name. While incidents are open, their metrics are
        distrusted (``VirtualSensorResidual.residuals``) from the next call on, and another
        metric clearly out of line opens an incident of its own (``mv_max_incidents``).
        The ``stuck`` metrics (reported by the stuck check) are distrusted too.
        """
        out: list[Incident] = []
        # A row may also hold the joining metrics, after the model's (for the next model).
        wide, width = rows, len(self.metrics)
        rows = [(t, r[:width]) for t, r in rows]
        new_flags: list[bool] = []
        if self.model is not None and rows:
            raw = np.asarray([r for _, r in rows])
            X = _rates(raw, self.counters, self.prev_raw)
            self.prev_raw = raw[-1].tolist()
            m = X.shape[1]
            if self.prev_z.shape != (2, m):
                self.prev_z, self.prev_x = np.zeros((2, m)), X[:1].copy()
                self.prev_t = rows[0][0]
            X, glitched = self._clean(X, [t for t, _ in rows])
            # One incident per device (mv_max_incidents 1): nothing distrusted, as before.
            several = self.s.mv_max_incidents > 1
            self._take_stuck(stuck if several else ())
            distrust = self.known() if several else []
            z_now, z_smooth = self.model.residuals(X, distrust)
            moved = self.model.moved_
            # A spike is one sample out of line with both its neighbours, so each row is
            # judged one row late; a load change moves several rows in a row and is not one.
            Zp = np.vstack([self.prev_z, z_now])
            Xp = np.vstack([self.prev_x, X])
            z_inst, x_inst = Zp[1:-1], Xp[:-1]
            beside = np.maximum(np.abs(Zp[:-2]), np.abs(Zp[2:]))
            iso = np.where(beside < 0.5 * np.abs(z_inst), np.abs(z_inst), 0.0)
            self.prev_z, self.prev_x = Zp[-2:], Xp[-1:]
            t_inst = [self.prev_t] + [t for t, _ in rows[:-1]]  # the times of x_inst's rows
            self.prev_t = rows[-1][0]
            inst_w = self.s.mv_on / self.s.mv_spike_sigma
            a_inst = iso * inst_w
            a_smooth = np.abs(z_smooth)
            A = np.maximum(a_inst, a_smooth)
            # Against a further incident's bar, in the spread of residuals made with the
            # distrusted metrics' virtual values (measured when first distrusted).
            wide_fast, wide_smooth = self.model.distrust_spread(distrust)
            A_far = np.maximum(a_inst / wide_fast, a_smooth / wide_smooth)
            if len(self.last_excursion) != m:
                self.last_excursion = [-(10**9)] * m
            if len(self.prev_excursion) != m:
                self.prev_excursion = [-(10**9)] * m
            # Repeated spikes: two excursions of the same metric close together are as
            # unlikely in normal operation as one much larger excursion; three, as one
            # that reaches a further incident's bar.
            for k, j in zip(*np.nonzero(iso >= self.s.mv_pair_sigma), strict=True):
                row = self.n_rows + int(k)
                if row - self.last_excursion[j] <= self.s.mv_pair_rows:
                    A[k, j] = max(A[k, j], self.s.mv_on)
                    a_inst[k, j] = max(a_inst[k, j], self.s.mv_on)
                    if row - self.prev_excursion[j] <= self.s.mv_pair_rows:
                        A_far[k, j] = max(A_far[k, j], self.s.mv_on, self.s.mv_second_on)
                self.prev_excursion[j] = self.last_excursion[j]
                self.last_excursion[j] = row
            if len(self.gates) != m:
                self.gates = [
                    Hysteresis(self.s.mv_on, self.s.mv_off, self.s.mv_min_on_rows) for _ in range(m)
                ]
                self.quiet_m = [0] * m
            resynced = False
            lo, hi = self.model.training_range()
            # Below this a reading is a stop; none for a metric that never moved in training.
            far = np.where(hi > lo, lo - self.STOP_RANGES * (hi - lo), -np.inf)
            reach = self._reach(X, lo, hi)
            if len(self.reach_rows) != m:
                self.reach_rows = [-(10**9)] * m
            for k, (t, _) in enumerate(rows):
                if reach is not None:
                    for q in np.flatnonzero(reach[k]):
                        self.reach_rows[q] = self.n_rows
                rising, went_off = [], []
                for j in range(m):
                    was = self.gates[j].active
                    active, edge = self.gates[j].update(float(A[k, j]))
                    if was and not active:
                        self.quiet_m[j] = self.s.mv_quiet_rows
                        went_off.append(j)
                    elif self.quiet_m[j] > 0:
                        # Counted on while the gate is on too: one that comes on in a quiet
                        # period and stays on is no flap, and is judged when it ends (it
                        # was never reported: a vibration shifted in a restart's aftermath).
                        self.quiet_m[j] -= 1
                    if edge:
                        rising.append(j)
                letting_go = list(self.recovering)
                released = self._recover()
                before = self.known()
                if released and not before and several:
                    self.judged_back = self.judged_out = False
                    self._open_found(self._let_go(k, t, raw, X, out, letting_go), raw, out)
                    before = self.known()
                    resynced = True
                if resynced or self.after_window or (self.rearm_rows and self.rearm_back is None):
                    # Scored on the stream state before it was made again; or in the
                    # aftermath of a window's restart, which the judgement at its end reads
                    # over on a replay: on the live stream a curved pump's current, its
                    # lines fed inputs still holding the stop, opened a second incident ten
                    # minutes after a healthy restart; or after that judgement, while the
                    # stop's incident it left open is judged hourly on replays.
                    rising = []
                elif before:
                    # Another metric's gate going off is the open incident's spread unless
                    # it is clearly out of line with the incident's metrics distrusted.
                    rising = self._beyond(A_far[k]) if len(before) < self.s.mv_max_incidents else []
                else:
                    # A gate that opened under the second bar while an incident's metrics
                    # were still distrusted has had no rising edge since: it is one once
                    # nothing is distrusted and it reads past the bar (not only at the row
                    # the last quiet period ended: a current shifted during a restart's
                    # aftermath stayed unreported for a day).
                    rising += [
                        j
                        for j, g in enumerate(self.gates)
                        if j not in rising
                        and g.active
                        and A[k, j] >= self.s.mv_on
                        and self.quiet_m[j] == 0
                    ]
                if rising:
                    spike = a_inst[k].max() > a_smooth[k].max()
                    z = z_inst[k] if spike else z_smooth[k]
                    # A fault's onset, not a spike's, moves the expected values with it.
                    led = [] if spike or moved is None else self.model.led_by_others(moved[k])
                    if before:
                        others = [q for q in range(m) if q not in before]
                        j = self.model.attribute(
                            np.where(np.isin(range(m), before), 0.0, z),
                            smooth=not spike,
                            among=others,
                            distrust=before,
                            led=led,
                        )
                        score = float(A[k, j])
                        found = j in rising
                    else:
                        j = self.model.attribute(z, smooth=not spike, led=led)
                        score = float(A[k].max())
                        found = self.quiet_m[j] == 0 and (spike or not self._beyond_reach(j))
                    if found:
                        ended = [q for q in before if q in self.recovering]
                        self.open.add(j)
                        self.judged_out = True
                        # A spike is reported at the time of the row it is in.
                        if spike:
                            out.append(
                                Incident(t_inst[k], score, j, z, x_inst[k], False, before, ended)
                            )
                        else:
                            expected = self.model.expected_
                            assert expected is not None
                            out.append(
                                Incident(
                                    t,
                                    score,
                                    j,
                                    z,
                                    X[k],
                                    True,
                                    before,
                                    ended,
                                    expected[k],
                                    tuple(led),
                                )
                            )
                        if several:
                            self._stand_in(raw)
                back = went_off + self._in_range_again(X[k], lo, far) if several else []
                if back and not self.rearm_rows and not self.judged_back:
                    self._back_in_line(back, t)
                if self.rearm_rows:
                    self.rearm_rows -= 1
                    if not self.rearm_rows:
                        window = self.rearm_back is None
                        again = self._judge_again(k, t, raw, X, out)
                        if not again and self.open:
                            # Judged, and still open: judged again an hour on like any
                            # judged incident. Left unjudged, a stop's incident the
                            # replay read over stayed open on the live stream's stand-ins,
                            # and a fault hours later went unreported under it.
                            self.judged_back = True
                            # After a window, nothing new opens on the live stream until
                            # then: its stand-ins for the stop's metrics, predicted from
                            # the others by a curved pump's young model, read the fluid
                            # temperature 51 sigma below at the row the replay read it
                            # 0.4 (a healthy restart). The hourly replay judges meanwhile.
                            self.after_window = window and several
                        self._open_found(again, raw, out)
                        self.rejudge_rows = REJUDGE_ROWS
                elif several and self.open and self.judged_back and not resynced:
                    self.rejudge_rows -= 1
                    if self.rejudge_rows <= 0:
                        self.rejudge_rows = REJUDGE_ROWS
                        over = self._rejudge(k, t, raw, X, out)
                        if over is not None:
                            self.open.clear()
                            self.after_window = False
                            self._open_found(over, raw, out)
                            resynced = True
                elif several and self.recovering and self.judged_back and not resynced:
                    # The quiet period after a judged incident (a stop's) is judged hourly
                    # on a replay too: a stop's own metric shifted after its incident
                    # closed (a motor's vibration, 4 hours after an unplanned stop's
                    # restart) was found only when it ended, 2 hours on.
                    self.rejudge_rows -= 1
                    if self.rejudge_rows <= 0:
                        self.rejudge_rows = REJUDGE_ROWS
                        view, zs, rest = self._replay_to(k, raw)
                        news = self._judge_again(k, t, raw, X, out, [], (view, zs))
                        if news:
                            # The replay read the quiet metrics' aftermath over: let go,
                            # and the stream made again of the readings.
                            for j in self.recovering:
                                self.quiet_m[j] = 0
                            self.recovering.clear()
                            self._adopt_replay(view, rest)
                            self._open_found(news, raw, out)
                            resynced = True
                if self.open and all(not g.active for g in self.gates):
                    # A judgement pending since a restart stays: its aftermath is not over,
                    # and a fault that begins in it (a vibration 4 hours after an unplanned
                    # stop's restart, as the stop's incident closed) is found by that
                    # judgement, not when the metrics are let go hours later. A judged
                    # incident stays judged through its quiet period (judged hourly, above).
                    if not several:
                        self.judged_back = self.judged_out = False
                    # The incident is over, but the lagged inputs of the slow model still
                    # remember the faulty values for a couple of lag spans: whatever the
                    # other metrics' residuals do meanwhile is its aftermath, not news ...
                    after = self.aftermath(self.s.mv_quiet_rows)
                    if several:
                        # ... unless they are clearly out of line with its metrics still
                        # distrusted (what the lagged inputs hold is their stand-ins').
                        for j in self.open:
                            self.recovering[j] = after
                            self.quiet_m[j] = max(self.quiet_m[j], after)
                    else:
                        self.quiet_m = [max(q, after) for q in self.quiet_m]
                    self.open.clear()
                    self.after_window = False
                    self.rejudge_rows = REJUDGE_ROWS
                self.n_rows += 1
                new_flags.append(any(g.active for g in self.gates) or glitched[k])
        else:
            new_flags = [False] * len(rows)
        self.rows.extend([r for _, r in rows], new_flags)
        self.since_fit += len(rows)
        if self.joining:
            full = [
                (r, f)
                for (_, r), f in zip(wide, new_flags, strict=True)
                if len(r) == width + len(self.joining)
            ]
            self.next_rows.extend([r for r, _ in full], [f for _, f in full])
            if len(self.next_rows) >= self.s.mv_train_rows:
                self._take_joining()
        need = self.s.mv_retrain_rows if self.model is not None else self.s.mv_train_rows
        if self.since_fit >= need and len(self.rows) >= self.s.mv_train_rows and self._may_fit():
            self._fit()
        return out

    def _may_fit(self) -> bool:
        """Whether a retrain that is due may run now. Not while an incident is open: its
        rows are left out of training, so a retrain learns nothing new, and the stream
        state it is brought to (``_resume``, run over the latest rows with the incident's
        metrics stood in for) read a pump's current, shifted from a restart and reported,
        back in line: the incident closed with the fault under way, and its rows were
        trained on. Nor while the new model's memory still holds an incident's rows (its
        aftermath), unless the retrain is long overdue (RETRAIN_OVERDUE intervals): its
        averages would end before the incident, and retrained as a stop's incident ended,
        a healthy pump's flow read out of line against a fluid temperature still cooler
        than before the stop."""
        if self.model is None:
            return True
        if self.open:
            return False
        recent = bool(self.rows.flags()[-self.model.memory_rows() :].any())
        return not recent or self.since_fit >= RETRAIN_OVERDUE * self.s.mv_retrain_rows

    def aftermath(self, floor: int) -> int:
        """Rows after an incident (or a stop) during which the slow model's lagged inputs
        still remember it: two of its lag spans, at least ``floor``."""
        assert self.model is not None
        return max(floor, 2 * max(self.model.lags_, default=0))

    def _back_in_line(self, went_off: list[int], t: int) -> None:
        """One of an open incident's metrics came back in line while others stay out:
        the device is judged again once the aftermath is over (``_judge_again``), once
        per incident. A stop opens an incident on what fell; at a restart with a fault (a
        bearing damaged in the trip) the faulty metric stays out, and inside the open
        incident it was never reported. A healthy restart's incident may outlast the
        aftermath too (the lagged inputs still hold the stop): what counts then is what
        the last SHORT_ROWS rows say."""
        back = [j for j in went_off if j in self.open and j not in self.stuck]
        if back and any(g.active for q, g in enumerate(self.gates) if q not in self.stuck):
            self.rearm_rows = self.aftermath(REARM_SMOOTHS * self.s.mv_smooth_rows)
            self.rearm_back = (back[0], t)
            self.judged_back = True

    # A reading this many training ranges below its range is a stop (speed, flow ~0).
    STOP_RANGES = 0.5
    # ... and, for a model's reach (``_reach``), this many: a curved pump running at a low
    # load read its flow 0.51 of its range below it, and is judged by the reach.
    REACH_STOP_RANGES = 1.0

    def _reach(self, X: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray | None:
        """Per row of ``X`` and metric, whether it reads beyond the reach of a model of a
        machine on curves, a young one that doubts its lines (CURVE_DOUBT) or one that
        chose squares: outside its training range by more than REACH of it, on a row that
        is no stop (every metric above REACH_STOP_RANGES below its range: stops have
        their own judgement). None for a model of straight lines, which extrapolate as they fit.

        Squares extrapolate better than lines but not well: on ``--curves --hours 72
        --fault-after 40`` fleets, day 2's false anomalies (models with squares) were
        named on the pump's flow too, at loads beyond their training range."""
        assert self.model is not None
        if not self.model.curved(CURVE_DOUBT):
            return None
        span = np.where(hi > lo, hi - lo, np.inf)
        out = (np.maximum(X - hi, 0.0) + np.maximum(lo - X, 0.0)) / span > REACH
        out[np.less(X, lo - self.REACH_STOP_RANGES * span).any(axis=1)] = False  # a stop
        return out

    def beyond_reach(self) -> list[str]:
        """The metrics read beyond the reach of a model of a machine on curves
        (``_reach``) within the residuals' average: while any is, no incident opens."""
        return [
            self.metrics[q]
            for q, r in enumerate(self.reach_rows)
            if self.n_rows - r < self.s.mv_smooth_rows and q < len(self.metrics)
        ]

    def _beyond_reach(self, j: int) -> bool:
        """Whether an offset of metric ``j`` now is one its model cannot judge: another
        metric read beyond its reach (``_reach``) within the residuals' average
        (``mv_smooth_rows``). Its gate stays on, and the offset is reported once the
        loads are back within reach and the average no longer holds them, if it is still
        there.

        Half a day of a machine on curves is half its loads; beyond them the line misses
        the curve by more than the doubt widens its bar, and the residuals lean on the
        metric the others follow (a pump's flow). On ``--curves --seeds 300-302``, 11
        of the 15 first-day false anomalies came at loads more than REACH of the range
        beyond it, and 6 of the 17 faults their young models found."""
        latest = max((r for q, r in enumerate(self.reach_rows) if q != j), default=-(10**9))
        return self.n_rows - latest < self.s.mv_smooth_rows

    def _in_range_again(self, x: np.ndarray, lo: np.ndarray, far: np.ndarray) -> list[int]:
        """The open incident's metrics whose reading ``x`` is back up within the model's
        training range after falling below it: a restart, even while their gates stay on.
        A vibration shifted from an unplanned stop's restart moved the stop's stand-ins for
        the speed and current with it, their gates never went off, and the device was never
        judged again (the shift unreported for a day)."""
        if not self.open and not self.below:
            return []
        back = [j for j in self.below if j in self.open and x[j] >= lo[j]]
        # Below ``far``, a margin under the range: a slow metric cooling past the edge of
        # its range is no stop.
        self.below = {j for j in self.open if j not in back and (j in self.below or x[j] < far[j])}
        return back

    def _let_go(
        self,
        k: int,
        t: int,
        raw: np.ndarray,
        X: np.ndarray,
        new: list[Incident],
        ended: list[int],
    ) -> list[Incident]:
        """The last distrusted metrics' quiet period is over (at row ``k`` of this call's
        rows, ``raw``). Their stand-ins stood in for hours, maybe drifted from the machine,
        and the lagged inputs still hold them: the stream state is made again of the
        readings (a replay of the model's memory and this call's rows; its rows from
        ``k`` on, scored before, open no incident). A fault that began while
        they were distrusted had no rising edge of its own (a current shifted in a
        restart's aftermath went unreported for a day): the device is judged on that
        replay as after a window (``_judge_again``), unless such a judgement is pending.
        One replay serves both: up to row ``k`` for the judgement, then on over this
        call's later rows before it is adopted."""
        view, zs, rest = self._replay_to(k, raw)
        judged = [] if self.rearm_rows else self._judge_again(k, t, raw, X, new, ended, (view, zs))
        self._adopt_replay(view, rest)
        return judged

    def _replay_to(
        self, k: int, raw: np.ndarray
    ) -> tuple[VirtualSensorResidual, np.ndarray, np.ndarray]:
        """A replay of the model's memory and this call's rows (``raw``) up to row ``k``,
        with its smoothed residuals, and the inputs of the call's later rows."""
        assert self.model is not None
        inputs = self._recent_inputs(raw)
        cut = len(inputs) - (len(raw) - k - 1)  # the inputs up to row k
        view, _, zs = self.model.replay(inputs[:cut])
        return view, zs, inputs[cut:]

    def _adopt_replay(self, view: VirtualSensorResidual, rest: np.ndarray) -> None:
        """The stream state made again of the readings: the replay run on over the
        call's later rows (scored before; they open nothing), then adopted."""
        assert self.model is not None
        if len(rest):
            view.residuals(rest)
        self.model.adopt(view)

    def _rejudge(
        self, k: int, t: int, raw: np.ndarray, X: np.ndarray, new: list[Incident]
    ) -> list[Incident] | None:
        """An incident judged again and still open, an hour on: judged on a replay of the
        model's memory (every metric's readings as its inputs) at row ``k``. While its
        metrics are distrusted their stand-ins are predicted from the others, and a fault
        of another metric moves them: the motor's speed, stood in for since a stop, read
        out of line once the vibration shifted, which held the stop's incident open for
        good, and the shift, inside it, was never reported. When the replay reads every
        metric of the incident in line it is over: the stream is made again of the
        readings (as when metrics are let go, ``_let_go``), and the device is judged as
        after a window (one incident if a metric is out of line now). None: still open.

        Still out of line, it is judged as well, unless something was reported in it since
        a judgement last found nothing: a fault on one of its own metrics that began before
        it could close (the motor's vibration, 4 hours after an unplanned stop's restart,
        an hour before its first hourly judgement) held it open to the end, and the
        replay, reading the vibration 53 sigma high over the last minutes, was asked only
        whether it was over."""
        view, zs, rest = self._replay_to(k, raw)
        # In line as its gate would have it: under the off level (the short window's bar,
        # which a report must pass, would let a 6-sigma fault still under way go).
        still_out = any(abs(zs[-1][j]) >= self.s.mv_off for j in self.open)
        if still_out and self.judged_out:
            return None
        judged = self._judge_again(k, t, raw, X, new, [], (view, zs))
        if still_out and not judged:
            return None
        self._adopt_replay(view, rest)
        return judged

    def _open_found(self, found: list[Incident], raw: np.ndarray, out: list[Incident]) -> None:
        """Report what a judgement on a replay found and open it: its gates held on until
        the live stream reads it in line (scored before the replay, a gate that was off
        closed the incident at once, and the fault was found again after its quiet
        period), and the stand-ins taken for a metric newly distrusted."""
        out.extend(found)
        new = {inc.metric for inc in found} - self.open
        self.open |= new
        for inc in found:
            self.gates[inc.metric].hold()
        if new and self.s.mv_max_incidents > 1:
            self._stand_in(raw)

    def _judge_again(
        self,
        k: int,
        t: int,
        raw: np.ndarray,
        X: np.ndarray,
        new: list[Incident],
        ended: list[int] | None = None,
        replayed: tuple[VirtualSensorResidual, np.ndarray] | None = None,
    ) -> list[Incident]:
        """The device judged again at row ``k`` of this call's rows (``raw``, as read),
        once the aftermath of a maintenance window (its own reports were kept as expected)
        or of one of an open incident's metrics coming back in line (``_back_in_line``) is
        over: one incident if a metric is out of line *now*, its last SHORT_ROWS rows
        alone past the short window's bar (the long window's 30-minute average still holds
        the stop's aftermath), named by the metric whose offset, settled since the restart
        through the lagged inputs, explains those rows' residuals best (the stop's incident
        is named on what stopped first, not on what the work left wrong).

        Judged on a replay of the model's memory with every metric's readings as its
        inputs (``VirtualSensorResidual.replay``), not on the live stream: there the
        stop's metrics are still distrusted, their stand-ins predicted from one another
        for hours, and stand-ins that had drifted from the machine made a healthy restart
        read "bearing_temp_c 80.8 sigma below ... (47.87, expected 61.09)". Read from the
        readings, a stop is what the lagged inputs model (the slow metrics cool as the
        load's average falls) and its aftermath is over. ``ended``: judged as the metrics
        of an incident that ended are let go (``_let_go``), not after a window;
        ``replayed``: that replay up to row ``k`` and its smoothed residuals, made there."""
        model = self.model
        assert model is not None
        back = None
        if ended is None:
            back, self.rearm_back = self.rearm_back, None
        if replayed is None:
            view, _, zs = model.replay(self._recent_inputs(raw[: k + 1]))
        else:
            view, zs = replayed
        assert view.short_z_ is not None and view.expected_ is not None
        short, now = view.short_z_[-1], zs[-1]
        out = [int(q) for q in np.flatnonzero(np.abs(short) >= SHORT_BAR * self.s.mv_on)]
        if not out:
            self.judged_out = False
            return []
        # Named among the metrics out of line: a name under the bar reads as a fault the
        # sentence's own figure denies ("vibration_mm_s 0.1 sigma above ...").
        # Each leak read against the bar the residuals were judged on (a young model's
        # doubt widens it). Not at a rising edge on the live stream: tried, it named
        # worse there (docs/detection.md, *Their stops, named*).
        fit = view.explained(
            short, smooth=True, among=out, settled=True, short=True, **view.bar(-1)
        )
        j = self._part_near_tie(fit, raw[: k + 1])
        if any(inc.metric == j and inc.time_ns == t for inc in new):
            return []
        # One of the stop's own metrics too: the replay reads it as it reads now, not as
        # it fell (a vibration that stopped, then came back 6 sigma high). Reported, the
        # incident is not judged again when one of its metrics comes back in line (a
        # shifted current's gate flapping after a window was reported twice).
        self.judged_back = self.judged_out = True
        return [
            Incident(
                t,
                float(abs(now[j])),
                j,
                short,
                X[k],
                True,
                [q for q in self.known() if q != j and abs(now[q]) >= self.s.mv_on],
                [q for q in ended or () if q != j],
                view.expected_[-1],
                after_maintenance=ended is None and back is None,
                back_in_line=back,
            )
        ]

    def too_wide(self, max_metrics: int) -> bool:
        """Whether the device has more metrics than a device model may take, and none yet
        (a model trained before the limit was lowered is kept)."""
        return self.model is None and len(self.metrics) > max_metrics

    def known(self) -> list[int]:
        """The metrics known to be wrong: the open incidents', the stuck ones and those
        whose incident ended within its quiet period."""
        return sorted(self.open | self.stuck | self.recovering.keys())

    def _recover(self) -> bool:
        """Count one row of the recovering metrics' quiet periods; whether the last of them
        ended (a metric back under an open incident leaves them at once)."""
        if not self.recovering:
            return False
        for j in list(self.recovering):
            if j in self.open or self.recovering[j] <= 1:
                del self.recovering[j]
            else:
                self.recovering[j] -= 1
        return not self.recovering

    def _take_stuck(self, names: Iterable[str]) -> None:
        """Distrust the metrics reported stuck, their recent past included (a stuck
        sensor's value has been wrong since its run began). One that moves again joins the
        open incidents unreported, so it stays distrusted until every gate is off, and the
        quiet period after an incident follows: its readings jump back from where its
        stand-in was, and the lagged inputs still hold the stand-in's values."""
        now = {self.metrics.index(n) for n in names if n in self.metrics}
        self.open |= self.stuck - now
        grew = bool(now - self.stuck)
        self.stuck = now
        if grew:
            self._stand_in(np.empty((0, len(self.metrics))))

    def _beyond(self, a: np.ndarray) -> list[int]:
        """The metrics not known to be wrong whose residual (with those distrusted)
        reaches the bar of a further incident."""
        bar = max(self.s.mv_on, self.s.mv_second_on)
        known = self.known()
        return [
            j
            for j, g in enumerate(self.gates)
            if j not in known and g.active and a[j] >= bar and self.quiet_m[j] == 0
        ]

    def _stand_in(self, raw: np.ndarray) -> None:
        """Rewrite the model's inputs of the metrics known to be wrong over their recent
        past (the kept rows and this call's up to now, ``raw``) with their virtual values:
        the faulty readings before the incident opened are still in the lagged averages."""
        assert self.model is not None
        self._measure()
        X = self._recent_inputs(raw)
        if len(X):
            self.model.stand_in(X, self.known())

    def _measure(self) -> None:
        """Have the model measure how its residuals spread with each newly distrusted
        metric's virtual value standing in, on the latest kept rows outside incidents."""
        assert self.model is not None
        if not self.model.unmeasured(self.known()):
            return  # no copy of the latest rows for a metric measured before
        k = 2 * DISTRUST_PROBE_ROWS
        healthy = ~self.rows.flags()[-k:]
        self.model.measure_distrust(self._inputs(self.rows.latest(k)[healthy]), self.known())

    def _recent_inputs(self, raw: np.ndarray) -> np.ndarray:
        """The model's inputs over its memory (``memory_rows``): the kept rows, then
        ``raw`` (this call's rows up to now, as read)."""
        assert self.model is not None
        back = self.rows.latest(self.model.memory_rows())
        return self._inputs(np.vstack([back, raw]) if len(back) else raw)

    def _inputs(self, rows: np.ndarray) -> np.ndarray:
        """The model's inputs made of kept ``rows``: counters as rates, and a glitch
        (65535, an error code), which the live path holds (``_clean``), cut to the glitch
        bar, so it does not swamp the averages."""
        assert self.model is not None
        X = _rates(rows, self.counters, None)
        lo, hi = self.model.training_range()
        reach = self.GLITCH_RANGES * (hi - lo)
        return np.clip(X, lo - reach, hi + reach)

    def decimate(
        self, rows: list[tuple[int, list[float]]], resolution_s: float
    ) -> list[tuple[int, list[float]]]:
        """The model's rows: one per ``resolution_s`` of time, the mean of the rows in it
        with its last row's time, passed on once the next row falls (or, for the batch's
        last, would fall at the usual gap, ``row_gap_ns``) in a later interval: rows 10 s
        apart pass as they are, at once; 0: every row."""
        if resolution_s <= 0.0:
            return rows
        res = int(resolution_s * 1e9)
        out: list[tuple[int, list[float]]] = []
        for i, (t, vals) in enumerate(rows):
            k = t // res
            b = self.bucket
            if b is not None and (k != b[0] or len(vals) != len(b[1])):
                out.append(self._emit())
                b = None
            if b is None:
                self.bucket = [k, list(vals), 1, t]
            else:
                b[1] = [a + v for a, v in zip(b[1], vals, strict=True)]
                b[2] += 1
                b[3] = t
            gap = self.row_gap_ns
            if i == len(rows) - 1 and gap > 0 and (t + gap) // res != k:
                out.append(self._emit())
        return out

    def _emit(self) -> tuple[int, list[float]]:
        assert self.bucket is not None
        _, total, n, t = self.bucket
        self.bucket = None
        return t, [v / n for v in total]

    def state_dict(self) -> dict[str, Any]:
        return {
            "metrics": self.metrics,
            "last": self.last,
            "bucket": self.bucket,
            **self.rows.state_dict("rows"),
            "model": None if self.model is None else self.model.state_dict(),
            "gates": [g.state_dict() for g in self.gates],
            "quiet": self.quiet_m,
            "open": sorted(self.open),
            "stuck": sorted(self.stuck),
            "recovering": [[j, n] for j, n in sorted(self.recovering.items())],
            "since_fit": self.since_fit,
            "last_excursion": self.last_excursion,
            "prev_excursion": self.prev_excursion,
            "prev_z": self.prev_z.tolist(),
            "prev_x": self.prev_x.tolist(),
            "prev_t": self.prev_t,
            "n_rows": self.n_rows,
            "row_no": self.row_no,
            "held": [[r, asdict(a)] for r, a in self.held],
            "stirred": [list(x) for x in self.stirred],
            "last_row_ns": self.last_row_ns,
            "row_gap_ns": self.row_gap_ns,
            "heard": {m: list(v) for m, v in self.heard.items()},
            "usual_gap": self.usual_gap,
            "silent": sorted(self.silent),
            "joining": self.joining,
            "counters": self.counters,
            "glitch_run": self.glitch_run,
            "prev_raw": self.prev_raw,
            "rearm_rows": self.rearm_rows,
            "rearm_back": None if self.rearm_back is None else list(self.rearm_back),
            "judged_back": self.judged_back,
            "after_window": self.after_window,
            "judged_out": self.judged_out,
            "below": sorted(self.below),
            "rejudge_rows": self.rejudge_rows,
            "reach_rows": self.reach_rows,
            **{f"next_{k}": v for k, v in self.next_rows.state_dict("next").items()},
        }

    def load_state(self, st: dict[str, Any]) -> None:
        self.metrics, self.last = list(st["metrics"]), dict(st["last"])
        self.rows.load_state(st["rows"], st["flags"])
        if st["model"] is not None:
            self.model = VirtualSensorResidual()
            self.model.load_state(st["model"])
        self.gates = []
        for g in st["gates"]:
            gate = Hysteresis(1.0)
            gate.load_state(g)
            self.gates.append(gate)
        self.quiet_m = [int(q) for q in st["quiet"]]
        self.open = {int(j) for j in st["open"]}
        self.stuck = {int(j) for j in st.get("stuck", ())}
        self.recovering = {int(j): int(n) for j, n in st.get("recovering", ())}
        self.since_fit = int(st["since_fit"])
        self.last_excursion = [int(v) for v in st["last_excursion"]]
        self.prev_excursion = [int(v) for v in st.get("prev_excursion", ())]
        self.prev_z = np.asarray(st["prev_z"], dtype=float).reshape(-1, len(self.metrics))
        self.prev_x = np.asarray(st["prev_x"], dtype=float).reshape(-1, len(self.metrics))
        # Saved before it was kept: the last row's time, once rows were scored.
        self.prev_t = int(st.get("prev_t", st.get("last_row_ns", 0) if self.prev_x.size else 0))
        self.n_rows = int(st["n_rows"])
        self.row_no = int(st.get("row_no", 0))
        self.held = [(int(r), _anomaly(a)) for r, a in st.get("held", ())]
        self.stirred = deque((int(r), str(m)) for r, m in st.get("stirred", ()))
        self.last_row_ns = int(st.get("last_row_ns", 0))
        self.row_gap_ns = int(st.get("row_gap_ns", 0))
        self.heard = {m: (int(r), int(t)) for m, (r, t) in st.get("heard", {}).items()}
        self.usual_gap = {m: float(g) for m, g in st.get("usual_gap", {}).items()}
        self.silent = set(st.get("silent", ()))
        self.joining = list(st.get("joining", ()))
        self.counters = [int(j) for j in st.get("counters", ())]
        self.glitch_run = [int(n) for n in st.get("glitch_run", ())]
        self.rearm_rows = int(st.get("rearm_rows", 0))
        back = st.get("rearm_back")
        self.rearm_back = None if back is None else (int(back[0]), int(back[1]))
        self.judged_back = bool(st.get("judged_back", False))
        self.after_window = bool(st.get("after_window", False))
        # Saved before it was kept: a judged incident is taken as reported (not again).
        self.judged_out = bool(st.get("judged_out", self.judged_back))
        self.rejudge_rows = int(st.get("rejudge_rows", REJUDGE_ROWS))
        self.reach_rows = [int(r) for r in st.get("reach_rows", ())]
        self.below = {int(j) for j in st.get("below", ())}
        # Saved before it was kept: the last row kept is the last row scored.
        prev = st.get(
            "prev_raw", self.rows.last() if self.model is not None and self.rows else None
        )
        self.prev_raw = None if prev is None else [float(v) for v in prev]
        if "next_rows" in st:
            self.next_rows.load_state(st["next_rows"], st["next_flags"])
        b = st.get("bucket")
        self.bucket = (
            None if b is None else [int(b[0]), [float(v) for v in b[1]], int(b[2]), int(b[3])]
        )

    def settle(
        self, time_ns: int, row: list[Anomaly], stirred: list[str], hold: int
    ) -> list[Anomaly]:
        """Take one row's anomalies and the metrics that reached their alert level in it;
        return what is due: other anomalies at once, per-metric ones ``hold`` rows later
        unless another metric stirred within ``hold`` rows of them (a load change)."""
        if self.last_row_ns and time_ns > self.last_row_ns:
            self.row_gap_ns = time_ns - self.last_row_ns
        self.last_row_ns = time_ns
        now = self.row_no
        self.row_no += 1
        self.stirred.extend((now, m) for m in stirred)
        while self.stirred and self.stirred[0][0] < now - 2 * hold:
            self.stirred.popleft()
        out = [a for a in row if not a.detector.startswith("ensemble")]
        self.held.extend((now, a) for a in row if a.detector.startswith("ensemble"))
        due = [(r, a) for r, a in self.held if r + hold <= now]
        if due:
            self.held = [(r, a) for r, a in self.held if r + hold > now]
        out.extend(a for r, a in due if not self._load_change(r, a, hold))
        return out

    def hear(self, metric: str, time_ns: int) -> None:
        """A reading of ``metric`` in the row being gathered."""
        last = self.heard.get(metric)
        if last is not None and self.row_no > last[0]:
            gap = float(self.row_no - last[0])
            old = self.usual_gap.get(metric)
            self.usual_gap[metric] = gap if old is None else 0.9 * old + 0.1 * gap
        self.heard[metric] = (self.row_no, time_ns)
        self.silent.discard(metric)

    def gone_silent(self, after_rows: int) -> list[str]:
        """The device's metrics that have just gone silent while the others report: no
        reading for ``after_rows`` rows and five times their usual gap (known once they
        have reported twice)."""
        new: list[str] = []
        if not after_rows:
            return new
        for m in self.metrics + self.joining:
            last, gap = self.heard.get(m), self.usual_gap.get(m)
            if last is not None and gap is not None and m not in self.silent:
                bar = max(after_rows, 5.0 * gap)
                if self.row_no - last[0] > bar:
                    self.silent.add(m)
                    new.append(m)
        return new

    def _load_change(self, row_no: int, a: Anomaly, hold: int) -> bool:
        return any(m != a.metric and abs(r - row_no) <= hold for r, m in self.stirred)

    def _gone_quiet(self, now_ns: int, hold: int) -> bool:
        """Whether ``now_ns`` is more than ``hold`` + 1 row gaps past the last row."""
        return bool(self.row_gap_ns) and now_ns - self.last_row_ns > (hold + 1) * self.row_gap_ns

    def release(self, hold: int, now_ns: int | None = None) -> list[Anomaly]:
        """The held alarms of a device that has gone silent, without waiting for rows that
        may never come: once ``now_ns`` (the fleet's clock) is ``hold`` + 1 of its row
        gaps past its last row, or at once without ``now_ns`` (the end of a replay). A load
        change seen so far still drops an alarm."""
        if not self.held or (now_ns is not None and not self._gone_quiet(now_ns, hold)):
            return []
        out = [a for r, a in self.held if not self._load_change(r, a, hold)]
        self.held = []
        return out


class DetectionEngine:
    """Detection state for every device the ingest pipeline has seen.

    ``observe(batch)`` is called once per written batch; readings of one device and metric
    are processed in time order. It returns the anomalies raised by this batch (rising
    edges only: a condition that persists is reported once). ``save(dir)``/``load(dir)``
    (or ``state_dict()``/``load_state()``) carry all state across restarts.

    ``rules`` (:mod:`.rules`) adjust the settings per device kind, device and metric;
    ``kind_of(device)`` answers a device's machine kind (the registry's), asked only when a
    rule matches on kind. The configured settings always win over saved ones: after a
    restart with changed settings, a per-metric detector whose settings changed starts
    learning afresh, and a device model refits from the rows it kept.
    """

    KIND_RECHECK_S = 60.0  # an unknown kind is asked again after this long

    def __init__(
        self,
        settings: EngineSettings | None = None,
        rules: Iterable[Rule] = (),
        kind_of: Callable[[str], str | None] | None = None,
        partition: tuple[int, int] = (0, 1),
    ) -> None:
        self.settings = settings or EngineSettings()
        # (k, n): this engine keeps and saves the devices of partition k of n (the others'
        # files in the same state directory belong to other processes; detection.processes).
        self.partition = partition
        self.rules = tuple(rules)
        self.kind_of = kind_of if any(r.kind is not None for r in self.rules) else None
        self.kinds: dict[str, str] = {}
        self._kind_asked: dict[str, float] = {}
        self._resolved: dict[tuple[str, str | None], tuple[EngineSettings, bool]] = {}
        self.metrics: dict[tuple[str, str], StreamingEnsemble] = {}
        self.stuck: dict[tuple[str, str], StuckSensor] = {}
        self.spikes: dict[tuple[str, str], SpikeBurst] = {}
        self.devices: dict[str, DeviceModel] = {}
        self.sites: dict[str, str] = {}
        self.readings_seen = 0
        self.restarted = 0  # per-metric detectors rebuilt because their settings changed
        # A device whose detectors raise loses its batch, not the fleet's: its readings are
        # counted here and its last error is shown by ``describe`` until a batch succeeds.
        self.failed_readings = 0
        self.errors: dict[str, str] = {}
        self.holding: set[str] = set()  # devices with alarms held for a load-change check
        self.said_too_wide: set[str] = set()  # devices over mv_max_metrics, said in the log
        self._dirty: set[str] = set()  # devices changed since the last save
        self._rows_files: dict[str, set[str]] = {}  # per device, the rows files saved
        self.unreadable_devices = 0  # device state files a restore had to put aside

    # --- settings per device and metric ------------------------------------------------
    def settings_for(self, device: str, metric: str | None = None) -> tuple[EngineSettings, bool]:
        """The settings for a device (or one of its metrics) and whether it is watched."""
        if not self.rules:
            return self.settings, True
        key = (device, metric)
        found = self._resolved.get(key)
        if found is None:
            kind = self.kinds.get(device)
            found = self._resolved[key] = resolve(self.settings, self.rules, device, kind, metric)
        return found

    def _ask_kind(self, device: str) -> bool:
        """Look up a device's kind when rules need it; True if it was newly learned."""
        if self.kind_of is None or device in self.kinds:
            return False
        now = time.monotonic()
        if now - self._kind_asked.get(device, -math.inf) < self.KIND_RECHECK_S:
            return False
        self._kind_asked[device] = now
        try:
            kind = self.kind_of(device)
        except Exception:  # an unavailable registry must not stop detection
            log.warning("could not look up the kind of device %s", device, exc_info=True)
            return False
        if kind is None:
            return False
        self.kinds[device] = kind
        return True

    def _reconcile(self, device: str) -> None:
        """Bring one device's detectors in line with the settings that now apply to it."""
        self._resolved = {k: v for k, v in self._resolved.items() if k[0] != device}
        for key in [k for k in self.metrics if k[0] == device]:
            ms, on = self.settings_for(*key)
            if not on:
                del self.metrics[key]
            elif not _adopt(self.metrics[key], _ensemble_params(ms)):
                self.metrics[key] = StreamingEnsemble(warmup=ms.warmup, **ms.streaming)
                self.restarted += 1
        for key in [k for k in self.stuck if k[0] == device]:
            ms, on = self.settings_for(*key)
            if on:
                self.stuck[key].min_run = ms.stuck_min_run
                self.stuck[key].learn_for = ms.stuck_learn_readings
            else:
                del self.stuck[key]
        for key in [k for k in self.spikes if k[0] == device]:
            ms, on = self.settings_for(*key)
            if on:
                _spike_settings(self.spikes[key], ms)
            else:
                del self.spikes[key]
        dev = self.devices.get(device)
        if dev is not None:
            s, on = self.settings_for(device)
            dev.apply_settings(s)
            if on and s.multivariate:
                self._retire(device, dev, s)  # states saved while they were kept

    def describe(self, device: str, kind: str | None, metrics: Iterable[str]) -> dict[str, Any]:
        """What detection does for one device: the rules that match it (by index), the
        settings in force and how far each detector has come. Safe to call from another
        thread than the one that runs ``observe`` (it only reads, from copies)."""
        s, on = resolve(self.settings, self.rules, device, kind)
        dev = self.devices.get(device)
        dev_metrics = list(dev.metrics) if dev is not None else []
        trained = dev is not None and dev.model is not None
        known = set(metrics) | set(dev_metrics) | {m for d, m in list(self.metrics) if d == device}
        out: dict[str, Any] = {}
        for m in sorted(known):
            ms, m_on = resolve(self.settings, self.rules, device, kind, m)
            det = self.metrics.get((device, m))
            learned = det.n if det is not None else 0
            if not m_on:
                state = "off"
            elif (
                trained
                and m in dev_metrics
                and not ms.streaming_when_multivariate
                and not (dev is not None and dev.paused)  # a silent metric: per metric
            ):
                state = "device model"
            else:
                state = "learning" if learned < ms.warmup else "watching"
            out[m] = {
                "state": state,
                "rules": [
                    i for i, r in enumerate(self.rules) if r.metric and r.matches(device, kind, m)
                ],
                "warmup": ms.warmup,
                "readings_learned": learned,
                "streaming_alarms": ms.streaming_alarms,
                "streaming": dict(ms.streaming),
                "spikes": _spike_summary(self.spikes.get((device, m)), ms),
            }
        return {
            "device": device,
            "kind": kind,
            "enabled": on,
            "error": self.errors.get(device),
            "rules": [
                i
                for i, r in enumerate(self.rules)
                if not r.metric and r.matches(device, kind, None)
            ],
            "device_model": {
                "enabled": on and s.multivariate,
                "trained": trained,
                "metrics": dev_metrics,
                # Heard after the model was trained: in the model once it has been
                # trained on rows with them (mv_train_rows of them).
                "joining": list(dev.joining) if dev is not None else [],
                "rows": len(dev.rows) if dev is not None else 0,
                "train_rows": s.mv_train_rows,
                "mv_on": s.mv_on,
                "mv_off": s.mv_off,
                # Metrics whose incident is open, and those (stuck ones too) not used as
                # inputs meanwhile: their virtual values stand in.
                "open_incidents": (
                    [dev.metrics[j] for j in sorted(dev.open)] if dev is not None else []
                ),
                "distrusted": (
                    [dev.metrics[j] for j in dev.known()]
                    if dev is not None and s.mv_max_incidents > 1
                    else []
                ),
                # Metrics whose residual is out of line now (their gate on), in an open
                # incident or not: an incident's metric back in line is not among them.
                "out_of_line": (
                    [dev.metrics[j] for j, g in enumerate(dev.gates) if g.active]
                    if dev is not None and len(dev.gates) == len(dev.metrics)
                    else []
                ),
                # Metrics read beyond the loads a model of a machine on curves saw, within
                # its averaging window: it opens no incident meanwhile.
                "beyond_reach": dev.beyond_reach() if dev is not None else [],
                "max_incidents": s.mv_max_incidents,
                # more metrics than a device model takes: each is watched on its own
                "max_metrics": s.mv_max_metrics,
                "too_wide": dev is not None and dev.too_wide(s.mv_max_metrics),
            },
            "metrics": out,
        }

    def relearn(self, device: str) -> dict[str, int]:
        """Forget what normal looked like for ``device``: its per-metric detectors, stuck
        detectors and device model start learning again from the next reading.

        For a machine that now runs at a new normal (after a repair, a new tool, a changed
        recipe), which the detectors would otherwise keep flagging. Never beside
        ``observe``: ``AnomalySink.relearn`` holds the lock that scoring runs under."""
        metric_keys = [k for k in self.metrics if k[0] == device]
        for key in metric_keys:
            del self.metrics[key]
        for key in [k for k in self.stuck if k[0] == device]:
            del self.stuck[key]
        for key in [k for k in self.spikes if k[0] == device]:
            del self.spikes[key]
        had_model = self.devices.pop(device, None) is not None
        self._dirty.add(device)
        return {"metric_detectors": len(metric_keys), "device_model": int(had_model)}

    def rearm(self, device: str) -> dict[str, int]:
        """After a maintenance window (``millstream_cloud.maintenance``): what was found
        in it (kept as expected, not alerted) and is still wrong is reported again. A stuck
        sensor at its next reading if it is still stuck (left unplugged after the work); a
        device model with an incident still open is judged again once the stop's aftermath
        is over (``DeviceModel.aftermath``: two lag spans, at least REARM_SMOOTHS smoothing
        windows) after the window ended (``DeviceModel._judge_again``: did the machine come
        back out of line?): not at once, as the stop's own incident outlasts the restart,
        and reported at the window's end it was a false alarm after every window that
        closed with the restart (a /tmp probe of simulated stops).
        Never beside ``observe`` (the sink holds the lock scoring runs under)."""
        n = 0
        for (d, _m), det in self.stuck.items():
            if d == device and det.raised:
                det.raised = False
                n += 1
        dev = self.devices.get(device)
        still_open = len(dev.open) if dev is not None and dev.model is not None else 0
        if dev is not None and still_open:
            smooth = self.settings_for(device)[0].mv_smooth_rows
            dev.rearm_rows = dev.aftermath(REARM_SMOOTHS * smooth)
            dev.rearm_back = None
        if n or still_open:
            self._dirty.add(device)
        return {"stuck": n, "device_model": still_open}

    def out_of_line(self) -> list[tuple[str, str]]:
        """(device, metric) the detectors hold out of line now, each reported once: a
        device model's open incidents' metrics while their gate is on (one back in line
        while another metric keeps the incident open is let go), and sensors reported stuck
        and still stuck. An anomaly alert on one stays firing (``AlertEngine.held``), as a
        threshold alert does while its condition holds."""
        out = [key for key, det in self.stuck.items() if det.raised]
        for device, dev in self.devices.items():
            out += [
                (device, dev.metrics[j])
                for j in sorted(dev.open)
                if j < min(len(dev.metrics), len(dev.gates)) and dev.gates[j].active
            ]
        return out

    def _detector(self, device: str, metric: str) -> StreamingEnsemble:
        key = (device, metric)
        det = self.metrics.get(key)
        if det is None:
            ms = self.settings_for(device, metric)[0]
            det = StreamingEnsemble(warmup=ms.warmup, **ms.streaming)
            self.metrics[key] = det
        return det

    def observe(self, readings: Sequence[Reading], now_ns: int | None = None) -> list[Anomaly]:
        """Score a batch; the anomalies found. ``now_ns``: the latest time of the whole batch
        when this engine is handed only its partition's part of it (held alarms are released
        by the batch's time, as one engine given the whole batch would)."""
        anomalies: list[Anomaly] = []
        by_device: dict[str, list[Reading]] = {}
        for r in readings:
            if not math.isfinite(r.value):
                continue
            by_device.setdefault(r.device, []).append(r)
        for device, rs in by_device.items():
            rs.sort(key=lambda r: r.time_ns)
            self.sites[device] = rs[-1].site
            try:
                anomalies.extend(self._observe_device(device, rs))
            except Exception as exc:  # one device's fault must not stop the others' detection
                self._failed(device, len(rs), exc)
            else:
                if self.errors.pop(device, None) is not None:
                    log.info("detection on %s works again", device)
            dev = self.devices.get(device)
            if dev is not None and dev.held:
                self.holding.add(device)
        if by_device or now_ns is not None:
            now = max([rs[-1].time_ns for rs in by_device.values()] + [now_ns or 0])
            anomalies.extend(self._release(now))
        self._dirty.update(by_device)
        self.readings_seen += len(readings)
        return anomalies

    def flush(self) -> list[Anomaly]:
        """Every alarm still held for a load-change check (the end of a replay)."""
        return self._release(None)

    def _release(self, now_ns: int | None) -> list[Anomaly]:
        out: list[Anomaly] = []
        for device in list(self.holding):
            dev = self.devices.get(device)
            if dev is not None:
                out.extend(dev.release(self.settings_for(device)[0].load_change_rows, now_ns))
            if dev is None or not dev.held:
                self.holding.discard(device)
        return out

    def _failed(self, device: str, n: int, exc: Exception) -> None:
        self.failed_readings += n
        if device not in self.errors:  # the trace once; the repeats are counted
            log.exception("detection failed on device %s (%d readings not scored)", device, n)
        self.errors[device] = f"{type(exc).__name__}: {exc}"

    def _observe_device(self, device: str, rs: list[Reading]) -> list[Anomaly]:
        if self._ask_kind(device) and device in self.devices:
            self._reconcile(device)  # first seen before its birth message named its kind
        s, device_on = self.settings_for(device)
        if self.rules:
            rs = [r for r in rs if self.settings_for(device, r.metric)[1]]
        multivariate = s.multivariate and device_on
        out: list[Anomaly] = []
        dev = self.devices.get(device)
        if dev is None:
            dev = self.devices[device] = DeviceModel(s)
        if multivariate and dev.too_wide(s.mv_max_metrics):
            multivariate = False  # watched metric by metric
            if device not in self.said_too_wide:
                self.said_too_wide.add(device)
                log.warning(
                    "device %s has %d metrics, more than detection's mv_max_metrics (%d): "
                    "no device model, each metric is watched on its own",
                    device,
                    len(dev.metrics),
                    s.mv_max_metrics,
                )
        site = self.sites[device]
        rows: list[tuple[int, list[float]]] = []
        tolerance_ns = s.row_tolerance_ms * 1e6
        i = 0
        while i < len(rs):
            t = rs[i].time_ns
            row: list[Anomaly] = []
            stirred: list[str] = []
            seen: set[str] = set()
            while i < len(rs) and (
                rs[i].time_ns == t
                or (rs[i].time_ns - t < tolerance_ns and rs[i].metric not in seen)
            ):
                r = rs[i]
                seen.add(r.metric)
                dev.hear(r.metric, r.time_ns)
                # A metric the device model was not trained on (one that joined after
                # it), or any while the model is paused by a silent metric (a dead sensor
                # may stay dead for days), is watched by its own detectors, not left to
                # the stuck check alone.
                modelled = (
                    multivariate
                    and dev.model is not None
                    and not dev.paused
                    and r.metric in dev.metrics
                )
                if not modelled or s.streaming_when_multivariate:
                    # Counted as they arrive, not once per call: a device's first batch may
                    # be all of its history (a backtest) and must not pass for one metric's.
                    row.extend(self._stream(device, site, r, len(dev.metrics) > 1, stirred))
                else:
                    row.extend(self._checks(device, site, r))
                if r.metric not in dev.last and dev.model is None:
                    dev.add_metric(r.metric)
                    rows.clear()  # this batch's rows so far lack it too
                    dev.bucket = None  # and so does the interval being averaged
                elif (
                    multivariate
                    and dev.model is not None
                    and r.metric not in dev.metrics
                    and r.metric not in dev.joining
                    and len(dev.metrics) + len(dev.joining) < s.mv_max_metrics
                ):
                    dev.joining.append(r.metric)  # into the model once trained with it
                dev.last[r.metric] = r.value
                i += 1
            if len(dev.metrics) > 1:
                out.extend(dev.settle(t, row, stirred, s.load_change_rows))
                out.extend(
                    self._silent_anomaly(device, site, dev, t, m)
                    for m in dev.gone_silent(s.silent_after_rows)
                )
            else:
                out.extend(row)
            # A row holding a silent metric's last value would teach (or judge) the model
            # with a number that is no longer measured.
            complete = not dev.paused and all(m in dev.last for m in dev.metrics)
            if multivariate and len(dev.metrics) > 1 and complete:
                wide = dev.joining and not dev.silent  # rows for the model after this one
                cols = dev.metrics + dev.joining if wide else dev.metrics
                rows.append((t, [dev.last[m] for m in cols]))
        if multivariate and len(dev.metrics) > 1:
            stuck = [m for m in dev.metrics if (c := self.stuck.get((device, m))) and c.raised]
            for inc in dev.add_rows(dev.decimate(rows, s.mv_resolution_s), stuck):
                out.append(self._mv_anomaly(device, site, dev, inc))
            out.extend(self._glitch(device, site, dev, t, j, v) for t, j, v in dev.glitched)
            dev.glitched.clear()
            self._retire(device, dev, s)
        return out

    def _retire(self, device: str, dev: DeviceModel, s: EngineSettings) -> None:
        """Drop the per-metric ensembles of the metrics a trained device model covers.

        They no longer learn (a frozen ensemble is most of a metric's state, ~0.4 MB); if
        the model goes (turned off, relearned) the metric learns afresh, as a baseline
        frozen hours or weeks ago would judge today's readings against then."""
        if dev.model is None or dev.paused or s.streaming_when_multivariate:
            return
        for m in dev.metrics:
            self.metrics.pop((device, m), None)

    def _stream(
        self, device: str, site: str, r: Reading, multi: bool, stirred: list[str]
    ) -> list[Anomaly]:
        """Per-metric anomalies of one reading; its metric goes into ``stirred`` when it
        reached its alert level, alarm or not (a load change stirs several)."""
        out = self._checks(device, site, r)
        det = self._detector(device, r.metric)
        quiet_before = det.quiet
        score = det.update(r.value, r.time_ns / 1e9)
        if det.last_score >= det.alert_level:
            stirred.append(r.metric)
        s = self.settings_for(device, r.metric)[0]
        if not s.streaming_alarms or quiet_before > 0 or score < det.alert_level:
            return out
        # On a device that also has a multivariate model, a lone metric must be clearly
        # out of its own history: load changes move every metric and are not faults.
        if multi and score < _lone_bar(s, det):
            return out
        tails = det.last_tails
        comp = min(tails, key=lambda k: tails[k]) if tails else "value"
        ref = det.parts["value"].ref
        sigma = ref.z(r.value)
        words = {
            "value": "its usual level",
            "level": "its usual level (recent average)",
            "level_long": "its usual level (recent average)",
            "seasonal": "the same time one season ago",
            "spike": "the readings just before it",
        }
        contrib = Contribution(r.metric, r.value, ref.center, sigma)
        if comp == "spike":
            # Measured against its neighbours: the metric's usual spread may hold load
            # swings far wider than the spike.
            jump = det.last_raw["spike"]
            z = det.cal["spike"].stats.z(jump)
            contrib = Contribution(r.metric, r.value, r.value - jump, z)
        if comp.startswith("volatility"):
            vol = det.parts[comp].score_one(r.value)
            how = "barely moving (stuck sensor?)" if vol < 1e-9 else "moving unusually"
            text = f"{r.metric} {how}: {comp.replace('_', ' ')} tail probability {tails[comp]:.1e}"
        elif comp == "pattern":
            # Not a distance: the values may each be ordinary, their order is not.
            text = (
                f"{r.metric} out of its usual pattern: its last readings came in an order "
                f"rarely seen before (pattern tail probability {tails[comp]:.1e})"
            )
        else:
            text = explain([contrib], words.get(comp, "its usual level"))
        out.append(
            Anomaly(
                device,
                site,
                r.time_ns,
                f"ensemble:{comp}",
                score,
                1.0 - min(tails.values(), default=1.0),
                r.metric,
                text,
                [contrib],
            )
        )
        return out

    def _checks(self, device: str, site: str, r: Reading) -> list[Anomaly]:
        """The checks every reading gets, modelled or not: spikes and stuck."""
        return self._spikes(device, site, r) + self._stuck(device, site, r)

    def _spikes(self, device: str, site: str, r: Reading) -> list[Anomaly]:
        key = (device, r.metric)
        det = self.spikes.get(key)
        if det is None:
            det = self.spikes[key] = SpikeBurst()
            _spike_settings(det, self.settings_for(device, r.metric)[0])
        burst = det.update(r.value, r.time_ns / 1e9)
        if burst is None:  # also while off (spike_count 0): it learns, raises nothing
            return []
        sigma = burst.peak_sigma
        side = "above" if sigma > 0 else "below"
        usual = (
            f"about {burst.usual_per_day:.2g} a day or fewer"
            if burst.usual_per_day >= 0.1
            else f"about one in {1 / burst.usual_per_day:.0f} days or fewer"
        )
        text = (
            f"{r.metric} spiked {burst.count} times in {burst.span_s / 60:.1f} min, up to "
            f"{abs(sigma):.1f}\u03c3 {side} the readings around it (usually "
            f"{usual}): an intermittent contact, a failing sensor or a knock?"
        )
        score = min(1.0, -math.log10(max(burst.p, 1e-300)) / 10.0)
        return [
            Anomaly(
                device,
                site,
                round(burst.time_s * 1e9),  # the spike reading's time, to float precision
                "spikes",
                score,
                1.0 - burst.p,
                r.metric,
                text,
                [Contribution(r.metric, burst.value, burst.reference, sigma)],
            )
        ]

    def _stuck(self, device: str, site: str, r: Reading) -> list[Anomaly]:
        key = (device, r.metric)
        det = self.stuck.get(key)
        if det is None:
            ms = self.settings_for(device, r.metric)[0]
            det = self.stuck[key] = StuckSensor(ms.stuck_min_run, learn_for=ms.stuck_learn_readings)
        score = det.score_one(r.value)
        det.learn_one(r.value)
        if not det.just_stuck():
            return []
        if len(det.values) == 1:  # it never moved: a dead sensor, or a constant
            text = (
                f"{r.metric} stuck: the same value {r.value:.6g} in all {det.run + 1} readings "
                "since it was first seen (a dead sensor; or a constant such as a setpoint, "
                "then a detection rule can turn it off)"
            )
        else:
            text = (
                f"{r.metric} stuck: the same value {r.value:.6g} for {det.run + 1} readings "
                f"(longest normal repeat {det.longest})"
            )
        return [
            Anomaly(
                device,
                site,
                r.time_ns,
                "stuck",
                score,
                1.0,
                r.metric,
                text,
                # The value itself may be perfectly ordinary; what is wrong is that it does
                # not move. Sigma stays finite so stored contributions remain valid JSON.
                [Contribution(r.metric, r.value, r.value, 0.0)],
            )
        ]

    def _silent_anomaly(
        self, device: str, site: str, dev: DeviceModel, t: int, metric: str
    ) -> Anomaly:
        row, last_ns = dev.heard[metric]
        value = dev.last[metric]
        minutes = (t - last_ns) / 60e9
        text = (
            f"{metric} silent: no reading for {dev.row_no - row} rows ({minutes:.1f} min) "
            f"while the device's other metrics report; last value {value:.6g}"
        )
        # Nothing is wrong with the last value; what is wrong is that no new one comes.
        return Anomaly(
            device,
            site,
            t,
            "silent",
            1.0,
            1.0,
            metric,
            text,
            [Contribution(metric, value, value, 0.0)],
        )

    def _glitch(
        self, device: str, site: str, dev: DeviceModel, t: int, j: int, value: float
    ) -> Anomaly:
        model = dev.model
        assert model is not None and model.mean_ is not None and model.scale_ is not None
        lows, highs = model.training_range()
        lo, hi = float(lows[j]), float(highs[j])
        metric = dev.metrics[j]
        text = (
            f"{metric} read {value:.6g}, far outside all it read while the device model "
            f"learned ({lo:.4g} to {hi:.4g}) and as far from the reading before: a glitch "
            "or an error code? The model is not fed it (its last good value stands in)"
        )
        sigma = float((value - model.mean_[j]) / model.scale_[j])  # in training spreads
        return Anomaly(
            device,
            site,
            t,
            "glitch",
            1.0,
            1.0,
            metric,
            text,
            [Contribution(metric, value, min(max(value, lo), hi), sigma)],
        )

    def _mv_anomaly(
        self,
        device: str,
        site: str,
        dev: DeviceModel,
        inc: Incident,
    ) -> Anomaly:
        assert dev.model is not None
        x, z, j = inc.row, inc.z, inc.metric
        # A reading against the model's expectation of it (the prediction plus the
        # reading's noise), not minus the statistic that crossed the bar, an average of
        # up to 180 rows of the residual, most of them from before a shift: "1.762,
        # expected 1.754" said a 0.3 shift was 0.008.
        exp = inc.expected if inc.expected is not None else dev.model.expected(x, z, inc.smooth)
        main = Contribution(dev.metrics[j], float(x[j]), float(exp[j]), float(z[j]))
        others = [
            Contribution(m, float(x[k]), float(exp[k]), float(z[k]))
            for k, m in enumerate(dev.metrics)
            if k != j and k not in inc.open and abs(z[k]) >= 3.0
        ]
        others.sort(key=lambda c: abs(c.sigma), reverse=True)
        led_names = {dev.metrics[k] for k in inc.led}
        led = [c for c in others if c.metric in led_names]
        also = [c for c in others if c.metric not in led_names]
        words = "what the other metrics predict for this load"
        if j in dev.counters:
            words += " (its increase per reading: it counts up)"
        text = explain([main], words)
        if also:
            text += "; also " + explain(also, "prediction", limit=2)
        for c in led[:2]:
            # Its residual is the faulty metrics', through its prediction: said so, or the
            # largest sigma of the sentence reads as the fault (an overheating's ambient).
            text += (
                f"; {describe(c, 'prediction')}, a prediction led by the metrics out of"
                f" line: it moved faster than {c.metric} ever has"
            )
        if inc.after_maintenance:
            text += "; out of line when judged again after the maintenance window"
        if inc.back_in_line is not None:
            came, at = inc.back_in_line
            hours = (inc.time_ns - at) / 3.6e12
            text += (
                f"; still out of line {hours:.1f} h after {dev.metrics[came]} came back in"
                " line (a restart with a fault?)"
            )
        still = [k for k in inc.open if k not in inc.ended]
        if still:
            names = " and ".join(dev.metrics[k] for k in still)
            text += f"; a second incident: {names} already out of line"
        if inc.ended:
            names = " and ".join(f"{dev.metrics[k]}'s" for k in inc.ended)
            text += f"; a new incident shortly after {names}"
        likelihood = 1.0 - math.erfc(inc.score / math.sqrt(2.0))
        return Anomaly(
            device,
            site,
            inc.time_ns,
            "virtual_sensor",
            inc.score,
            likelihood,
            main.metric,
            text,
            [main, *others],
        )

    # --- persistence -----------------------------------------------------------------
    # On disk: the engine's header in STATE_FILE and one file per device in DEVICE_DIR, so
    # a save rewrites only the devices that changed, scoring waits for one device at a
    # time (not the fleet), and a damaged file costs its own device's baseline only.
    def state_dict(self) -> dict[str, Any]:
        """All state as one JSON-able dict (what ``save`` spreads over its files)."""
        index = self._index()
        devices = {d: self._device_state(d, index) for d in sorted(index)}
        return {**self._header(), "devices": {d: st for d, st in devices.items() if st}}

    def _header(self) -> dict[str, Any]:
        return state_header(self.settings, self.readings_seen)

    def _known_devices(self) -> set[str]:
        return {d for d, _ in self.metrics} | {d for d, _ in self.stuck} | set(self.devices)

    def _index(self) -> dict[str, tuple[list[str], list[str]]]:
        """Per device: the metrics with a per-metric detector, and with a stuck check."""
        out: dict[str, tuple[list[str], list[str]]] = {d: ([], []) for d in self.devices}
        for d, m in self.metrics:
            out.setdefault(d, ([], []))[0].append(m)
        for d, m in self.stuck:
            out.setdefault(d, ([], []))[1].append(m)
        return out

    def _device_state(
        self, device: str, index: dict[str, tuple[list[str], list[str]]]
    ) -> dict[str, Any] | None:
        """One device's detectors (those ``index`` lists and still there), or None when it
        has none (never seen, or relearned)."""
        dev = self.devices.get(device)
        names, stuck_names = index.get(device, ([], []))
        metrics = {
            m: self.metrics[device, m].state_dict() for m in names if (device, m) in self.metrics
        }
        stuck = {
            m: self.stuck[device, m].state_dict() for m in stuck_names if (device, m) in self.stuck
        }
        # Every metric with a stuck check has a spike check (both see every reading).
        spikes = {
            m: self.spikes[device, m].state_dict()
            for m in stuck_names
            if (device, m) in self.spikes
        }
        if dev is None and not metrics and not stuck:
            return None
        return {
            "site": self.sites.get(device),
            "metrics": metrics,
            "stuck": stuck,
            "spikes": spikes,
            "model": None if dev is None else dev.state_dict(),
            # Only where rules made the device's settings differ from the engine's.
            "settings": None if dev is None or dev.s == self.settings else asdict(dev.s),
        }

    def _load_device(self, device: str, st: dict[str, Any], saved: EngineSettings) -> None:
        """Restore one device from ``_device_state``; all of it or, raising, none of it."""
        metrics = {(device, m): StreamingEnsemble.from_state(x) for m, x in st["metrics"].items()}
        stuck = {}
        for m, x in st["stuck"].items():
            stuck[(device, m)] = det = StuckSensor()
            det.load_state(x)
        spikes = {}
        for m, x in st.get("spikes", {}).items():  # saved before the check: it starts afresh
            spikes[(device, m)] = burst = SpikeBurst()
            burst.load_state(x)
        dev = None
        if st["model"] is not None:
            dev = DeviceModel(saved if st["settings"] is None else _saved_settings(st["settings"]))
            dev.load_state(st["model"])
        self.metrics.update(metrics)
        self.stuck.update(stuck)
        self.spikes.update(spikes)
        if dev is not None:
            self.devices[device] = dev
            if dev.held:
                self.holding.add(device)
        if st["site"] is not None:
            self.sites[device] = st["site"]

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` (or a state saved by an older version, in one file)."""
        if state.get("version") == 2:
            state = _from_version_2(state)
            self._dirty |= set(state["devices"])  # the next save writes them the new way
        saved = self._load_header(state)
        for device, st in state["devices"].items():
            if self.owns_file(_device_file(device)):
                self._load_device(device, st, saved)
        self._settle_loaded()

    def _load_header(self, header: dict[str, Any]) -> EngineSettings:
        """Start a load: check the version, forget all detectors, take the engine's
        counters; return the settings the saved detectors were built with (the configured
        ones apply from now on: ``_settle_loaded``)."""
        if header.get("version") != STATE_VERSION:
            raise ValueError(
                f"detection state version {header.get('version')!r} is not "
                f"{STATE_VERSION}; delete the state directory to start fresh"
            )
        self.metrics, self.stuck, self.devices, self.sites = {}, {}, {}, {}
        self.spikes = {}
        self.holding, self._rows_files = set(), {}
        self.readings_seen = int(header["readings_seen"])
        return _saved_settings(header["settings"])

    def _settle_loaded(self) -> None:
        self._resolved.clear()
        before = self.restarted
        for device in self._known_devices():
            self._ask_kind(device)
            self._reconcile(device)
        if self.restarted > before:
            log.info(
                "%d per-metric detectors start learning afresh: their settings changed "
                "since the state was saved",
                self.restarted - before,
            )

    def save(
        self,
        directory: Path,
        guard: AbstractContextManager[Any] | None = None,
        header: bool = True,
    ) -> Path:
        """Write the state under ``directory``: the devices that changed since the last
        save (one file each, atomically), then the header ``directory/STATE_FILE`` (unless
        ``header`` is false: a partition's process leaves it to the parent).

        ``guard`` (the lock scoring runs under) is held while each device's state is
        taken, and released between devices and while writing, so scoring waits for one
        device at a time. Device files of devices the engine no longer has (relearned,
        or left over) are removed."""
        hold = guard if guard is not None else nullcontext()
        folder = directory / DEVICE_DIR
        folder.mkdir(parents=True, exist_ok=True)
        with hold:
            dirty, self._dirty = sorted(self._dirty), set()
            head = self._header()  # as it stands with the devices taken below
            index = self._index()  # metrics that join meanwhile: their device is dirty again
            keep = {_device_file(d) for d in index}
        try:
            while dirty:
                device = dirty[-1]
                if device not in index:  # no state then (relearned): its file goes below
                    dirty.pop()
                    continue
                name = _device_file(device)
                rows = RowsWriter(folder, name)
                with hold:
                    saving = SAVING_TO.set(rows)  # the windows of rows go to rows files
                    try:
                        st = self._device_state(device, index)
                    finally:
                        SAVING_TO.reset(saving)
                    text = None if st is None else json.dumps({"device": device, **st})
                path = folder / name
                if text is None:
                    path.unlink(missing_ok=True)
                else:
                    rows.write()  # before the state that refers to them
                    _write_atomically(path, text)
                # The device's rows files the state no longer refers to go.
                self._rows_files[device] = rows.commit(self._rows_files.pop(device, set()))
                dirty.pop()
        except BaseException:
            with hold:  # not written: the next save tries them again
                self._dirty.update(dirty)
            raise
        for path in folder.glob("*.json"):
            if path.name not in keep and self.owns_file(path.name):
                path.unlink(missing_ok=True)
        # Rows files of no device kept, or that none refers to (a save cut short).
        referred = set().union(*self._rows_files.values())
        for path in folder.glob(f"*{ROWS_SUFFIX}"):
            name = owner(path.name)
            if (name not in keep or path.name not in referred) and self.owns_file(name):
                path.unlink(missing_ok=True)
        return write_header(directory, head) if header else directory / STATE_FILE

    def owns_file(self, name: str) -> bool:
        """Whether the device state file ``name`` is this engine's partition's."""
        k, n = self.partition
        return n == 1 or partition_of(name, n) == k

    def restore(self, directory: Path) -> bool:
        """Load what ``save`` wrote under ``directory`` into this engine (its configured
        settings and rules apply from now on); False when nothing was saved there.

        A device file that cannot be read is moved aside (``<name>.unreadable-<time>``),
        logged and counted in ``unreadable_devices``: that device learns afresh, the others
        carry on. A header that cannot be read raises, as does a state of another version.
        A state saved by an older version in one file is read too (and written the new
        way at the next save)."""
        path = directory / STATE_FILE
        if not path.exists():
            return False
        self._restore(json.loads(path.read_text(encoding="utf-8")), directory)
        return True

    def _restore(self, header: dict[str, Any], directory: Path) -> None:
        """``restore`` from the header already read (a version-2 header holds it all)."""
        if header.get("version") == 2:
            self.load_state(header)
            return
        saved = self._load_header(header)
        folder = directory / DEVICE_DIR
        for file in sorted(folder.glob("*.json")) if folder.is_dir() else ():
            if not self.owns_file(file.name):  # another process's partition
                continue
            try:
                st = json.loads(file.read_text(encoding="utf-8"))
                loading = LOADING_FROM.set(folder)  # where its rows files are
                try:
                    self._load_device(str(st["device"]), st, saved)
                finally:
                    LOADING_FROM.reset(loading)
                self._rows_files[str(st["device"])] = referred_files(st)
            except Exception as exc:  # one device's damage must not cost the fleet's state
                aside = file.with_name(f"{file.name}.unreadable-{time.strftime('%Y%m%dT%H%M%S')}")
                file.replace(aside)
                self.unreadable_devices += 1
                log.error(
                    "detector state %s is unreadable (%s: %s); kept as %s, that device "
                    "learns afresh",
                    file,
                    type(exc).__name__,
                    exc,
                    aside.name,
                )
        self._settle_loaded()

    @classmethod
    def load(cls, directory: Path, settings: EngineSettings | None = None) -> DetectionEngine:
        """An engine restored from ``save``, with the saved settings unless ``settings`` are
        given; a fresh one when nothing was saved yet."""
        path = directory / STATE_FILE
        if not path.exists():
            return cls(settings)
        header = json.loads(path.read_text(encoding="utf-8"))
        engine = cls(_saved_settings(header["settings"]) if settings is None else settings)
        engine._restore(header, directory)
        return engine


def state_header(settings: EngineSettings, readings_seen: int) -> dict[str, Any]:
    """The contents of ``STATE_FILE``: what every device file was saved with."""
    return {"version": STATE_VERSION, "settings": asdict(settings), "readings_seen": readings_seen}


def write_header(directory: Path, header: dict[str, Any]) -> Path:
    """Write ``STATE_FILE`` under ``directory`` (atomically), after the device files."""
    return _write_atomically(directory / STATE_FILE, json.dumps(header))


def partition_of(name: str, n: int) -> int:
    """Which of ``n`` partitions a device belongs to, by its state file name (a function
    of its id): stable across processes and restarts, unlike Python's ``hash``."""
    return zlib.crc32(name.encode()) % n


def device_partition(device: str, n: int) -> int:
    """The partition (of ``n``) that scores ``device``."""
    return partition_of(_device_file(device), n)


@dataclass(frozen=True)
class Shard:
    """The devices one detecting worker scores when several split the fleet
    (``detection.shard`` of ``detection.shards``): those of partition ``index`` of ``count``.

    Within a worker, ``detection.processes`` splits its shard again: process ``p`` of ``P``
    takes partition ``index + count * p`` of ``count * P``, so every process's partition
    lies inside its worker's shard and one state directory holds any mix of them."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index} of {self.count}: must be 0 .. {self.count - 1}")

    def owns(self, device: str) -> bool:
        return self.count == 1 or _shard_of(device, self.count) == self.index

    def process_partition(self, p: int, processes: int) -> tuple[int, int]:
        """The engine partition of this worker's ``p``-th of ``processes`` processes."""
        return self.index + self.count * p, self.count * processes

    def process_of(self, device: str, processes: int) -> int:
        """Which of this worker's processes scores ``device`` (one of its shard)."""
        return device_partition(device, self.count * processes) // self.count

    def __str__(self) -> str:
        return f"shard {self.index} of {self.count}"


@functools.lru_cache(maxsize=65536)
def _shard_of(device: str, n: int) -> int:
    """``device_partition`` remembered: asked for every message a sharded worker sees."""
    return device_partition(device, n)


def _device_file(device: str) -> str:
    """A device's state file name: its id where that is a safe file name (the ids ingest
    accepts are), escaped otherwise, hashed when too long for one."""
    name = quote(device, safe="")
    if len(name) > 200 or name.startswith("."):
        name = "h-" + hashlib.sha256(device.encode()).hexdigest()
    return name + ".json"


def _write_atomically(path: Path, text: str) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def _from_version_2(state: dict[str, Any]) -> dict[str, Any]:
    """A state saved in one file by version 2 (before per-device files), as version 3."""
    per_device = state.get("device_settings", {})
    devices: dict[str, dict[str, Any]] = {}

    def entry(d: str) -> dict[str, Any]:
        if d not in devices:
            devices[d] = {
                "site": state["sites"].get(d),
                "metrics": {},
                "stuck": {},
                "model": None,
                "settings": per_device.get(d),
            }
        return devices[d]

    for d, m, st in state["metrics"]:
        entry(d)["metrics"][m] = st
    for d, m, st in state["stuck"]:
        entry(d)["stuck"][m] = st
    for d, st in state["devices"].items():
        entry(d)["model"] = st
    header = {k: state[k] for k in ("settings", "readings_seen")}
    return {**header, "version": STATE_VERSION, "devices": devices}


def _spike_summary(det: SpikeBurst | None, s: EngineSettings) -> dict[str, Any]:
    """The spike check of one metric, for ``describe``: its settings, whether it judges
    yet, and the metric's usual rate of spikes (what a burst is measured against)."""
    return {
        "count": s.spike_count,
        "sigma": s.spike_sigma,
        "window_s": s.spike_window_s,
        "watching": bool(det is not None and det.ready),
        "usual_per_day": None if det is None else det.usual_per_day,
    }


def _spike_settings(det: SpikeBurst, s: EngineSettings) -> None:
    """Give a spike check the settings that now apply (its learned rate and spread stay)."""
    det.count, det.sigma, det.window_s = s.spike_count, s.spike_sigma, s.spike_window_s


def _lone_bar(s: EngineSettings, det: StreamingEnsemble) -> float:
    """The score a lone metric's alarm needs on a device with several metrics."""
    if det.fit_in_use == "quantiles":
        return s.streaming_min_score
    return s.streaming_min_score_young


def _anomaly(d: dict[str, Any]) -> Anomaly:
    """An anomaly saved with ``asdict``."""
    contributions = [Contribution(**c) for c in d.get("contributions", ())]
    return Anomaly(**{**d, "contributions": contributions})


def _counter_columns(X: np.ndarray) -> list[int]:
    """Columns that count up: rising in at least a quarter of the steps and falling in at
    most one in a thousand (a reset of the counter)."""
    steps = np.diff(X, axis=0)
    if not len(steps):
        return []
    up, down = (steps > 0).mean(axis=0), (steps < 0).mean(axis=0)
    return [int(j) for j in np.flatnonzero((up >= 0.25) & (down <= 0.001))]


def _rates(X: np.ndarray, counters: list[int], before: list[float] | None) -> np.ndarray:
    """``X`` with each counter column replaced by its increase since the row before (the
    first row's: since ``before``, or 0); a drop (the counter was reset) counts as 0."""
    if not counters:
        return X
    prev = np.vstack([X[:1] if before is None else np.asarray([before]), X[:-1]])
    out = X.astype(float, copy=True)
    out[:, counters] = np.maximum(X[:, counters] - prev[:, counters], 0.0)
    return out


def _window_size(s: EngineSettings) -> int:
    """Rows a device model keeps: enough for its first fit and for its rolling window."""
    return max(s.mv_window_rows, s.mv_train_rows, 1)


_PARAMS: dict[str, dict[str, Any]] = {}


def _ensemble_params(s: EngineSettings) -> dict[str, Any]:
    """The ``params()`` of an ensemble built from ``s``, built once per distinct setting
    (a restart compares every saved per-metric detector with it)."""
    key = json.dumps([s.warmup, s.streaming], sort_keys=True)
    if key not in _PARAMS:
        _PARAMS[key] = StreamingEnsemble(warmup=s.warmup, **s.streaming).params()
    return _PARAMS[key]


def _adopt(det: StreamingEnsemble, want: dict[str, Any]) -> bool:
    """Whether ``det`` can go on under the settings ``want`` (its ``params()``), taking
    them on: when they are its own, or differ only in settings a saved detector can
    take on without learning afresh (a state saved before they existed would otherwise
    restart every detector on upgrade): ``calibrate_after`` once its calibrations learn,
    ``components`` that add ones whose statistic can be rebuilt from its history, and
    ``history`` (what it remembers is kept: all of it, or the latest when shorter),
    ``memory`` and ``resolution_s``."""
    have = det.params()
    differ = {k for k in want if want[k] != have.get(k)}
    if not differ <= {"calibrate_after", "components", "history", "memory", "resolution_s"}:
        return False
    if "resolution_s" in differ:  # from the next interval on
        det.resolution_s = float(want["resolution_s"])
    if "history" in differ:
        det.set_history(int(want["history"]))
    if "memory" in differ:
        det.set_memory(int(want["memory"]))
    if "calibrate_after" in differ and det.n < want["calibrate_after"]:
        return False
    if "components" in differ:
        added = [c for c in want["components"] if c not in det.components]
        dropped = set(det.components) - set(want["components"])
        if dropped or not set(added) <= set(REBUILDABLE):
            return False
        for name in added:
            det.add_component(name)
        det.components = tuple(want["components"])
    det.calibrate_after = int(want["calibrate_after"])
    return True


def _saved_settings(saved: dict[str, Any]) -> EngineSettings:
    values = dict(saved)
    values["mv_spans"] = tuple(values["mv_spans"])
    return EngineSettings(**values)
