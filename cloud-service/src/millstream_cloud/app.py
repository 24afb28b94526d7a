"""The FastAPI app factory: everything the app uses comes from one Settings object."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from millstream_cloud import __version__
from millstream_cloud.api import ROUTERS
from millstream_cloud.security.auth import install_auth
from millstream_cloud.services import Services
from millstream_cloud.settings import Settings

log = logging.getLogger("millstream.app")


def create_app(
    settings: Settings | None = None, services: Services | None = None, start: bool = True
) -> FastAPI:
    """Build the app. ``services`` may be given (tests); ``start`` starts ingest on startup."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc = app.state.services
        if start:
            svc.start()
        try:
            yield
        finally:
            svc.stop()

    app = FastAPI(
        title="Millstream",
        version=__version__,
        description="Factory telemetry: devices, readings, anomalies, alerts.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.services = services or Services.build(settings, with_subscriber=start)
    for router in ROUTERS:
        app.include_router(router)
    # Every route but /healthz needs a token with the right scope (docs/security.md);
    # refuses (InsecureBindError) a non-loopback bind without tokens unless insecure.
    policy = install_auth(app, settings)
    log.info("API authentication: %s", policy)
    return app
