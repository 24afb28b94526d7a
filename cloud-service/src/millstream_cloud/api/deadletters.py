"""Rejected messages, kept for inspection."""

from __future__ import annotations

import base64
from typing import Any

from fastapi import APIRouter, Depends, Query

from millstream_cloud.api.deps import get_services
from millstream_cloud.services import Services
from millstream_cloud.timeutil import rfc3339

router = APIRouter(prefix="/api/v1/dead-letters", tags=["dead letters"])


def _payload(raw: bytes) -> dict[str, str]:
    try:
        return {"payload": raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {"payload_base64": base64.b64encode(raw).decode()}


@router.get("", summary="Rejected messages, newest first, with topic, time, reason and payload")
def list_dead_letters(
    services: Services = Depends(get_services),
    reason: str | None = Query(
        None, description="only this reason (e.g. schema, not_json, oversize)"
    ),
    limit: int = Query(100, ge=1, le=10_000),
    cursor: int | None = Query(
        None, ge=0, le=2**63 - 1, description="the `next` value of the previous page"
    ),
) -> dict[str, Any]:
    items = services.dead_letters.list(limit + 1, cursor, reason)
    page = items[:limit]
    return {
        "dead_letters": [
            {
                "id": d.id,
                "time": rfc3339(d.time_ns),
                "topic": d.topic,
                "reason": d.reason,
                "error": d.error,
                "size": d.size,
                **_payload(d.payload),
            }
            for d in page
        ],
        "next": page[-1].id if len(items) > limit else None,
    }
