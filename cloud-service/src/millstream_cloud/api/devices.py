"""Devices, their latest values and their telemetry."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, HTTPException, Query
from pydantic import BaseModel, ConfigDict, Field

from millstream_cloud.anomalies import DescribesDevices
from millstream_cloud.api.deps import get_services
from millstream_cloud.maintenance import MaintenanceError, MaintenanceSchedule
from millstream_cloud.registry import Device
from millstream_cloud.security.auth import needs_scope
from millstream_cloud.services import Services, detection_shard
from millstream_cloud.storage.base import AGGREGATES, TELEMETRY, SeriesQuery
from millstream_cloud.timeutil import parse_duration_ns, parse_time_ns, rfc3339

if TYPE_CHECKING:
    from millstream_cloud.detection.engine import Shard

router = APIRouter(prefix="/api/v1/devices", tags=["devices"])

DEFAULT_RANGE_NS = 3600 * 1_000_000_000
BACKTEST_LOCK = threading.Lock()  # one backtest at a time in this process


def device_json(dev: Device, detail: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": dev.id,
        "site": dev.site,
        "online": dev.online,
        "last_seen": rfc3339(dev.last_seen_ns) if dev.last_seen_ns else None,
    }
    if detail:
        out.update(
            kind=dev.kind,
            agent_version=dev.agent_version,
            first_seen=rfc3339(dev.first_seen_ns) if dev.first_seen_ns else None,
            metadata=dev.metadata,
            metrics=sorted(dev.metrics),
            sequence={
                "last": dev.last_seq,
                "duplicates": dev.duplicates,
                "gaps": dev.gaps,
                "missing": dev.gaps,
                "missing_seqs": sorted(dev.missing)[:100],
            },
            clock={
                "skew_s": round(dev.clock_skew_s, 3),
                "skewed": dev.clock_skewed,
                "restamped_readings": dev.restamped,
            },
            rejected_messages=dev.rejected,
        )
    return out


def _device(services: Services, device_id: str) -> Device:
    dev = services.registry.get(device_id)
    if dev is None:
        raise HTTPException(404, f"device {device_id!r} not found")
    return dev


@router.get("", summary="Devices with online state, paginated by cursor")
def list_devices(
    services: Services = Depends(get_services),
    site: str | None = Query(None, description="only devices of this site"),
    online: bool | None = Query(None, description="only online (true) or offline (false) devices"),
    limit: int | None = Query(None, ge=1, le=100_000, description="page size (default 1000)"),
    cursor: str | None = Query(None, description="the `next` value of the previous page"),
) -> dict[str, Any]:
    size = limit or services.settings.api.page_size
    devices = services.registry.page(site=site, online=online, after=cursor, limit=size + 1)
    page = devices[:size]
    nxt = page[-1].id if len(devices) > size else None
    return {"devices": [device_json(d) for d in page], "next": nxt}


@router.get("/{device_id}", summary="One device with its metrics, sequence and clock state")
def get_device(device_id: str, services: Services = Depends(get_services)) -> dict[str, Any]:
    return device_json(_device(services, device_id), detail=True)


@router.get(
    "/{device_id}/detection",
    summary="What anomaly detection does for this device: matching rules, settings, progress",
)
def device_detection(device_id: str, services: Services = Depends(get_services)) -> dict[str, Any]:
    dev = _device(services, device_id)
    engine = services.anomalies.detector
    if not isinstance(engine, DescribesDevices):
        raise HTTPException(404, f"anomaly detection is off ({services.anomalies.off_reason})")
    shard = _scored_here(services, dev.id)
    found = engine.describe(dev.id, dev.kind, dev.metrics)
    found["shard"] = {"shard": shard.index, "shards": shard.count}
    found["behind"] = services.anomalies.behind_of(dev.id)
    now = time.time_ns()
    found["maintenance"] = [
        w.to_json(now) for w in services.anomalies.maintenance.of(dev.id) if w.end_ns > now
    ]
    return found


def _scored_here(services: Services, device: str) -> Shard:
    """This worker's detection shard, or a 404 naming the one that scores ``device``."""
    shard = detection_shard(services.settings)
    if not shard.owns(device):
        from millstream_cloud.detection.engine import device_partition

        theirs = device_partition(device, shard.count)
        raise HTTPException(
            404,
            f"device {device!r} is scored by detection shard {theirs} of {shard.count}, "
            f"another worker (this one scores shard {shard.index}); ask that worker",
        )
    return shard


@router.post(
    "/{device_id}/detection/relearn",
    summary="Forget what normal looked like for this device and learn it again (write scope)",
)
def relearn_device(device_id: str, services: Services = Depends(get_services)) -> dict[str, Any]:
    """For a machine that now runs at a new normal (after a repair, a new tool, a changed
    recipe): its detectors start learning again from the next reading and raise nothing
    until their warm-up is over. Open alerts resolve as usual; the moment is recorded in
    ``detection_events`` (shown on the device dashboard)."""
    dev = _device(services, device_id)
    if services.anomalies.detector is not None:
        _scored_here(services, dev.id)
    try:
        forgot = services.anomalies.relearn(dev.id, dev.site)
    except LookupError:
        raise HTTPException(
            404, f"anomaly detection is off ({services.anomalies.off_reason})"
        ) from None
    return {"device": dev.id, "relearning": True, "forgot": forgot}


class Maintenance(BaseModel):
    """A maintenance window: what the device's detectors raise in it is kept as expected."""

    model_config = ConfigDict(extra="forbid")

    start: str | None = Field(
        None, description="RFC 3339 or relative to now (now-1h); default: now"
    )
    end: str | None = Field(
        None, description="RFC 3339 or relative to now (now+2h), or give duration"
    )
    duration: str | None = Field(None, description="instead of end: 30m, 2h, 1d")
    comment: str = Field("", max_length=1000, description="what is being done")
    author: str = Field("", max_length=200)
    silence_alerts: bool = Field(
        True, description="also silence the device's alerts for the window (an alert silence)"
    )
    repeat: str | None = Field(
        None,
        max_length=500,
        description="daily, weekly, monthly or an RFC 5545 RRULE (FREQ=MONTHLY;BYDAY=1MO: "
        "the first Monday of each month): the window recurs at the same wall-clock time",
    )
    timezone: str = Field("UTC", description="with repeat: the IANA time zone of that time")
    until: str | None = Field(None, description="with repeat: no occurrence starts at or after")


class MaintenanceChange(BaseModel):
    """A window's new end (the work takes longer, or less long) or comment; a schedule's
    occurrences' duration, comment or until, from now on."""

    model_config = ConfigDict(extra="forbid")

    end: str | None = Field(
        None, description="RFC 3339 or relative to now (now+2h), still ahead, or give duration"
    )
    duration: str | None = Field(
        None, description="instead of end: from the window's start (a schedule's occurrences')"
    )
    comment: str | None = Field(None, max_length=1000)
    until: str | None = Field(
        None, description="a schedule's: no occurrence starts at or after; null: for good"
    )

    def parsed(self) -> tuple[int | None, int | None, int | None, bool]:
        """(end_ns, duration_ns, until_ns, whether until was given). Raises ValueError
        (MaintenanceError naming the field) for a change that cannot be read."""
        set_until = "until" in self.model_fields_set
        if self.end is not None and self.duration is not None:
            raise MaintenanceError("end", "give either end or duration")
        if self.end is None and self.duration is None and self.comment is None and not set_until:
            raise MaintenanceError("end", "give end, duration, comment or until")
        end_ns = parse_time_ns(self.end) if self.end is not None else None
        duration_ns = parse_duration_ns(self.duration) if self.duration is not None else None
        until_ns = parse_time_ns(self.until) if self.until is not None else None
        return end_ns, duration_ns, until_ns, set_until


def _detection_here(services: Services, device_id: str) -> Device:
    """The device, when this worker runs its detectors: 404 otherwise (detection off,
    or another shard's device)."""
    dev = _device(services, device_id)
    if services.anomalies.detector is None:
        raise HTTPException(404, f"anomaly detection is off ({services.anomalies.off_reason})")
    _scored_here(services, dev.id)
    return dev


def maintenance_json(services: Services, item: Any, now: int) -> dict[str, Any]:
    """A window's JSON (``cancelled`` for one ended before it began), or a schedule's with
    its occurrences kept."""
    if isinstance(item, MaintenanceSchedule):
        return item.to_json(now, services.anomalies.maintenance.occurrences(item))
    out: dict[str, Any] = item.to_json(now)
    if item.end_ns == item.start_ns:
        out["state"] = "cancelled"
    return out


@router.post(
    "/{device_id}/detection/maintenance",
    status_code=201,
    summary="Set a maintenance window, once or recurring: what the device's detectors raise "
    "in it is kept as expected, not alerted (write scope)",
)
def start_maintenance(
    device_id: str, body: Maintenance, services: Services = Depends(get_services)
) -> dict[str, Any]:
    """For planned work on the machine (a repair, a tool change, a cleaning): its
    detectors run as usual, and what they raise in the window is stored with the verdict
    ``expected`` instead of being alerted; a sensor still stuck after it is reported
    again. With ``silence_alerts`` (the default) the device's alerts are silenced for the
    window too. Marked in ``detection_events`` (the device dashboard). With ``repeat``
    (daily, weekly) the window recurs at the same time in ``timezone`` until ``until``
    (or it is deleted): the answer is the schedule, its ``next`` occurrence included."""
    dev = _detection_here(services, device_id)
    try:
        item = create_maintenance(services, dev, body, time.time_ns())
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    return maintenance_json(services, item, time.time_ns())


def maintenance_span(body: Maintenance, now: int) -> tuple[int, int, int | None]:
    """The (first) window's start and end and the schedule's ``until`` that ``body``
    asks for. Raises ValueError (MaintenanceError naming the field) for a bad body."""
    if (body.end is None) == (body.duration is None):
        raise MaintenanceError("end", "give either end or duration")
    if body.repeat is None and (body.until is not None or body.timezone != "UTC"):
        raise MaintenanceError("repeat", "until and timezone are for a recurring window")
    start_ns = parse_time_ns(body.start, now) if body.start else now
    if body.end is not None:
        end_ns = parse_time_ns(body.end, now)
    else:
        assert body.duration is not None
        end_ns = start_ns + parse_duration_ns(body.duration)
    return start_ns, end_ns, parse_time_ns(body.until, now) if body.until else None


def create_maintenance(
    services: Services, dev: Device, body: Maintenance, now: int, group: str | None = None
) -> Any:
    """Set the window or schedule ``body`` asks for on ``dev``. Raises ValueError
    (MaintenanceError naming the field) for one that cannot be set."""
    sink = services.anomalies
    start_ns, end_ns, until_ns = maintenance_span(body, now)
    if body.repeat is None:
        return sink.start_maintenance(
            dev.id, dev.site, start_ns, end_ns, body.comment, body.author,
            body.silence_alerts, group,
        )  # fmt: skip
    return sink.schedule_maintenance(
        dev.id, dev.site, start_ns, end_ns, body.repeat, body.timezone, until_ns,
        body.comment, body.author, body.silence_alerts, group,
    )  # fmt: skip


@router.get(
    "/{device_id}/detection/maintenance",
    summary="The device's maintenance windows (scheduled, active and ended in the last 30 "
    "days) and recurring schedules",
)
def list_maintenance(device_id: str, services: Services = Depends(get_services)) -> dict[str, Any]:
    dev = _detection_here(services, device_id)
    now = time.time_ns()
    book = services.anomalies.maintenance
    return {
        "maintenance": [w.to_json(now) for w in book.of(dev.id)],
        "schedules": [maintenance_json(services, s, now) for s in book.schedules_of(dev.id)],
    }


@router.delete(
    "/{device_id}/detection/maintenance/{window_id}",
    summary="End a maintenance window now (a scheduled one is cancelled), or stop a recurring "
    "schedule (write scope)",
)
def end_maintenance(
    device_id: str, window_id: str, services: Services = Depends(get_services)
) -> dict[str, Any]:
    """A window's id ends that window only (one occurrence of a schedule is skipped, the
    schedule goes on); a schedule's id stops it, ending its occurrence under way."""
    dev = _detection_here(services, device_id)
    try:
        item = services.anomalies.end_maintenance(dev.id, window_id)
    except KeyError:
        raise HTTPException(
            404, f"no maintenance window {window_id!r} on device {dev.id!r}"
        ) from None
    return maintenance_json(services, item, time.time_ns())


@router.patch(
    "/{device_id}/detection/maintenance/{window_id}",
    summary="Move a maintenance window's end or change its comment, or change a recurring "
    "schedule from now on (write scope)",
)
def change_maintenance(
    device_id: str,
    window_id: str,
    body: MaintenanceChange,
    services: Services = Depends(get_services),
) -> dict[str, Any]:
    """The window's end moves (longer or shorter, still ahead; at most 31 days from its
    start), its annotation and alert silence follow (the silence replaced, as Alertmanager
    updates one: a new id). One occurrence of a schedule is changed by its window's id. A
    schedule's id changes the schedule from now on: ``duration`` each occurrence's length
    (the ones not begun), ``comment`` (its occurrences' not ended too), ``until`` when it
    stops (``null``: never; the occurrence set ahead cancelled if it starts at or after)."""
    dev = _detection_here(services, device_id)
    try:
        end_ns, duration_ns, until_ns, set_until = body.parsed()
        item = services.anomalies.change_maintenance(
            dev.id, window_id, end_ns, body.comment, duration_ns, until_ns, set_until
        )
    except KeyError:
        raise HTTPException(
            404, f"no maintenance window {window_id!r} on device {dev.id!r}"
        ) from None
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    return maintenance_json(services, item, time.time_ns())


class Backtest(BaseModel):
    """What-if settings for a backtest; everything left out is the service's own."""

    model_config = ConfigDict(extra="forbid")

    start: str | None = Field(
        None, description="RFC 3339 or relative to now (now-1h); default: end - 1d"
    )
    end: str | None = Field(None, description="RFC 3339 or relative to now (now-1h); default: now")
    learn: str = Field("1d", description="history before start the engine learns from")
    engine: dict[str, Any] = Field(
        default_factory=dict, description="overrides merged over detection.engine"
    )
    rules: list[dict[str, Any]] | None = Field(
        None, description="replaces detection.rules (default: the service's rules)"
    )
    tolerance: str = Field("10m", description="how near a label an anomaly must be")
    max_readings: int = Field(2_000_000, ge=1, le=50_000_000)


@router.post(
    "/{device_id}/detection/backtest",
    summary="What detection (with proposed settings) would have raised on stored history",
    openapi_extra=needs_scope("read"),
)
def backtest_device(
    device_id: str, body: Backtest, services: Services = Depends(get_services)
) -> dict[str, Any]:
    """A fresh engine with the service's settings and the body's overrides learns from
    ``learn`` of history before ``start`` and is scored on ``start``..``end``; its
    anomalies are set against the operators' verdicts and missed-fault reports there.
    Nothing is stored; the live detectors are not touched (docs/detection.md)."""
    from millstream_cloud.detection.backtest import (
        BacktestRequest,
        ReplayFailed,
        TooManyReadings,
        backtest,
    )
    from millstream_cloud.detection.engine import check_rules, settings_from_mapping
    from millstream_cloud.detection.rules import parse_rules

    dev = _device(services, device_id)
    try:
        end_ns = parse_time_ns(body.end) if body.end else time.time_ns()
        start_ns = parse_time_ns(body.start) if body.start else end_ns - parse_duration_ns("1d")
        learn_ns = parse_duration_ns(body.learn) if body.learn not in ("0", "0s") else 0
        tolerance_ns = parse_duration_ns(body.tolerance)
        if end_ns <= start_ns:
            raise ValueError(f"end {rfc3339(end_ns)} is not after start {rfc3339(start_ns)}")
        req = BacktestRequest(
            dev.id,
            dev.site,
            dev.kind,
            start_ns,
            end_ns,
            start_ns - learn_ns,
            # parsed here, so a bad key or rule is a 422 that names it
            settings_from_mapping({**services.settings.detection.engine, **body.engine}),
            parse_rules(services.settings.detection.rules if body.rules is None else body.rules),
            tolerance_ns,
            body.max_readings,
            [(w.start_ns, w.end_ns) for w in services.anomalies.maintenance.of(dev.id)],
        )
        check_rules(req.engine, req.rules)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    if not BACKTEST_LOCK.acquire(blocking=False):  # one at a time: each holds a core throughout
        raise HTTPException(429, "a backtest is already running; try again when it has finished")
    try:
        return backtest(services.storage, req)
    except TooManyReadings as exc:
        raise HTTPException(413, str(exc)) from None
    except ReplayFailed as exc:
        raise HTTPException(422, str(exc)) from None
    finally:
        BACKTEST_LOCK.release()


@router.get("/{device_id}/latest", summary="The newest reading of every metric")
def latest(device_id: str, services: Services = Depends(get_services)) -> dict[str, Any]:
    _device(services, device_id)
    values = services.storage.latest(TELEMETRY, {"device": device_id})
    return {
        "device": device_id,
        "metrics": {m: {"time": rfc3339(t), "value": v} for m, (t, v) in sorted(values.items())},
    }


@router.get("/{device_id}/telemetry", summary="A time range of one or more metrics")
def telemetry(
    device_id: str,
    services: Services = Depends(get_services),
    metric: list[str] = Query(..., description="metric name; repeat for several"),
    start: str | None = Query(
        None, description="RFC 3339 or relative to now (now-1h), inclusive (default: end - 1h)"
    ),
    end: str | None = Query(
        None, description="RFC 3339 or relative to now (now-1h), exclusive (default: now)"
    ),
    every: str | None = Query(None, description="bucket width: 10s, 1m, 1h, 1d"),
    agg: str | None = Query(
        None, description="mean, min, max, last or count (default mean with every)"
    ),
    limit: int | None = Query(
        None, ge=1, le=1_000_000, description="at most this many points per metric"
    ),
) -> Any:
    _device(services, device_id)
    try:
        end_ns = parse_time_ns(end) if end else time.time_ns() + 1
        start_ns = parse_time_ns(start) if start else end_ns - DEFAULT_RANGE_NS
        every_ns = parse_duration_ns(every) if every else None
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    if start_ns >= end_ns:
        raise HTTPException(422, "start must be before end")
    if agg is not None and agg not in AGGREGATES:
        raise HTTPException(422, f"agg must be one of {', '.join(AGGREGATES)}")
    if every_ns and agg is None:
        agg = "mean"
    series = services.storage.query(
        SeriesQuery(
            TELEMETRY, metric, {"device": device_id}, start_ns, end_ns, every_ns, agg, limit=limit
        )
    )
    by_field = {s.field: s.points for s in series}
    results = [
        {
            "device": device_id,
            "metric": m,
            "points": [{"time": rfc3339(t), "value": v} for t, v in by_field.get(m, [])],
        }
        for m in metric
    ]
    return results[0] if len(results) == 1 else results
