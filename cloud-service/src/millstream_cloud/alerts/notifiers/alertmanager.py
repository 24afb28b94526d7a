"""Forward alerts to an existing Prometheus Alertmanager (POST /api/v2/alerts).

Alertmanager expects its clients to re-send active alerts (Prometheus does it every
minute), else they expire at ``endsAt``. So this notifier remembers the firing alerts it
forwarded and re-posts them every ``resend_interval`` with ``endsAt`` a few intervals
ahead; a resolved alert is posted once more with ``endsAt`` at its resolution (in the
past), which resolves it in Alertmanager. Grouping, silences and inhibition then happen
in that Alertmanager as well.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from pydantic import Field

from millstream_cloud.alerts.labels import parse_duration
from millstream_cloud.alerts.notifiers.base import (
    Notification,
    Notifier,
    NotifierConfig,
    NotifierContext,
    register,
)
from millstream_cloud.alerts.notifiers.webhook import post_json
from millstream_cloud.timeutil import rfc3339

log = logging.getLogger("millstream.alerts.alertmanager")


class AlertmanagerConfig(NotifierConfig):
    url: str = Field(..., pattern=r"^https?://", description="base URL, e.g. http://am:9093")
    resend_interval: str = Field("1m", description="re-post firing alerts this often")
    headers: dict[str, str] = Field(default_factory=dict)


@register("alertmanager")
class AlertmanagerNotifier(Notifier):
    Config = AlertmanagerConfig
    config: AlertmanagerConfig

    def __init__(self, config: AlertmanagerConfig, context: NotifierContext) -> None:
        super().__init__(config, context)
        self.endpoint = config.url.rstrip("/") + "/api/v2/alerts"
        self.resend_s = parse_duration(config.resend_interval) / 1e9
        self._firing: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _post(self, alerts: list[dict[str, Any]]) -> None:
        if alerts:
            post_json(self.endpoint, alerts, self.config.headers, self.context.timeout_s)

    def _valid_until(self) -> str:
        return rfc3339(time.time_ns() + int(4 * self.resend_s * 1e9))

    def notify(self, notification: Notification) -> None:
        out = []
        with self._lock:
            for a in notification.alerts:
                body = {
                    "labels": a.labels,
                    "annotations": a.annotations,
                    "startsAt": rfc3339(a.starts_at),
                    "generatorURL": a.generator_url or notification.external_url,
                }
                if a.status == "firing":
                    self._firing[a.fingerprint] = body
                    out.append({**body, "endsAt": self._valid_until()})
                else:
                    self._firing.pop(a.fingerprint, None)
                    out.append({**body, "endsAt": rfc3339(a.ends_at or time.time_ns())})
        self._post(out)
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._resend, name="alertmanager-resend", daemon=True
            )
            self._thread.start()

    def _resend(self) -> None:
        while not self._stop.wait(self.resend_s):
            with self._lock:
                alerts = [{**b, "endsAt": self._valid_until()} for b in self._firing.values()]
            try:
                self._post(alerts)
            except Exception as exc:
                log.warning(
                    "re-sending %d alerts to %s failed: %s", len(alerts), self.endpoint, exc
                )

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
