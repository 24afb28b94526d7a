"""Alerting metrics, registered in the service's own Prometheus registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class AlertMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.registry = r
        self.notifications = Counter(
            "millstream_alert_notifications",
            "Notifications delivered, by receiver, integration and outcome "
            "(success, failed_attempt, dropped)",
            ["receiver", "integration", "outcome"],
            registry=r,
        )
        self.delivery_seconds = Histogram(
            "millstream_alert_notification_seconds",
            "Time of one delivery attempt",
            ["integration"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.queue = Gauge(
            "millstream_alert_notification_queue",
            "Notifications waiting for delivery, by receiver and integration",
            ["receiver", "integration"],
            registry=r,
        )
        self.alerts = Gauge(
            "millstream_alerts",
            "Alerts by state (pending, firing, resolved)",
            ["state"],
            registry=r,
        )
        self.firing = Gauge(
            "millstream_alerts_firing",
            "Alerts firing now (muted ones included; see millstream_alerts_muted)",
            registry=r,
        )
        self.transitions = Counter(
            "millstream_alert_transitions",
            "Alert state changes, by rule and new state",
            ["rule", "state"],
            registry=r,
        )
        self.time_muted = Counter(
            "millstream_alert_group_flushes_time_muted",
            "Group flushes whose notifications a route's time intervals held back "
            "(mute_time_intervals, or outside active_time_intervals), by receiver and interval",
            ["receiver", "time_interval"],
            registry=r,
        )
        self.muted = Gauge(
            "millstream_alerts_muted",
            "Firing alerts muted, by reason (silenced, inhibited)",
            ["reason"],
            registry=r,
        )
