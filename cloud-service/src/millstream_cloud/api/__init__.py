"""HTTP API: one router per resource. ``ROUTERS`` is what the app factory mounts."""

from __future__ import annotations

from millstream_cloud.api import deadletters, devices, health

ROUTERS = [health.router, devices.router, deadletters.router]
