"""HTTP API: one router per resource. ``ROUTERS`` is what the app factory mounts."""

from __future__ import annotations

from millstream_cloud.api import alerts, anomalies, deadletters, devices, health, remote, sites
from millstream_cloud.grafana import query_api

ROUTERS = [
    health.router,
    devices.router,
    sites.router,
    deadletters.router,
    anomalies.router,
    remote.router,
    query_api.router,
    alerts.router,
]
