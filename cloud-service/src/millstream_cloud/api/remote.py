"""Remote configuration and commands of one device."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends, HTTPException, Query
from fastapi.responses import JSONResponse

from millstream_cloud.api.deps import get_services
from millstream_cloud.registry import Device
from millstream_cloud.remote import RemoteError, RemoteService
from millstream_cloud.services import Services

router = APIRouter(prefix="/api/v1/devices", tags=["remote config and commands"])


def _remote(services: Services) -> RemoteService:
    remote = services.remote
    if remote is None:
        raise HTTPException(503, "remote configuration is not running in this instance")
    return remote


def _device(services: Services, device_id: str) -> Device:
    dev = services.registry.get(device_id)
    if dev is None:
        raise HTTPException(404, f"device {device_id!r} not found")
    return dev


@router.get("/{device_id}/config", summary="Desired and last reported configuration")
def get_config(device_id: str, services: Services = Depends(get_services)) -> dict[str, Any]:
    _device(services, device_id)
    return _remote(services).config(device_id)


@router.put(
    "/{device_id}/config",
    summary="Set the desired configuration (published retained as the next revision)",
)
def put_config(
    device_id: str,
    body: dict[str, Any] = Body(
        ...,
        description='{"config": {...}} (or the config object itself): the keys to change',
        examples=[{"config": {"publish": {"interval_s": 5}}}],
    ),
    services: Services = Depends(get_services),
) -> dict[str, Any]:
    dev = _device(services, device_id)
    config = (
        body["config"] if set(body) == {"config"} and isinstance(body["config"], dict) else body
    )
    try:
        return _remote(services).set_desired(device_id, dev.site, config)
    except RemoteError as exc:
        raise HTTPException(503, str(exc)) from None


@router.post(
    "/{device_id}/commands/{name}",
    summary="Send a command and wait (bounded) for its result; 504 on timeout",
)
async def command(
    device_id: str,
    name: str,
    body: dict[str, Any] | None = Body(
        None, description='{"args": {...}}', examples=[{"args": {"seconds": 5}}]
    ),
    timeout: float | None = Query(None, gt=0, description="seconds to wait (default 10)"),
    services: Services = Depends(get_services),
) -> Any:
    dev = _device(services, device_id)
    remote = _remote(services)
    limit = services.settings.remote.max_command_timeout_s
    wait = min(timeout or services.settings.remote.command_timeout_s, limit)
    args = (body or {}).get("args") or {}
    if not isinstance(args, dict):
        raise HTTPException(422, "args must be an object")
    try:
        cmd_id, result = await remote.command(device_id, dev.site, name, args, wait)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    except RemoteError as exc:
        raise HTTPException(503, str(exc)) from None
    if result is None:
        return JSONResponse(
            {
                "detail": f"no result from {device_id!r} for command {name!r} within {wait:g}s",
                "id": cmd_id,
            },
            status_code=504,
        )
    return {"device": device_id, "command": name, **result}
