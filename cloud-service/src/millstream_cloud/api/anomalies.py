"""Anomalies the detectors raised, and the operators' verdicts on them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query
from pydantic import BaseModel, ConfigDict, Field

from millstream_cloud.anomalies import list_anomalies
from millstream_cloud.api.deps import get_services
from millstream_cloud.feedback import (
    AmbiguousAnomaly,
    AnomalyNotFound,
    FaultWasRaised,
    MissedFault,
    Verdict,
    judge,
    list_missed,
    precision_summary,
    report_missed,
)
from millstream_cloud.services import Services
from millstream_cloud.timeutil import parse_time_ns

router = APIRouter(prefix="/api/v1/anomalies", tags=["anomalies"])

VerdictFilter = Literal["confirmed", "expected", "false_alarm", "judged", "unjudged"]


def _time(text: str) -> int:
    try:
        return parse_time_ns(text)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None


def _range(start: str | None, end: str | None) -> tuple[int | None, int | None]:
    """The span's bounds in ns; one that ends before it starts is refused (422) rather
    than answered with nothing, which reads as "no anomalies"."""
    start_ns, end_ns = (_time(start) if start else None, _time(end) if end else None)
    if start_ns is not None and end_ns is not None and end_ns < start_ns:
        raise HTTPException(422, f"end {end} is before start {start}")
    return start_ns, end_ns


@dataclass(frozen=True, slots=True)
class Span:
    device: str | None
    site: str | None
    start_ns: int | None
    end_ns: int | None


def span(
    device: str | None = Query(None),
    site: str | None = Query(None),
    start: str | None = Query(None, description="RFC 3339 or relative to now (now-1h), inclusive"),
    end: str | None = Query(None, description="RFC 3339 or relative to now (now-1h), exclusive"),
) -> Span:
    """The device, site and time filters the summary routes share."""
    return Span(device, site, *_range(start, end))


@router.get("", summary="Anomalies, newest first; filter by device, metric, site, time, verdict")
def anomalies(
    services: Services = Depends(get_services),
    device: str | None = Query(None),
    metric: str | None = Query(None),
    site: str | None = Query(None),
    start: str | None = Query(None, description="RFC 3339 or relative to now (now-1h), inclusive"),
    end: str | None = Query(None, description="RFC 3339 or relative to now (now-1h), exclusive"),
    verdict: VerdictFilter | None = Query(
        None, description="only anomalies with this verdict, or judged / unjudged"
    ),
    limit: int = Query(100, ge=1, le=10_000),
) -> dict[str, Any]:
    start_ns, end_ns = _range(start, end)
    items = list_anomalies(
        services.storage, device, metric, site, start_ns, end_ns, limit, verdict=verdict
    )
    return {"anomalies": items}


class _Label(BaseModel):
    """What every operator label has: whose device, a note and who gave it."""

    model_config = ConfigDict(extra="forbid")

    device: str = Field(min_length=1, max_length=200)
    comment: str = Field("", max_length=2000)
    author: str = Field("", max_length=200)


class Feedback(_Label):
    """An operator's verdict on one anomaly, named as ``GET /api/v1/anomalies`` lists it."""

    time: str = Field(description="the anomaly's time, as listed (RFC 3339)")
    verdict: Literal["confirmed", "expected", "false_alarm"] = Field(
        description="confirmed: a real fault; expected: a real change with a known cause "
        "(maintenance, planned stop); false_alarm: nothing was wrong"
    )
    metric: str | None = Field(None, max_length=200, description="when several share the time")
    detector: str | None = Field(None, max_length=200, description="likewise")


@router.post(
    "/feedback",
    summary="Record a verdict on an anomaly: confirmed, expected or false_alarm (write scope)",
)
def feedback(body: Feedback, services: Services = Depends(get_services)) -> dict[str, Any]:
    """Judging the same anomaly again replaces the verdict. The verdicts give each detector's
    precision on this plant (``GET /api/v1/anomalies/precision``)."""
    try:
        fields = body.model_dump(exclude={"time"})
        return judge(services.anomalies, Verdict(time_ns=_time(body.time), **fields))
    except AmbiguousAnomaly as exc:
        raise HTTPException(409, {"error": str(exc), "candidates": exc.candidates}) from None
    except AnomalyNotFound as exc:
        raise HTTPException(404, str(exc)) from None


@router.get(
    "/precision",
    summary="How often the detectors were right (precision) and what they missed (recall)",
)
def precision(
    services: Services = Depends(get_services), f: Span = Depends(span)
) -> dict[str, Any]:
    return precision_summary(services.storage, f.device, f.site, f.start_ns, f.end_ns)


class MissedReport(_Label):
    """A fault an operator saw that no detector raised."""

    start: str = Field(description="when the fault began (RFC 3339)")
    end: str | None = Field(None, description="when it ended (RFC 3339); default: start")
    metric: str | None = Field(None, max_length=200, description="the metric it showed in")


@router.post(
    "/missed",
    summary="Report a fault no detector raised (write scope); counts against recall",
)
def missed_fault(body: MissedReport, services: Services = Depends(get_services)) -> dict[str, Any]:
    """409 when an anomaly of that device (and metric) was raised in the span: judge it
    with ``POST /api/v1/anomalies/feedback`` instead."""
    dev = services.registry.get(body.device)
    if dev is None:
        raise HTTPException(404, f"device {body.device!r} not found")
    start_ns = _time(body.start)
    end_ns = _time(body.end) if body.end else start_ns
    try:
        fields = body.model_dump(exclude={"device", "start", "end"})
        return report_missed(
            services.anomalies, MissedFault(dev.id, dev.site, start_ns, end_ns, **fields)
        )
    except FaultWasRaised as exc:
        raise HTTPException(409, {"error": str(exc), "anomalies": exc.anomalies}) from None
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None


@router.get("/missed", summary="Reported missed faults, newest first")
def missed(services: Services = Depends(get_services), f: Span = Depends(span)) -> dict[str, Any]:
    return {"missed": list_missed(services.storage, f.device, f.site, f.start_ns, f.end_ns)}
