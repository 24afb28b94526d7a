"""Anomalies the detectors raised."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query

from millstream_cloud.anomalies import list_anomalies
from millstream_cloud.api.deps import get_services
from millstream_cloud.services import Services
from millstream_cloud.timeutil import parse_time_ns

router = APIRouter(prefix="/api/v1/anomalies", tags=["anomalies"])


@router.get("", summary="Anomalies, newest first; filter by device, metric, site and time")
def anomalies(
    services: Services = Depends(get_services),
    device: str | None = Query(None),
    metric: str | None = Query(None),
    site: str | None = Query(None),
    start: str | None = Query(None, description="RFC 3339, inclusive"),
    end: str | None = Query(None, description="RFC 3339, exclusive"),
    limit: int = Query(100, ge=1, le=10_000),
) -> dict[str, Any]:
    try:
        start_ns = parse_time_ns(start) if start else None
        end_ns = parse_time_ns(end) if end else None
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    items = list_anomalies(services.storage, device, metric, site, start_ns, end_ns, limit)
    return {"anomalies": items}
