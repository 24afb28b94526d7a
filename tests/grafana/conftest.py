"""Fixtures of the Grafana tests: a real InfluxDB 1.x and Millstream's /query, same data.

The fleet history of ``data.py`` is written to Debian's InfluxDB 1.x through
Millstream's InfluxDB backend, and to the embedded store; ``/query`` is then asked the
same questions over each backend as InfluxDB itself.
"""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from millstream_cloud.api.deps import get_services
from millstream_cloud.grafana import query_api
from millstream_cloud.grafana.engine import QueryEngine
from millstream_cloud.settings import InfluxDBSettings
from millstream_cloud.storage.embedded import EmbeddedStorage
from millstream_cloud.storage.influxdb import InfluxDBStorage
from tests.grafana.data import fleet_points
from tests.support.influxdb import InfluxDBServer, influxdb_available, influxdb_server


class Influx:
    """A tiny client of a real InfluxDB 1.x over HTTP."""

    def __init__(self, server: InfluxDBServer) -> None:
        self.server = server
        self.url = f"http://127.0.0.1:{server.port}"

    def query(
        self, q: str, db: str | None = "millstream", epoch: str | None = None
    ) -> tuple[int, Any]:
        params = {"q": q}
        if db:
            params["db"] = db
        if epoch:
            params["epoch"] = epoch
        req = urllib.request.Request(
            f"{self.url}/query", data=urllib.parse.urlencode(params).encode(), method="POST"
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())


@pytest.fixture(scope="session")
def influx_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxDBServer]:
    if not influxdb_available():
        pytest.skip("influxd not installed (apt-get install influxdb)")
    server = influxdb_server(tmp_path_factory.mktemp("influxdb")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def influx_backend(
    influx_server: InfluxDBServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InfluxDBStorage]:
    """Millstream's InfluxDB backend on that server; it wrote the fleet history."""
    settings = InfluxDBSettings(
        url=influx_server.url, api="v1", database="millstream",
        spool_dir=str(tmp_path_factory.mktemp("spool")),
    )  # fmt: skip
    store = InfluxDBStorage(settings)
    try:
        store.write_points(fleet_points())
        assert store.wait_drained(60), "the InfluxDB backend did not deliver the test data"
        yield store
    finally:
        store.close()


@pytest.fixture(scope="session")
def influx(influx_server: InfluxDBServer, influx_backend: InfluxDBStorage) -> Influx:
    """Debian's real InfluxDB 1.x holding the fleet history written by the InfluxDB backend."""
    return Influx(influx_server)


@pytest.fixture(scope="session")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStorage]:
    """The embedded store holding the same points."""
    store = EmbeddedStorage(tmp_path_factory.mktemp("embedded") / "store")
    store.write_points(fleet_points())
    try:
        yield store
    finally:
        store.close()


@pytest.fixture(scope="session")
def embedded_compacted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStorage]:
    """The same points, compacted into the embedded store's chunks."""
    store = EmbeddedStorage(tmp_path_factory.mktemp("embedded") / "store")
    store.write_points(fleet_points())
    store.flush()
    try:
        yield store
    finally:
        store.close()


def query_app(storage: Any, engine: QueryEngine | None = None, authorizer: Any = None) -> FastAPI:
    """An app with only the /query router, over ``storage``."""
    extras: dict[str, Any] = {}
    if engine is not None:
        extras[query_api.ENGINE_KEY] = engine
    if authorizer is not None:
        extras[query_api.AUTHORIZER_KEY] = authorizer
    services = SimpleNamespace(storage=storage, extras=extras)
    app = FastAPI()
    app.include_router(query_api.router)
    app.dependency_overrides[get_services] = lambda: services
    return app


MILLSTREAM_VARIANTS = ["embedded", "embedded-raw", "embedded-compacted", "influxdb-backend"]


@pytest.fixture(scope="session", params=MILLSTREAM_VARIANTS)
def millstream(request: pytest.FixtureRequest) -> Iterator[TestClient]:
    """Millstream's /query over a storage backend holding the fleet history.

    ``embedded``: the embedded store, aggregation pushed down to it where possible;
    ``embedded-raw``: the same, every statement evaluated by the engine from points;
    ``embedded-compacted``: the embedded store after compaction;
    ``influxdb-backend``: the InfluxDB backend (on the same real InfluxDB 1.x).
    """
    store_fixture = {
        "embedded": "embedded",
        "embedded-raw": "embedded",
        "embedded-compacted": "embedded_compacted",
        "influxdb-backend": "influx_backend",
    }[request.param]
    store = request.getfixturevalue(store_fixture)
    engine = QueryEngine(store, pushdown=request.param != "embedded-raw")
    with TestClient(query_app(store, engine)) as client:
        yield client
