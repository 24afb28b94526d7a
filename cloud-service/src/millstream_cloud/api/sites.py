"""A site's devices at once: maintenance windows for a whole plant's shutdown or cleaning."""

from __future__ import annotations

import secrets
import time
from typing import Any

from fastapi import APIRouter, Depends, HTTPException

from millstream_cloud.api.deps import get_services
from millstream_cloud.api.devices import (
    Maintenance,
    MaintenanceChange,
    create_maintenance,
    maintenance_json,
    maintenance_span,
)
from millstream_cloud.maintenance import MaintenanceError, SiteMaintenance
from millstream_cloud.registry import Device
from millstream_cloud.services import Services, detection_shard

router = APIRouter(prefix="/api/v1/sites", tags=["devices"])

PAGE = 1000  # devices read from the registry at a time


def _site_devices(services: Services, site: str) -> list[Device]:
    """The site's devices known to the registry (404 if none), after detection is on."""
    if services.anomalies.detector is None:
        raise HTTPException(404, f"anomaly detection is off ({services.anomalies.off_reason})")
    out: list[Device] = []
    after: str | None = None
    while True:
        page = services.registry.page(site=site, online=None, after=after, limit=PAGE)
        out += page
        if len(page) < PAGE:
            break
        after = page[-1].id
    if not out:
        raise HTTPException(404, f"no device of site {site!r} is known")
    return out


@router.post(
    "/{site}/detection/maintenance",
    status_code=201,
    summary="Set a maintenance window, once or recurring, on every device of a site this "
    "worker scores (write scope)",
)
def start_site_maintenance(
    site: str, body: Maintenance, services: Services = Depends(get_services)
) -> dict[str, Any]:
    """The body and each device's window as ``POST /api/v1/devices/{id}/detection/
    maintenance`` (each with its own alert silence); the windows share a ``group`` id, which
    ends them all at once. Devices another detection shard scores are listed under
    ``elsewhere`` (ask that worker); one that cannot take another window (at most 100 not
    ended) under ``refused``, with why. A device first heard from while the window or
    schedule holds (a machine installed during the shutdown, or while a nightly site
    schedule runs) takes its own too, until the group is ended."""
    shard = detection_shard(services.settings)
    devices = _site_devices(services, site)
    group = secrets.token_hex(8)
    now = time.time_ns()
    try:
        start_ns, end_ns, until_ns = maintenance_span(body, now)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    made: list[Any] = []
    refused: dict[str, str] = {}
    book = services.anomalies.maintenance
    with book.saved_once():
        for dev in devices:
            if not shard.owns(dev.id):
                continue
            try:
                made.append(create_maintenance(services, dev, body, now, group))
            except MaintenanceError as exc:
                if exc.field != "device":  # the request's fault, the same for every device
                    raise HTTPException(422, str(exc)) from None
                refused[dev.id] = str(exc)
            except ValueError as exc:  # a bad time or duration: nothing was set
                raise HTTPException(422, str(exc)) from None
        book.add_site(
            SiteMaintenance(
                group, site, start_ns, end_ns, body.repeat, body.timezone, until_ns,
                body.comment, body.author, body.silence_alerts, now,
                members=sorted(d.id for d in devices if shard.owns(d.id)),
            )
        )  # fmt: skip
    now = time.time_ns()
    return {
        "site": site,
        "group": group,
        "maintenance": [maintenance_json(services, x, now) for x in made],
        "elsewhere": [d.id for d in devices if not shard.owns(d.id)],
        "refused": refused,
    }


@router.get(
    "/{site}/detection/maintenance",
    summary="The maintenance windows and schedules of a site's devices this worker scores",
)
def list_site_maintenance(site: str, services: Services = Depends(get_services)) -> dict[str, Any]:
    shard = detection_shard(services.settings)
    book = services.anomalies.maintenance
    now = time.time_ns()
    mine = [d for d in _site_devices(services, site) if shard.owns(d.id)]
    return {
        "site": site,
        "maintenance": [w.to_json(now) for d in mine for w in book.of(d.id)],
        "schedules": [
            maintenance_json(services, x, now) for d in mine for x in book.schedules_of(d.id)
        ],
        "groups": [r.to_json(now) for r in book.sites(site)],
    }


@router.delete(
    "/{site}/detection/maintenance/{group}",
    summary="End the windows (and stop the schedules) set together on a site (write scope)",
)
def end_site_maintenance(
    site: str, group: str, services: Services = Depends(get_services)
) -> dict[str, Any]:
    _site_devices(services, site)
    try:
        ended = services.anomalies.end_group(site, group)
    except KeyError:
        raise HTTPException(
            404, f"no maintenance windows of group {group!r} on site {site!r}"
        ) from None
    now = time.time_ns()
    return {
        "site": site,
        "group": group,
        "maintenance": [maintenance_json(services, x, now) for x in ended],
    }


@router.patch(
    "/{site}/detection/maintenance/{group}",
    summary="Change the windows (or schedules) set together on a site: the shutdown runs "
    "longer, a new comment, a schedule's until (write scope)",
)
def change_site_maintenance(
    site: str, group: str, body: MaintenanceChange, services: Services = Depends(get_services)
) -> dict[str, Any]:
    """The body and each device's change as ``PATCH /api/v1/devices/{id}/detection/
    maintenance/{id}`` with the window's or schedule's id; a device joining the site later
    takes the group as changed. A change none of them could take is refused (422, nothing
    changed); a device whose own window was ended, or schedule stopped, is listed under
    ``refused`` with why."""
    _site_devices(services, site)
    try:
        end_ns, duration_ns, until_ns, set_until = body.parsed()
        changed, refused = services.anomalies.change_group(
            site, group, end_ns, body.comment, duration_ns, until_ns, set_until
        )
    except KeyError:
        raise HTTPException(
            404, f"no maintenance windows of group {group!r} on site {site!r}"
        ) from None
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    now = time.time_ns()
    return {
        "site": site,
        "group": group,
        "maintenance": [maintenance_json(services, x, now) for x in changed],
        "refused": refused,
    }
