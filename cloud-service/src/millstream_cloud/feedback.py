"""What operators say of detection: verdicts on raised anomalies, faults nothing raised,
and the precision and recall they add up to.

Benchmarks say how a detector does on someone else's machines; these labels say how it does
on this plant's. A verdict is a point in ``anomaly_feedback`` with its anomaly's own tags
and time (so judging again replaces it, and InfluxDB and Grafana can join the two); a
missed fault is a point in ``missed_faults`` at the fault's start.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from millstream_cloud.anomalies import (
    VERDICTS,
    AnomalySink,
    list_anomalies,
    rows_by_key,
    tag_filters,
)
from millstream_cloud.storage.base import (
    ANOMALIES,
    ANOMALY_FEEDBACK,
    MISSED_FAULTS,
    FieldValue,
    Point,
    Storage,
)
from millstream_cloud.timeutil import rfc3339

log = logging.getLogger("millstream.feedback")

CORRECT = ("confirmed", "expected")  # verdicts that count for the detector


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


class AnomalyNotFound(LookupError):
    """No stored anomaly matches what a verdict names."""


class AmbiguousAnomaly(LookupError):
    """Several stored anomalies match; ``candidates`` are their (metric, detector) pairs."""

    def __init__(self, message: str, candidates: list[dict[str, str | None]]) -> None:
        super().__init__(message)
        self.candidates = candidates


def judge(sink: AnomalySink, v: Verdict) -> dict[str, Any]:
    """Record an operator's verdict (see :func:`record_feedback`) and count it."""
    judged = record_feedback(sink.storage, v)
    sink.verdicts.labels(v.verdict).inc()
    by = f" by {v.author}" if v.author else ""
    log.info(
        "verdict %s on %s/%s at %s%s", v.verdict, v.device, v.metric or "*", judged["time"], by
    )
    return judged


def report_missed(sink: AnomalySink, m: MissedFault) -> dict[str, Any]:
    """Record a fault no detector raised (see :func:`record_missed`) and count it."""
    out = record_missed(sink.storage, m)
    sink.verdicts.labels("missed").inc()
    log.info("missed fault reported on %s/%s at %s", m.device, m.metric or "*", out["start"])
    return out


def record_feedback(storage: Storage, v: Verdict) -> dict[str, Any]:
    """Store a verdict on the anomaly it names and return the anomaly with it.

    The verdict is a point in ``anomaly_feedback`` with the anomaly's own tags and time, so
    judging again replaces the earlier verdict (last write wins) and InfluxDB and Grafana
    can join the two by tags and time."""
    if v.verdict not in VERDICTS:
        raise ValueError(f"verdict {v.verdict!r} is not one of {', '.join(VERDICTS)}")
    tags = tag_filters(device=v.device, metric=v.metric, detector=v.detector)
    found = list(rows_by_key(storage, ANOMALIES, ("score",), tags, v.time_ns, v.time_ns + 1))
    what = f"device {v.device!r}" + "".join(
        f", {key} {val!r}" for key, val in (("metric", v.metric), ("detector", v.detector)) if val
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
    anomalies cannot show. Refused (:class:`FaultWasRaised`) when an anomaly covering it
    was raised in the span (:func:`_concerns`): that one should be judged instead."""
    if m.end_ns < m.start_ns:
        raise ValueError(f"end {rfc3339(m.end_ns)} is before start {rfc3339(m.start_ns)}")
    raised = [
        a
        for a in list_anomalies(storage, m.device, None, None, m.start_ns, m.end_ns + 1, limit=None)
        if _concerns(a, m.metric)
    ][:20]
    if raised:
        raise FaultWasRaised(
            f"{len(raised)} anomal{'y was' if len(raised) == 1 else 'ies were'} raised on "
            f"device {m.device!r}{f' metric {m.metric!r}' if m.metric else ''} between "
            f"{rfc3339(m.start_ns)} and {rfc3339(m.end_ns)}: judge "
            f"{'it' if len(raised) == 1 else 'them'} (POST /api/v1/anomalies/feedback)",
            raised,
        )
    tags = tag_filters(site=m.site, device=m.device, metric=m.metric)
    fields: dict[str, FieldValue] = {
        "end_ns": m.end_ns,
        "end_ms": m.end_ns // 1_000_000,  # Grafana draws the span as a region from it
        "comment": m.comment,
        "author": m.author,
    }
    storage.write_points([Point(MISSED_FAULTS, tags, fields, m.start_ns)])
    return _missed_json(tags, m.start_ns, fields)


def _concerns(anomaly: dict[str, Any], metric: str | None) -> bool:
    """Whether a raised anomaly covers a fault on ``metric`` (None: the whole device): one
    on that metric, or a whole-device one that names it among its contributions (or names
    none). A whole-device anomaly blaming only other metrics did miss this one."""
    if metric is None or anomaly["metric"] == metric:
        return True
    if anomaly["metric"] is not None:
        return False
    named = {c.get("metric") for c in anomaly["contributions"] if isinstance(c, dict)}
    return not named or metric in named


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
    rows = rows_by_key(
        storage,
        MISSED_FAULTS,
        ("end_ns", "comment", "author"),
        tag_filters(device=device, site=site),
        start_ns,
        end_ns,
    )
    ordered = sorted(rows.items(), key=lambda kv: kv[0][1], reverse=True)
    return [_missed_json(dict(key_tags), t, fields) for (key_tags, t), fields in ordered]


def _counts(items: Sequence[dict[str, Any]], missed: int | None = None) -> dict[str, Any]:
    counts = {v: 0 for v in VERDICTS}
    for a in items:
        if a["feedback"] and a["feedback"]["verdict"] in counts:  # ignore one written by hand
            counts[a["feedback"]["verdict"]] += 1
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
