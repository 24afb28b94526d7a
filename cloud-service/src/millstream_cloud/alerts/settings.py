"""Alerting settings: the ``alerts:`` section of the service settings.

Routing, receivers and inhibition use Alertmanager's names and shapes, so an ops team can
read them as they read an ``alertmanager.yml``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from millstream_cloud.alerts.labels import parse_duration, parse_matchers
from millstream_cloud.alerts.timeintervals import parse_interval


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


def _duration(v: Any) -> str:
    parse_duration(v)
    return str(v)


class RouteConfig(_Section):
    receiver: str | None = Field(None, description="receiver name (inherited when omitted)")
    matchers: list[str] = Field(
        default_factory=list, description='label matchers: =, !=, =~, !~ (e.g. severity="critical")'
    )
    group_by: list[str] | None = Field(
        None, description="labels that split alerts into groups; ['...'] groups by all labels"
    )
    group_wait: str | None = Field(None, description="wait before a new group's first notification")
    group_interval: str | None = Field(None, description="wait before notifying a group's changes")
    repeat_interval: str | None = Field(None, description="re-send an unchanged firing group")
    continue_: bool = Field(
        False, alias="continue", description="keep matching sibling routes after this one"
    )
    mute_time_intervals: list[str] = Field(
        default_factory=list,
        description="names of time_intervals when this route sends nothing (not inherited)",
    )
    active_time_intervals: list[str] = Field(
        default_factory=list,
        description="names of time_intervals outside which this route sends nothing "
        "(none: always; not inherited)",
    )
    routes: list[RouteConfig] = Field(default_factory=list)

    @field_validator("matchers")
    @classmethod
    def _matchers(cls, v: list[str]) -> list[str]:
        parse_matchers(v)
        return v

    @field_validator("group_wait", "group_interval", "repeat_interval")
    @classmethod
    def _durations(cls, v: Any) -> str | None:
        return None if v is None else _duration(v)


class ReceiverConfig(_Section):
    """A name and its integrations: ``webhook_configs``, ``email_configs``,
    ``apprise_configs``, ``mqtt_configs``, ``alertmanager_configs``, ``logfile_configs``."""

    model_config = ConfigDict(extra="allow")
    name: str

    @model_validator(mode="after")
    def _integrations(self) -> ReceiverConfig:
        from millstream_cloud.alerts.notifiers.base import notifier_types

        types = notifier_types()
        for key, items in (self.model_extra or {}).items():
            kind = key.removesuffix("_configs")
            if not key.endswith("_configs") or kind not in types:
                known = ", ".join(f"{k}_configs" for k in sorted(types))
                raise ValueError(f"{key}: unknown key; a receiver has name and {known}")
            if not isinstance(items, list):
                raise ValueError(f"{key}: must be a list")
            for i, item in enumerate(items):
                try:
                    types[kind].Config.model_validate(item)
                except Exception as exc:
                    errors = getattr(exc, "errors", None)
                    if callable(errors):
                        msgs = [
                            f"{key}[{i}].{'.'.join(str(p) for p in e['loc'])}: "
                            + ("unknown key" if e["type"] == "extra_forbidden" else e["msg"])
                            for e in errors()
                        ]
                        raise ValueError("; ".join(msgs)) from None
                    raise ValueError(f"{key}[{i}]: {exc}") from None
        return self

    def integrations(self) -> list[tuple[str, dict[str, Any]]]:
        """(notifier name, its raw config) in order."""
        out = []
        for key, items in (self.model_extra or {}).items():
            for item in items:
                out.append((key.removesuffix("_configs"), item))
        return out


class InhibitRuleConfig(_Section):
    source_matchers: list[str] = Field(..., min_length=1)
    target_matchers: list[str] = Field(..., min_length=1)
    equal: list[str] = Field(default_factory=list, description="labels both must share")

    @field_validator("source_matchers", "target_matchers")
    @classmethod
    def _matchers(cls, v: list[str]) -> list[str]:
        parse_matchers(v)
        return v


class TimeRangeConfig(_Section):
    start_time: str = Field(description="HH:MM, included")
    end_time: str = Field(description="HH:MM, excluded (24:00 allowed)")


class TimeIntervalConfig(_Section):
    """Every field given must match (all of them left out: always)."""

    times: list[TimeRangeConfig] = Field(default_factory=list)
    weekdays: list[str] = Field(default_factory=list, description="monday:friday, saturday")
    days_of_month: list[str] = Field(default_factory=list, description="1:7, -1 (the last)")
    months: list[str] = Field(default_factory=list, description="january:march, 12")
    years: list[str] = Field(default_factory=list, description="2026:2027")
    location: str = Field("UTC", description="IANA time zone the fields are read in")

    @model_validator(mode="after")
    def _parses(self) -> TimeIntervalConfig:
        parse_interval(self.model_dump())
        return self


class NamedTimeIntervalConfig(_Section):
    name: str = Field(min_length=1)
    time_intervals: list[TimeIntervalConfig] = Field(
        default_factory=list, description="the interval holds when any of these does"
    )


class DeliverySettings(_Section):
    max_attempts: int = Field(8, ge=1, description="attempts per notification before giving up")
    backoff_initial_s: float = Field(0.5, gt=0, description="first retry delay; doubles each time")
    backoff_max_s: float = Field(30.0, gt=0, description="longest retry delay")
    timeout_s: float = Field(10.0, gt=0, description="per-attempt network timeout")


def _default_route() -> RouteConfig:
    return RouteConfig(
        receiver="log",
        group_by=["alertname", "site"],
        group_wait="30s",
        group_interval="5m",
        repeat_interval="4h",
    )


def _default_receivers() -> list[ReceiverConfig]:
    return [
        ReceiverConfig.model_validate({"name": "log", "logfile_configs": [{"path": "alerts.log"}]})
    ]


def _default_inhibit() -> list[InhibitRuleConfig]:
    return [
        InhibitRuleConfig(
            source_matchers=['alertname="SiteOffline"'],
            target_matchers=['alertname!="SiteOffline"'],
            equal=["site"],
        ),
        InhibitRuleConfig(
            source_matchers=['alertname="DeviceOffline"'],
            target_matchers=['alertname!~"DeviceOffline|SiteOffline"'],
            equal=["device"],
        ),
    ]


class AlertSettings(_Section):
    enabled: bool = Field(True, description="evaluate rules and send notifications")
    rule_files: list[str] = Field(
        default_factory=lambda: ["default"],
        description="YAML rule files; 'default' is the packaged demo set",
    )
    tick_interval_s: float = Field(
        1.0, gt=0, description="how often time-based rules and group timers are evaluated"
    )
    external_url: str = Field(
        "http://127.0.0.1:8000",
        description="this service's URL, put into notifications; unset: the API's own "
        "address (http://<api.host>:<api.port>, a wildcard bind named by the host name)",
    )
    grafana_url: str | None = Field(
        None,
        pattern=r"^https?://",
        description="Grafana's address as the alerts' readers open it; set, an alert about "
        "a device links its dashboard around the alert's start (annotation dashboard_url)",
    )
    webhook: str | None = Field(
        None,
        pattern=r"^https?://",
        description="shortcut (the demo's WEBHOOK=): also POST the top-level route's "
        "notifications to this URL, in Alertmanager's webhook format",
    )
    resolved_retention: str = Field(
        "1h", description="resolved alerts stay listed (and restorable) this long"
    )
    history_max: int = Field(100_000, ge=100, description="alert events kept in the history")
    route: RouteConfig = Field(default_factory=_default_route)
    time_intervals: list[NamedTimeIntervalConfig] = Field(
        default_factory=list,
        description="named recurring times for routes' mute_time_intervals and "
        "active_time_intervals (Alertmanager's time_intervals)",
    )
    receivers: list[ReceiverConfig] = Field(default_factory=_default_receivers)
    inhibit_rules: list[InhibitRuleConfig] = Field(default_factory=_default_inhibit)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)

    @field_validator("rule_files", mode="before")
    @classmethod
    def _rule_files(cls, v: Any) -> Any:
        # From the environment: MILLSTREAM_ALERTS__RULE_FILES=default,/etc/millstream/plant.yaml
        if isinstance(v, str):
            return [p.strip() for p in v.split(",") if p.strip()]
        return v

    @field_validator("resolved_retention")
    @classmethod
    def _retention(cls, v: Any) -> str:
        return _duration(v)

    @model_validator(mode="after")
    def _references(self) -> AlertSettings:
        names = [r.name for r in self.receivers]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"receivers: duplicate name {sorted(dupes)[0]!r}")
        if not self.route.receiver:
            raise ValueError("route.receiver: the top-level route needs a receiver")
        times = [t.name for t in self.time_intervals]
        dupes = {n for n in times if times.count(n) > 1}
        if dupes:
            raise ValueError(f"time_intervals: duplicate name {sorted(dupes)[0]!r}")
        if self.route.mute_time_intervals or self.route.active_time_intervals:
            raise ValueError(
                "route: the top-level route cannot have mute_time_intervals or "
                "active_time_intervals (give them to a child route)"
            )

        def walk(route: RouteConfig, path: str) -> None:
            if route.receiver and route.receiver not in names:
                raise ValueError(
                    f"{path}.receiver: no receiver named {route.receiver!r} "
                    f"(receivers: {', '.join(names) or 'none'})"
                )
            for key in ("mute_time_intervals", "active_time_intervals"):
                for name in getattr(route, key):
                    if name not in times:
                        raise ValueError(
                            f"{path}.{key}: no time interval named {name!r} "
                            f"(time_intervals: {', '.join(times) or 'none'})"
                        )
            for i, child in enumerate(route.routes):
                walk(child, f"{path}.routes[{i}]")

        walk(self.route, "route")
        return self
