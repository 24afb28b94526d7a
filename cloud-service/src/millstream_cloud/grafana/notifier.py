"""Anomalies and alerts as Grafana annotations, for the live path.

* :class:`GrafanaNotifier` is an alert notifier (registered as ``grafana``): each alert
  of a notification becomes an annotation; a resolved alert spans its firing period.
  Receiver configuration::

      receivers:
        - name: grafana
          grafana:
            url: http://grafana:3000
            token: glsa_...            # service account token (Editor)
            dashboard_uid: null        # null: organisation-wide annotations

* :class:`AnomalyAnnotator` has ``annotate(anomaly)`` for the detection output; it never
  raises (a Grafana outage must not stop detection), it logs and counts failures.
"""

from __future__ import annotations

import logging

from grafana_client.client import (
    GrafanaBadInputError,
    GrafanaClientError,
    GrafanaException,
    GrafanaUnauthorizedError,
)
from pydantic import Field

from millstream_cloud.alerts.notifiers.base import (
    DeliveryError,
    Notification,
    Notifier,
    NotifierConfig,
    NotifierContext,
    register,
)
from millstream_cloud.grafana.provisioner import Provisioner
from millstream_cloud.model import Anomaly

log = logging.getLogger("millstream.grafana.annotations")


class GrafanaNotifierConfig(NotifierConfig):
    url: str = Field(..., pattern=r"^https?://", description="Grafana base URL")
    token: str | None = Field(None, description="service account token, or user:password")
    dashboard_uid: str | None = Field(
        None, description="annotate this dashboard only; default: organisation-wide"
    )
    timeout_s: float | None = Field(None, gt=0)


@register("grafana")
class GrafanaNotifier(Notifier):
    Config = GrafanaNotifierConfig
    config: GrafanaNotifierConfig

    def __init__(self, config: GrafanaNotifierConfig, context: NotifierContext) -> None:
        super().__init__(config, context)
        self._grafana = Provisioner.connect(
            config.url, config.token, timeout=config.timeout_s or context.timeout_s
        )

    def notify(self, notification: Notification) -> None:
        for alert in notification.alerts:
            labels = dict(alert.labels)
            summary = alert.annotations.get("summary") or alert.annotations.get("description", "")
            resolved = alert.status == "resolved"
            try:
                self._grafana.annotate(
                    f"[{alert.status.upper()}] {labels.get('alertname', 'alert')}: {summary}",
                    alert.starts_at // 1_000_000,
                    ["millstream", "alert", f"state:{alert.status}"]
                    + [f"{k}:{v}" for k, v in sorted(labels.items())],
                    time_end_ms=alert.ends_at // 1_000_000 if resolved and alert.ends_at else None,
                    dashboard_uid=self.config.dashboard_uid,
                )
            except (GrafanaBadInputError, GrafanaUnauthorizedError) as exc:
                raise DeliveryError(f"grafana {self.config.url}: {exc}", retry=False) from None
            except GrafanaClientError as exc:
                retry = getattr(exc, "status_code", 0) in (408, 429)
                raise DeliveryError(f"grafana {self.config.url}: {exc}", retry=retry) from None
            except GrafanaException as exc:  # 5xx, timeouts
                raise DeliveryError(f"grafana {self.config.url}: {exc}") from None
            except OSError as exc:  # connection refused, DNS: the HTTP library's errors
                raise DeliveryError(f"grafana {self.config.url}: {exc}") from None


class AnomalyAnnotator:
    """``annotate(anomaly)``: one Grafana annotation per anomaly, best effort."""

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 5.0) -> None:
        self._grafana = Provisioner.connect(url, token, timeout=timeout_s)
        self.posted = 0
        self.failed = 0

    def annotate(self, anomaly: Anomaly) -> int | None:
        try:
            ann_id = self._grafana.annotate_anomaly(anomaly)
        except Exception as exc:
            self.failed += 1
            log.warning(
                "grafana annotation of anomaly on %s/%s failed: %s",
                anomaly.device, anomaly.metric or "device", exc,
            )  # fmt: skip
            return None
        self.posted += 1
        return ann_id
