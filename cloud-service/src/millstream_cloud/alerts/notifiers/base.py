"""The one interface every notifier implements, the registry of notifiers by name, and
the notification they all receive (one per alert group, Alertmanager's webhook shape)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from millstream_cloud.alerts.labels import format_duration
from millstream_cloud.timeutil import NS, rfc3339

ZERO_TIME = "0001-01-01T00:00:00Z"


@dataclass(slots=True)
class AlertSnapshot:
    """One alert as it goes out in a notification (frozen at flush time)."""

    fingerprint: str
    status: str  # firing | resolved
    labels: dict[str, str]
    annotations: dict[str, str]
    starts_at: int
    ends_at: int | None
    generator_url: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "labels": dict(self.labels),
            "annotations": dict(self.annotations),
            "startsAt": rfc3339(self.starts_at),
            "endsAt": rfc3339(self.ends_at) if self.ends_at else ZERO_TIME,
            "generatorURL": self.generator_url,
            "fingerprint": self.fingerprint,
        }


@dataclass(slots=True)
class Notification:
    receiver: str
    group_key: str
    group_labels: dict[str, str]
    alerts: list[AlertSnapshot]
    external_url: str = ""
    created_ns: int = 0  # engine time of the flush
    trace: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return "firing" if any(a.status == "firing" for a in self.alerts) else "resolved"

    @property
    def firing(self) -> list[AlertSnapshot]:
        return [a for a in self.alerts if a.status == "firing"]

    @property
    def resolved(self) -> list[AlertSnapshot]:
        return [a for a in self.alerts if a.status == "resolved"]

    def _common(self, attr: str) -> dict[str, str]:
        if not self.alerts:
            return {}
        first: dict[str, str] = dict(getattr(self.alerts[0], attr))
        for a in self.alerts[1:]:
            other = getattr(a, attr)
            first = {k: v for k, v in first.items() if other.get(k) == v}
        return first

    @property
    def common_labels(self) -> dict[str, str]:
        return self._common("labels")

    @property
    def common_annotations(self) -> dict[str, str]:
        return self._common("annotations")

    def webhook_payload(self) -> dict[str, Any]:
        """Alertmanager's webhook payload, version 4."""
        return {
            "version": "4",
            "groupKey": self.group_key,
            "truncatedAlerts": 0,
            "status": self.status,
            "receiver": self.receiver,
            "groupLabels": dict(self.group_labels),
            "commonLabels": self.common_labels,
            "commonAnnotations": self.common_annotations,
            "externalURL": self.external_url,
            "alerts": [a.to_json() for a in self.alerts],
        }

    def title(self) -> str:
        name = self.group_labels.get("alertname") or self.common_labels.get("alertname", "alerts")
        where = ", ".join(f"{k}={v}" for k, v in self.group_labels.items() if k != "alertname")
        head = f"[{self.status.upper()}"
        if self.status == "firing":
            head += f":{len(self.firing)}"
        return f"{head}] {name}" + (f" ({where})" if where else "")

    def text(self) -> str:
        lines = [self.title(), ""]
        for a in self.alerts:
            summary = a.annotations.get("summary") or a.annotations.get("description") or ""
            labels = ", ".join(f"{k}={v}" for k, v in sorted(a.labels.items()))
            lines.append(f"- {a.status}: {summary} [{labels}] since {rfc3339(a.starts_at)}")
            if a.ends_at and a.status == "resolved":
                # To the second: how long it lasted is what the reader weighs.
                lasted = format_duration((a.ends_at - a.starts_at) // NS * NS)
                lines.append(f"  resolved at {rfc3339(a.ends_at)}, after {lasted}")
            if a.annotations.get("dashboard_url"):
                lines.append(f"  dashboard: {a.annotations['dashboard_url']}")
        if self.external_url:
            lines += ["", self.external_url]
        return "\n".join(lines)


class NotifierConfig(BaseModel):
    """Options every notifier has; each notifier adds its own."""

    model_config = ConfigDict(extra="forbid")
    send_resolved: bool = Field(True, description="also notify when alerts resolve")


class Notifier:
    """Deliver one notification or raise; retries, queueing and metrics are done around it."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[NotifierConfig]] = NotifierConfig

    def __init__(self, config: Any, context: NotifierContext) -> None:
        self.config = config
        self.context = context

    def notify(self, notification: Notification) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release connections; called once at service stop."""


@dataclass
class NotifierContext:
    data_dir: Any  # pathlib.Path: where relative file paths of notifiers resolve
    timeout_s: float = 10.0


NOTIFIERS: dict[str, type[Notifier]] = {}


def register(name: str) -> Callable[[type[Notifier]], type[Notifier]]:
    def deco(cls: type[Notifier]) -> type[Notifier]:
        cls.name = name
        NOTIFIERS[name] = cls
        return cls

    return deco


def notifier_types() -> dict[str, type[Notifier]]:
    # Importing the package registers the built-in notifiers.
    import millstream_cloud.alerts.notifiers  # noqa: F401

    return NOTIFIERS


class DeliveryError(Exception):
    """A delivery attempt failed; ``retry`` False means retrying cannot help (bad config)."""

    def __init__(self, message: str, retry: bool = True) -> None:
        super().__init__(message)
        self.retry = retry
