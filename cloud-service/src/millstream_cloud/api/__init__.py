"""HTTP API: one router per resource. ``ROUTERS`` is what the app factory mounts."""

from __future__ import annotations

from millstream_cloud.api import anomalies, deadletters, devices, health, remote

ROUTERS = [health.router, devices.router, deadletters.router, anomalies.router, remote.router]
