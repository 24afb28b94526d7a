"""Dependencies shared by routers: the service instance of the running app."""

from __future__ import annotations

from fastapi import Request

from millstream_cloud.services import Services


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services
