"""Alerts, their history and acknowledgement; rules (CRUD); silences (create, list, expire).

Shapes follow Alertmanager's API v2 where it has one (alerts' ``status.silencedBy`` and
``inhibitedBy``, silences' ``matchers``, ``startsAt``, ``endsAt``, ``createdBy``,
``comment``). Validation errors are 422 with ``detail: [{field, message}]``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends, HTTPException, Query
from fastapi.responses import JSONResponse

from millstream_cloud.alerts.rules import RuleError
from millstream_cloud.alerts.service import AlertService, RuleConflict
from millstream_cloud.alerts.silences import SilenceError
from millstream_cloud.api.deps import get_services
from millstream_cloud.services import Services
from millstream_cloud.timeutil import parse_time_ns, rfc3339

alerts_router = APIRouter(prefix="/api/v1/alerts", tags=["alerts"])
rules_router = APIRouter(prefix="/api/v1/rules", tags=["alerts"])
silences_router = APIRouter(prefix="/api/v1/silences", tags=["alerts"])

STATES = ("pending", "firing", "resolved")


def get_alerts(services: Services = Depends(get_services)) -> AlertService:
    svc = getattr(services, "alerts", None) or services.extras.get("alerts")
    if not isinstance(svc, AlertService):
        raise HTTPException(503, "alerting is not enabled in this service")
    return svc


def invalid(errors: list[tuple[str, str]]) -> JSONResponse:
    return JSONResponse(
        {
            "error": "; ".join(f"{f}: {m}" if f else m for f, m in errors),
            "detail": [{"field": f, "message": m} for f, m in errors],
        },
        status_code=422,
    )


def _time(value: str | None, field: str) -> int | None:
    if value is None:
        return None
    try:
        return parse_time_ns(value)
    except ValueError as exc:
        raise HTTPException(422, {"field": field, "message": str(exc)}) from None


# alerts
@alerts_router.get("", summary="Alerts with state, labels, annotations and mute status")
def list_alerts(
    svc: AlertService = Depends(get_alerts),
    state: str | None = Query(None, description="pending, firing or resolved"),
    filter: list[str] = Query([], description='label matcher, e.g. site="plant-a"; repeatable'),
    silenced: bool | None = Query(None),
    inhibited: bool | None = Query(None),
    acknowledged: bool | None = Query(None),
) -> Any:
    if state is not None and state not in STATES:
        return invalid([("state", f"must be one of {', '.join(STATES)}")])
    try:
        alerts = svc.list_alerts(state, filter, silenced, inhibited, acknowledged)
    except ValueError as exc:
        return invalid([("filter", str(exc))])
    return {"alerts": alerts}


@alerts_router.get("/history", summary="Alert events: pending, firing, resolved, notified, ...")
def history(
    svc: AlertService = Depends(get_alerts),
    fingerprint: str | None = Query(None),
    alertname: str | None = Query(None),
    event: str | None = Query(
        None, description="pending, firing, resolved, inactive, notified, acknowledged"
    ),
    since: str | None = Query(None, description="RFC 3339 or relative to now (now-1h), inclusive"),
    until: str | None = Query(None, description="RFC 3339 or relative to now (now-1h), exclusive"),
    limit: int = Query(1000, ge=1, le=100_000),
) -> Any:
    since_ns, until_ns = _time(since, "since"), _time(until, "until")
    if since_ns is not None and until_ns is not None and until_ns < since_ns:
        # Refused rather than answered with no events, which reads as "nothing happened".
        raise HTTPException(422, {"field": "until", "message": f"{until} is before since {since}"})
    rows = svc.history(
        fingerprint=fingerprint,
        alertname=alertname,
        event=event,
        since=since_ns,
        until=until_ns,
        limit=limit,
    )
    return {"events": [{**r, "time": rfc3339(r["time"])} for r in rows]}


@alerts_router.get("/groups", summary="Alert groups as the dispatcher holds them")
def groups(svc: AlertService = Depends(get_alerts)) -> Any:
    with svc.lock:
        out = [
            {
                "groupKey": g.key,
                "receiver": g.route.receiver,
                "labels": g.labels,
                "alerts": sorted(g.alerts),
                "nextFlush": rfc3339(g.next_flush),
            }
            for g in svc.dispatcher.groups.values()
        ]
    return {"groups": out}


@alerts_router.get("/{fingerprint}", summary="One alert")
def get_alert(fingerprint: str, svc: AlertService = Depends(get_alerts)) -> Any:
    alert = svc.get_alert(fingerprint)
    if alert is None:
        raise HTTPException(404, f"no alert with fingerprint {fingerprint!r}")
    return alert


@alerts_router.post(
    "/{fingerprint}/ack", summary="Acknowledge: no reminders; resolution still sent"
)
def ack(
    fingerprint: str,
    svc: AlertService = Depends(get_alerts),
    body: dict[str, Any] = Body(
        default_factory=dict, examples=[{"by": "maria", "comment": "on it"}]
    ),
) -> Any:
    by = str(body.get("by") or body.get("createdBy") or "").strip()
    if not by:
        return invalid([("by", "who acknowledges is required")])
    try:
        alert = svc.acknowledge(fingerprint, by, str(body.get("comment", "")))
    except ValueError as exc:
        raise HTTPException(409, str(exc)) from None
    if alert is None:
        raise HTTPException(404, f"no alert with fingerprint {fingerprint!r}")
    return alert


@alerts_router.delete("/{fingerprint}/ack", summary="Withdraw an acknowledgement")
def unack(fingerprint: str, svc: AlertService = Depends(get_alerts)) -> Any:
    alert = svc.unacknowledge(fingerprint)
    if alert is None:
        raise HTTPException(404, f"no alert with fingerprint {fingerprint!r}")
    return alert


# rules
@rules_router.get("", summary="All rules, from files and from the API")
def list_rules(svc: AlertService = Depends(get_alerts)) -> Any:
    return {"rules": svc.rules()}


@rules_router.get("/{name}", summary="One rule")
def get_rule(name: str, svc: AlertService = Depends(get_alerts)) -> Any:
    rule = svc.rule(name)
    if rule is None:
        raise HTTPException(404, f"no rule named {name!r}")
    return rule


def _put(svc: AlertService, body: Any, create: bool, name: str | None = None) -> Any:
    if not isinstance(body, dict):
        return invalid([("", "the body must be a JSON object (one rule)")])
    body = {k: v for k, v in body.items() if k != "source"}
    try:
        return svc.put_rule(body, create=create, name=name)
    except RuleError as exc:
        return invalid(exc.errors)
    except RuleConflict as exc:
        raise HTTPException(409, str(exc)) from None
    except KeyError:
        raise HTTPException(404, f"no rule named {name!r} created through the API") from None


@rules_router.post("", status_code=201, summary="Create a rule (errors name the field)")
def create_rule(body: Any = Body(...), svc: AlertService = Depends(get_alerts)) -> Any:
    return _put(svc, body, create=True)


@rules_router.put("/{name}", summary="Replace a rule created through the API")
def replace_rule(name: str, body: Any = Body(...), svc: AlertService = Depends(get_alerts)) -> Any:
    return _put(svc, body, create=False, name=name)


@rules_router.delete("/{name}", status_code=204, summary="Delete a rule created through the API")
def delete_rule(name: str, svc: AlertService = Depends(get_alerts)) -> None:
    try:
        svc.delete_rule(name)
    except RuleConflict as exc:
        raise HTTPException(409, str(exc)) from None
    except KeyError:
        raise HTTPException(404, f"no rule named {name!r} created through the API") from None


# silences
@silences_router.get("", summary="Silences, newest state first")
def list_silences(
    svc: AlertService = Depends(get_alerts),
    state: str | None = Query(None, description="pending, active or expired"),
) -> Any:
    rows = [svc.silence_json(s) for s in svc.silences.all()]
    if state is not None:
        rows = [r for r in rows if r["status"]["state"] == state]
    return {"silences": rows}


@silences_router.get("/{silence_id}", summary="One silence")
def get_silence(silence_id: str, svc: AlertService = Depends(get_alerts)) -> Any:
    s = svc.silences.get(silence_id)
    if s is None:
        raise HTTPException(404, f"no silence {silence_id!r}")
    return svc.silence_json(s)


@silences_router.post("", status_code=201, summary="Create (or, with id, replace) a silence")
def create_silence(
    svc: AlertService = Depends(get_alerts),
    body: dict[str, Any] = Body(
        ...,
        examples=[
            {
                "matchers": ['site="plant-a"', 'alertname=~"Bearing.*"'],
                "startsAt": "2026-01-31T08:00:00Z",
                "endsAt": "2026-01-31T12:00:00Z",
                "createdBy": "maria",
                "comment": "bearing replacement on line 2",
            }
        ],
    ),
) -> Any:
    known = {"id", "matchers", "startsAt", "endsAt", "duration", "createdBy", "comment"}
    extra = sorted(set(body) - known)
    if extra:
        return invalid([(extra[0], "unknown field")])
    matchers = body.get("matchers")
    if not isinstance(matchers, list):
        return invalid([("matchers", "a list of matchers is required")])
    if body.get("endsAt") is None and body.get("duration") is None:
        return invalid([("endsAt", "endsAt or duration is required")])
    try:
        s = svc.create_silence(
            matchers,
            created_by=str(body.get("createdBy", "")),
            comment=str(body.get("comment", "")),
            starts_at=_time(body.get("startsAt"), "startsAt"),
            ends_at=_time(body.get("endsAt"), "endsAt"),
            duration=body.get("duration"),
            silence_id=body.get("id"),
        )
    except SilenceError as exc:
        return invalid([(exc.field, str(exc).split(": ", 1)[1])])
    except ValueError as exc:
        return invalid([("duration", str(exc))])
    return svc.silence_json(s)


@silences_router.delete("/{silence_id}", summary="Expire a silence now")
def expire_silence(silence_id: str, svc: AlertService = Depends(get_alerts)) -> Any:
    try:
        return svc.silence_json(svc.expire_silence(silence_id))
    except KeyError:
        raise HTTPException(404, f"no silence {silence_id!r}") from None


router = APIRouter()
router.include_router(alerts_router)
router.include_router(rules_router)
router.include_router(silences_router)
