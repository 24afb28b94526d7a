"""Anomaly records: what the detectors found, stored beside the telemetry and handed on.

Detectors run on every stored group of readings (a pipeline hook); whatever they return is
written to the ``anomalies`` measurement of the configured storage (so InfluxDB and
Grafana see it too), counted in ``/metrics``, and passed to every subscriber (the alert
engine, Grafana annotations).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import Counter

from millstream_cloud.metrics import ServiceMetrics
from millstream_cloud.model import Anomaly, Reading
from millstream_cloud.storage.base import (
    ANOMALIES,
    ANOMALY_FEEDBACK,
    DETECTION_EVENTS,
    MISSED_FAULTS,
    FieldValue,
    Point,
    SeriesQuery,
    Storage,
)
from millstream_cloud.timeutil import rfc3339

log = logging.getLogger("millstream.anomalies")

FIELDS = ("score", "likelihood", "explanation", "contributions")
FEEDBACK_FIELDS = ("verdict", "comment", "author")
# What an operator can say of an anomaly. ``expected``: a real change with a known cause
# (maintenance, a planned stop, a recipe change), so the detector was right to see it.
VERDICTS = ("confirmed", "expected", "false_alarm")
CORRECT = ("confirmed", "expected")  # verdicts that count for the detector in its precision


@dataclass(frozen=True, slots=True)
class Verdict:
    """An operator's verdict on the anomaly of ``device`` at ``time_ns`` (``metric`` and
    ``detector`` narrow it when several share that instant)."""

    device: str
    time_ns: int
    verdict: str
    metric: str | None = None
    detector: str | None = None
    comment: str = ""
    author: str = ""


@dataclass(frozen=True, slots=True)
class MissedFault:
    """A fault an operator saw on ``device`` (``metric``, or the whole device) from
    ``start_ns`` to ``end_ns`` that no detector raised."""

    device: str
    site: str
    start_ns: int
    end_ns: int
    metric: str | None = None
    comment: str = ""
    author: str = ""


AnomalyHook = Callable[[Sequence[Anomaly]], None]


class Detector(Protocol):
    """What the live path needs of a detection engine."""

    def observe(self, readings: Sequence[Reading]) -> list[Anomaly]: ...


def anomaly_point(a: Anomaly) -> Point:
    tags = {"site": a.site, "device": a.device, "detector": a.detector}
    if a.metric:
        tags["metric"] = a.metric
    contributions = [
        {"metric": c.metric, "value": c.value, "expected": c.expected, "sigma": round(c.sigma, 2)}
        for c in a.contributions
    ]
    return Point(
        ANOMALIES,
        tags,
        {
            "score": float(a.score),
            "likelihood": float(a.likelihood),
            "explanation": a.explanation,
            "contributions": json.dumps(contributions, separators=(",", ":")),
        },
        a.time_ns,
    )


class AnomalySink:
    """Runs the detector on stored readings and records what it finds.

    Started, it scores on its own thread behind a bounded queue, so a slow model never
    holds up the acknowledgement of stored messages: when the queue is full a batch skips
    detection and is counted (``millstream_detection_skipped_readings_total``). Not
    started (tests, tools), it scores inline.
    """

    def __init__(
        self,
        storage: Storage,
        metrics: ServiceMetrics,
        detector: Detector | None = None,
        queue_max_readings: int = 200_000,
        save: Callable[[], None] | None = None,
        save_interval_s: float = 300.0,
    ) -> None:
        self.storage = storage
        self.detector = detector
        self.hooks: list[AnomalyHook] = []
        self.recent: deque[Anomaly] = deque(maxlen=1000)
        self.queue_max_readings = queue_max_readings
        self.save = save
        self.save_interval_s = save_interval_s
        self.busy: Callable[[], bool] | None = None  # True while ingest is receiving
        self._queue: queue.Queue[Sequence[Reading]] = queue.Queue()
        self._queued = 0
        self._lock = threading.Lock()
        self._engine_lock = threading.Lock()  # observe and save vs. relearn from the API
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        r = metrics.registry
        self.counter = Counter(
            "millstream_anomalies",
            "Anomalies raised by the detectors, by detector",
            ["detector"],
            registry=r,
        )
        self.skipped = Counter(
            "millstream_detection_skipped_readings",
            "Readings not scored because the detectors were behind",
            registry=r,
        )
        self.scored = Counter("millstream_detection_scored_readings", "Readings scored", registry=r)
        self.seconds = Counter(
            "millstream_detection_seconds", "Time spent scoring readings", registry=r
        )
        self.verdicts = Counter(
            "millstream_anomaly_feedback",
            "Operator verdicts recorded on anomalies, by verdict",
            ["verdict"],
            registry=r,
        )

    def on_readings(self, readings: Sequence[Reading]) -> None:
        """Pipeline hook: score one stored group of readings (queued when started)."""
        if self.detector is None or not readings:
            return
        if self._thread is None:
            self.process(readings)
            return
        with self._lock:
            if self._queued + len(readings) > self.queue_max_readings:
                self.skipped.inc(len(readings))
                return
            self._queued += len(readings)
        self._queue.put(readings)

    def process(self, readings: Sequence[Reading]) -> None:
        if self.detector is None:
            return
        t0 = time.perf_counter()
        with self._engine_lock:
            found = self.detector.observe(readings)
        self.seconds.inc(time.perf_counter() - t0)
        self.scored.inc(len(readings))
        if found:
            self.record(found)

    def relearn(self, device: str, site: str = "") -> dict[str, int]:
        """Make the detection engine learn ``device`` afresh (see ``DetectionEngine.relearn``),
        save the state and record the moment in ``detection_events`` (a Grafana annotation
        on the device's graphs). Waits for the batch being scored, so it never runs beside
        ``observe``."""
        relearn = getattr(self.detector, "relearn", None)
        if relearn is None:
            raise LookupError("the detector in use cannot relearn")
        with self._engine_lock:
            result: dict[str, int] = relearn(device)
        log.info("detection relearns %s: %s", device, result)
        self._save()  # so a restart does not bring the old baseline back
        event = Point(
            DETECTION_EVENTS,
            {"site": site, "device": device, "event": "relearn"},
            {
                "explanation": "detection re-baselined: learning this device's normal afresh",
                "metric_detectors": result.get("metric_detectors", 0),
            },
            time.time_ns(),
        )
        try:
            self.storage.write_points([event])
        except Exception:  # the relearn itself has happened; the marker is a convenience
            log.exception("recording the relearn of %s failed", device)
        return result

    def judge(self, v: Verdict) -> dict[str, Any]:
        """Record an operator's verdict on one stored anomaly (see :func:`record_feedback`)."""
        judged = record_feedback(self.storage, v)
        self.verdicts.labels(v.verdict).inc()
        by = f" by {v.author}" if v.author else ""
        log.info(
            "verdict %s on %s/%s at %s%s", v.verdict, v.device, v.metric or "*", judged["time"], by
        )
        return judged

    def report_missed(self, m: MissedFault) -> dict[str, Any]:
        """Record a fault no detector raised (see :func:`record_missed`)."""
        out = record_missed(self.storage, m)
        self.verdicts.labels("missed").inc()
        log.info("missed fault reported on %s/%s at %s", m.device, m.metric or "*", out["start"])
        return out

    def start(self) -> None:
        if self.detector is None or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="detection", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout)
            self._thread = None
        if self.save is not None and self.detector is not None:
            self._save()

    def _save(self) -> None:
        try:
            if self.save is not None:
                with self._engine_lock:  # a relearn must not change the state mid-write
                    self.save()
        except Exception:
            log.exception("saving detector state failed")

    # Scoring goes in small chunks, and while ingest is receiving, each chunk is followed by
    # a pause of PACE times what the chunk took: detection shares one interpreter (GIL)
    # with ingest, so this caps it at about 1/(1+PACE) of it. Under a burst the detectors
    # fall behind and, past the queue bound, skip (counted); they catch up afterwards.
    CHUNK = 500
    PACE = 4.0

    def _pace(self, spent_s: float) -> None:
        if self.busy is not None and self.busy():
            self._stop.wait(spent_s * self.PACE)

    def _run(self) -> None:
        next_save = time.monotonic() + self.save_interval_s
        while not (self._stop.is_set() and self._queue.empty()):
            try:
                readings = self._queue.get(timeout=0.2)
            except queue.Empty:
                readings = None
            if readings is not None:
                for i in range(0, len(readings), self.CHUNK):
                    chunk = readings[i : i + self.CHUNK]
                    t0 = time.monotonic()
                    try:
                        self.process(chunk)
                    except Exception:
                        log.exception("detector failed on a batch of %d readings", len(chunk))
                    with self._lock:
                        self._queued -= len(chunk)
                    self._pace(time.monotonic() - t0)
            if time.monotonic() >= next_save:
                self._save()
                next_save = time.monotonic() + self.save_interval_s

    def record(self, anomalies: Sequence[Anomaly]) -> None:
        self.storage.write_points([anomaly_point(a) for a in anomalies])
        with self._lock:
            self.recent.extend(anomalies)
        for a in anomalies:
            self.counter.labels(a.detector).inc()
            log.info("anomaly on %s/%s: %s", a.device, a.metric or "*", a.explanation)
        for hook in self.hooks:
            try:
                hook(anomalies)
            except Exception:
                log.exception("anomaly hook %r failed", hook)


class AnomalyNotFound(LookupError):
    """No stored anomaly matches what a verdict names."""


class AmbiguousAnomaly(LookupError):
    """Several stored anomalies match; ``candidates`` are their (metric, detector) pairs."""

    def __init__(self, message: str, candidates: list[dict[str, str | None]]) -> None:
        super().__init__(message)
        self.candidates = candidates


_Key = tuple[tuple[tuple[str, str], ...], int]  # (sorted tag pairs, time_ns)


def _rows(
    storage: Storage,
    measurement: str,
    fields: Sequence[str],
    tags: dict[str, str],
    start_ns: int | None,
    end_ns: int | None,
) -> dict[_Key, dict[str, Any]]:
    """One dict of fields per stored point, keyed by its tags and time."""
    series = storage.query(
        SeriesQuery(
            measurement,
            fields,
            tags,
            start_ns,
            end_ns,
            group_by=("site", "device", "metric", "detector"),
        )
    )
    rows: dict[_Key, dict[str, Any]] = {}
    for s in series:
        key_tags = tuple(sorted((k, v) for k, v in s.tags.items() if v))
        for t, v in s.points:
            rows.setdefault((key_tags, t), {})[s.field] = v
    return rows


def _filters(**tags: str | None) -> dict[str, str]:
    return {k: v for k, v in tags.items() if v}


def list_anomalies(
    storage: Storage,
    device: str | None = None,
    metric: str | None = None,
    site: str | None = None,
    start_ns: int | None = None,
    end_ns: int | None = None,
    limit: int | None = 1000,
    verdict: str | None = None,
) -> list[dict[str, Any]]:
    """Stored anomalies, newest first, as the API returns them, each with the operator's
    verdict (``feedback``, null while nobody has judged it). ``verdict`` keeps only those
    with that verdict, or ``judged`` / ``unjudged``."""
    tags = _filters(device=device, metric=metric, site=site)
    rows = _rows(storage, ANOMALIES, FIELDS, tags, start_ns, end_ns)
    verdicts = _rows(storage, ANOMALY_FEEDBACK, FEEDBACK_FIELDS, tags, start_ns, end_ns)
    out = []
    for key, fields in rows.items():
        key_tags, t = key
        tags_d = dict(key_tags)
        fb = verdicts.get(key)
        feedback = (
            {name: fb.get(name) or None for name in FEEDBACK_FIELDS}
            if fb and fb.get("verdict")
            else None
        )
        if not _verdict_matches(feedback, verdict):
            continue
        contributions = fields.get("contributions")
        out.append(
            {
                "time": rfc3339(t),
                "time_ns": t,
                "site": tags_d.get("site"),
                "device": tags_d.get("device"),
                "metric": tags_d.get("metric"),
                "detector": tags_d.get("detector"),
                "score": fields.get("score"),
                "likelihood": fields.get("likelihood"),
                "explanation": fields.get("explanation", ""),
                "contributions": json.loads(contributions)
                if isinstance(contributions, str)
                else [],
                "feedback": feedback,
            }
        )
    out.sort(key=lambda r: r["time_ns"], reverse=True)
    for r in out:
        del r["time_ns"]
    return out if limit is None else out[:limit]


def _verdict_matches(feedback: dict[str, Any] | None, wanted: str | None) -> bool:
    if wanted is None:
        return True
    if wanted == "judged":
        return feedback is not None
    if wanted == "unjudged":
        return feedback is None
    return feedback is not None and feedback["verdict"] == wanted


def record_feedback(storage: Storage, v: Verdict) -> dict[str, Any]:
    """Store a verdict on the anomaly it names and return the anomaly with it.

    The verdict is a point in ``anomaly_feedback`` with the anomaly's own tags and time, so
    judging again replaces the earlier verdict (last write wins) and InfluxDB and Grafana
    can join the two by tags and time."""
    if v.verdict not in VERDICTS:
        raise ValueError(f"verdict {v.verdict!r} is not one of {', '.join(VERDICTS)}")
    tags = _filters(device=v.device, metric=v.metric, detector=v.detector)
    found = list(_rows(storage, ANOMALIES, ("score",), tags, v.time_ns, v.time_ns + 1))
    what = f"device {v.device!r}" + "".join(
        f", {k} {v!r}" for k, v in (("metric", v.metric), ("detector", v.detector)) if v
    )
    if not found:
        raise AnomalyNotFound(f"no anomaly of {what} at {rfc3339(v.time_ns)}")
    if len(found) > 1:
        candidates = [
            {"metric": dict(k).get("metric"), "detector": dict(k).get("detector")} for k, _ in found
        ]
        raise AmbiguousAnomaly(
            f"{len(found)} anomalies of {what} at {rfc3339(v.time_ns)}: "
            "name the metric or the detector",
            candidates,
        )
    key_tags, t = found[0]
    storage.write_points(
        [
            Point(
                ANOMALY_FEEDBACK,
                dict(key_tags),
                {"verdict": v.verdict, "comment": v.comment, "author": v.author},
                t,
            )
        ]
    )
    tags_d = dict(key_tags)
    return {
        "time": rfc3339(t),
        "site": tags_d.get("site"),
        "device": tags_d.get("device"),
        "metric": tags_d.get("metric"),
        "detector": tags_d.get("detector"),
        "feedback": {
            "verdict": v.verdict,
            "comment": v.comment or None,
            "author": v.author or None,
        },
    }


class FaultWasRaised(ValueError):
    """A missed fault was reported where an anomaly had been raised; ``anomalies`` lists them."""

    def __init__(self, message: str, anomalies: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.anomalies = anomalies


def record_missed(storage: Storage, m: MissedFault) -> dict[str, Any]:
    """Store a fault no detector raised: the false negatives that verdicts on raised
    anomalies cannot show. Refused (:class:`FaultWasRaised`) when an anomaly of that
    device (and metric) was raised in the span: that one should be judged instead."""
    if m.end_ns < m.start_ns:
        raise ValueError(f"end {rfc3339(m.end_ns)} is before start {rfc3339(m.start_ns)}")
    raised = list_anomalies(storage, m.device, m.metric, None, m.start_ns, m.end_ns + 1, limit=20)
    if raised:
        raise FaultWasRaised(
            f"{len(raised)} anomal{'y was' if len(raised) == 1 else 'ies were'} raised on "
            f"device {m.device!r}{f' metric {m.metric!r}' if m.metric else ''} between "
            f"{rfc3339(m.start_ns)} and {rfc3339(m.end_ns)}: judge "
            f"{'it' if len(raised) == 1 else 'them'} (POST /api/v1/anomalies/feedback)",
            raised,
        )
    tags = _filters(site=m.site, device=m.device, metric=m.metric)
    fields: dict[str, FieldValue] = {
        "end_ns": m.end_ns,
        "comment": m.comment,
        "author": m.author,
    }
    storage.write_points([Point(MISSED_FAULTS, tags, fields, m.start_ns)])
    return _missed_json(tags, m.start_ns, fields)


def _missed_json(tags: dict[str, str], start_ns: int, fields: dict[str, Any]) -> dict[str, Any]:
    end_ns = fields.get("end_ns")
    return {
        "start": rfc3339(start_ns),
        "end": rfc3339(int(end_ns)) if isinstance(end_ns, int | float) else None,
        "site": tags.get("site"),
        "device": tags.get("device"),
        "metric": tags.get("metric"),
        "comment": fields.get("comment") or None,
        "author": fields.get("author") or None,
    }


def list_missed(
    storage: Storage,
    device: str | None = None,
    site: str | None = None,
    start_ns: int | None = None,
    end_ns: int | None = None,
) -> list[dict[str, Any]]:
    """Reported missed faults, newest first."""
    rows = _rows(
        storage,
        MISSED_FAULTS,
        ("end_ns", "comment", "author"),
        _filters(device=device, site=site),
        start_ns,
        end_ns,
    )
    ordered = sorted(rows.items(), key=lambda kv: kv[0][1], reverse=True)
    return [_missed_json(dict(key_tags), t, fields) for (key_tags, t), fields in ordered]


def _counts(items: Sequence[dict[str, Any]], missed: int | None = None) -> dict[str, Any]:
    counts = {v: 0 for v in VERDICTS}
    for a in items:
        if a["feedback"]:
            counts[a["feedback"]["verdict"]] = counts.get(a["feedback"]["verdict"], 0) + 1
    judged = sum(counts.values())
    correct = sum(counts[v] for v in CORRECT)
    out = {
        "anomalies": len(items),
        "judged": judged,
        **counts,
        "precision": round(correct / judged, 4) if judged else None,
    }
    if missed is not None:
        found = correct + missed
        out["missed"] = missed
        out["recall"] = round(correct / found, 4) if found else None
    return out


def precision_summary(
    storage: Storage,
    device: str | None = None,
    site: str | None = None,
    start_ns: int | None = None,
    end_ns: int | None = None,
) -> dict[str, Any]:
    """How often the detectors were right, by the operators' verdicts: overall, per
    detector and per device and metric. Precision is (confirmed + expected) / judged; the
    anomalies nobody judged are counted but not guessed at. Recall (overall and per device
    and metric; a missed fault has no detector) is (confirmed + expected) / (those +
    reported missed faults): only as complete as the reports."""
    items = list_anomalies(storage, device, None, site, start_ns, end_ns, limit=None)
    missed = list_missed(storage, device, site, start_ns, end_ns)
    by_detector: dict[str | None, list[dict[str, Any]]] = {}
    by_metric: dict[tuple[str | None, str | None], list[dict[str, Any]]] = {}
    missed_by_metric: dict[tuple[str | None, str | None], int] = {}
    for a in items:
        by_detector.setdefault(a["detector"], []).append(a)
        by_metric.setdefault((a["device"], a["metric"]), []).append(a)
    for m in missed:
        key = (m["device"], m["metric"])
        by_metric.setdefault(key, [])
        missed_by_metric[key] = missed_by_metric.get(key, 0) + 1
    out: dict[str, Any] = _counts(items, len(missed))
    out["by_detector"] = [
        {"detector": d, **_counts(by_detector[d])} for d in sorted(by_detector, key=str)
    ]
    out["by_metric"] = [
        {"device": k[0], "metric": k[1], **_counts(by_metric[k], missed_by_metric.get(k, 0))}
        for k in sorted(by_metric, key=lambda k: (k[0] or "", k[1] or ""))
    ]
    return out
