"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from millstream_cloud.api.deps import get_services
from millstream_cloud.services import Services

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Alive: 200 while the process runs")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Ready: broker connected and storage writable")
def readyz(services: Services = Depends(get_services)) -> JSONResponse:
    broker = services.subscriber is None or services.subscriber.connected.is_set()
    if services.feed is not None:  # detection.feed: all subscribes on a connection of its own
        broker = broker and services.feed.connected.is_set()
    try:
        store = services.storage.ping()
    except Exception:
        store = False
    ok = broker and store
    return JSONResponse(
        {"status": "ready" if ok else "not ready", "broker": broker, "storage": store},
        status_code=200 if ok else 503,
    )


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(services: Services = Depends(get_services)) -> Response:
    known, online = services.registry.counts()
    services.metrics.devices_known.set(known)
    services.metrics.devices_online.set(online)
    return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)
