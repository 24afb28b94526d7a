"""Backtest: what a detection engine would have raised on a device's stored history.

Before a change to ``detection.engine`` or ``detection.rules`` goes live, an ops engineer
wants to know what it would have done on this machine's own data: would it have caught
last month's seal leak, and would it repeat the false alarms the team marked? A fresh
engine (the service's settings with the proposed overrides) learns from the stored
readings before ``start`` and is scored on ``start``..``end``; its anomalies are set
against the operators' verdicts and missed-fault reports in the same span. Nothing is
stored and the live engine is not touched.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from millstream_cloud.anomalies import list_anomalies
from millstream_cloud.detection.engine import DetectionEngine, EngineSettings
from millstream_cloud.detection.rules import Rule
from millstream_cloud.feedback import list_missed
from millstream_cloud.model import Anomaly, Reading
from millstream_cloud.storage.base import (
    TELEMETRY,
    SeriesQuery,
    Storage,
    device_readings,
    row_batches,
)
from millstream_cloud.timeutil import parse_time_ns, rfc3339

BATCH_READINGS = 5000  # fed to the engine per call, cut at a timestamp boundary


class TooManyReadings(ValueError):
    """The span holds more readings than the caller allowed."""


class ReplayFailed(RuntimeError):
    """The detectors raised on this history with these settings (the live engine would
    count and skip the device; a backtest says so instead of answering "no anomalies")."""


@dataclass(frozen=True, slots=True)
class BacktestRequest:
    device: str
    site: str
    kind: str | None
    start_ns: int
    end_ns: int
    learn_from_ns: int
    engine: EngineSettings  # the service's settings with the proposed overrides
    rules: Sequence[Rule]
    tolerance_ns: int
    max_readings: int
    # The device's maintenance windows (start_ns, end_ns): what is raised in them is left
    # out (live, it is kept as expected and not alerted), and the detectors are re-armed
    # at their ends, as live.
    maintenance: Sequence[tuple[int, int]] = ()


def stored_readings(
    storage: Storage, device: str, site: str, start_ns: int, end_ns: int, limit: int
) -> list[Reading]:
    """The device's numeric telemetry in [start, end), in time order."""
    metrics = sorted(storage.field_keys(TELEMETRY))
    if not metrics:
        return []
    tags = {"device": device}
    counts = storage.query(SeriesQuery(TELEMETRY, metrics, tags, start_ns, end_ns, agg="count"))
    total = sum(int(v) for s in counts for _, v in s.points if isinstance(v, int | float))
    if total > limit:  # counted first (cheap: chunk summaries), so a huge span is never loaded
        raise TooManyReadings(
            f"{total:,} readings of device {device!r} between {rfc3339(start_ns)} and "
            f"{rfc3339(end_ns)}, more than max_readings {limit:,}: narrow the span"
        )
    return device_readings(storage, device, site, start_ns, end_ns)


def replay(
    readings: Sequence[Reading],
    engine: EngineSettings,
    rules: Sequence[Rule],
    kind_of: Callable[[str], str | None],
    rearm_at: Sequence[int] = (),
) -> list[Anomaly]:
    """Every anomaly a fresh engine raises over ``readings`` (one device's), fed as
    ingest would; its detectors re-armed at each time in ``rearm_at`` (the ends of the
    device's maintenance windows) before the first reading at or after it, as live."""
    det = DetectionEngine(engine, rules, kind_of)
    found: list[Anomaly] = []
    first = readings[0].time_ns if readings else 0
    ends = sorted(e for e in set(rearm_at) if e > first)  # one ended before: nothing to re-arm
    for batch in row_batches(readings, BATCH_READINGS):
        while ends and batch and batch[-1].time_ns >= ends[0]:
            cut = next(i for i, r in enumerate(batch) if r.time_ns >= ends[0])
            found.extend(_observe(det, batch[:cut]))
            det.rearm(batch[cut].device)
            batch = batch[cut:]
            ends = [e for e in ends if e > batch[0].time_ns]  # passed together: re-armed once
        found.extend(_observe(det, batch))
    return found + det.flush()


def _observe(det: DetectionEngine, batch: Sequence[Reading]) -> list[Anomaly]:
    found = det.observe(batch) if batch else []
    if det.errors:
        device, error = next(iter(det.errors.items()))
        raise ReplayFailed(f"detection failed on device {device!r}: {error}")
    return found


def _near(times: Sequence[int], lo: int, hi: int) -> bool:
    return any(lo <= t <= hi for t in times)


def compare(
    raised: Sequence[Anomaly],
    judged: Sequence[Mapping[str, Any]],
    missed: Sequence[Mapping[str, Any]],
    tolerance_ns: int,
) -> dict[str, Any]:
    """Set the backtest's anomalies against the labels an operator gave in the span.

    A confirmed or expected anomaly is *found* again when the backtest raised anything on
    the device within the tolerance of its time; a missed fault when it raised anything
    from ``start - tolerance`` to ``end + tolerance``; a false alarm is *repeated* under the
    same rule. Backtest anomalies near none of these are ``unjudged``."""
    times = [a.time_ns for a in raised]
    labelled: list[tuple[int, int]] = []
    out: dict[str, Any] = {"tolerance_s": tolerance_ns / 1e9}
    for verdict in ("confirmed", "expected", "false_alarm"):
        spans = [
            (parse_time_ns(a["time"]), parse_time_ns(a["time"]))
            for a in judged
            if a["feedback"] and a["feedback"]["verdict"] == verdict
        ]
        labelled += spans
        hit = sum(_near(times, s - tolerance_ns, e + tolerance_ns) for s, e in spans)
        out[verdict] = {
            "total": len(spans),
            "repeated" if verdict == "false_alarm" else "found": hit,
        }
    spans = [(parse_time_ns(m["start"]), parse_time_ns(m["end"] or m["start"])) for m in missed]
    labelled += spans
    out["missed"] = {
        "total": len(spans),
        "found": sum(_near(times, s - tolerance_ns, e + tolerance_ns) for s, e in spans),
    }
    out["unjudged"] = sum(
        not any(s - tolerance_ns <= t <= e + tolerance_ns for s, e in labelled) for t in times
    )
    return out


def anomaly_json(a: Anomaly) -> dict[str, Any]:
    return {
        "time": rfc3339(a.time_ns),
        "metric": a.metric,
        "detector": a.detector,
        "score": round(float(a.score), 4),
        "likelihood": round(float(a.likelihood), 6),
        "explanation": a.explanation,
    }


def backtest(storage: Storage, req: BacktestRequest) -> dict[str, Any]:
    """Run the request; see the module docstring. Raises :class:`TooManyReadings`."""
    t0 = time.perf_counter()
    readings = stored_readings(
        storage, req.device, req.site, req.learn_from_ns, req.end_ns, req.max_readings
    )
    ends = [w1 for _, w1 in req.maintenance]
    raised = [
        a
        for a in replay(readings, req.engine, req.rules, lambda _d: req.kind, ends)
        if req.start_ns <= a.time_ns < req.end_ns
        and not any(w0 <= a.time_ns < w1 for w0, w1 in req.maintenance)
    ]
    live = list_anomalies(storage, req.device, None, None, req.start_ns, req.end_ns, limit=None)
    judged = [a for a in live if a["feedback"]]
    missed = list_missed(storage, req.device, None, req.start_ns, req.end_ns)
    learning = sum(r.time_ns < req.start_ns for r in readings)
    return {
        "device": req.device,
        "start": rfc3339(req.start_ns),
        "end": rfc3339(req.end_ns),
        "learned_from": rfc3339(req.learn_from_ns),
        "readings": {"learning": learning, "scored": len(readings) - learning},
        "anomalies": [anomaly_json(a) for a in raised],
        "live_anomalies": len(live),
        "against_labels": compare(raised, judged, missed, req.tolerance_ns),
        "seconds": round(time.perf_counter() - t0, 2),
    }
