"""Fixtures of the Grafana tests: a real InfluxDB 1.x and Millstream's /query, same data."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from millstream_cloud.api.deps import get_services
from millstream_cloud.grafana import query_api
from millstream_cloud.grafana.engine import QueryEngine
from millstream_cloud.storage.embedded import EmbeddedStorage

from tests.grafana.data import fleet_points, line_protocol
from tests.support.servers import ServerProcess, find_binary, free_port

INFLUXD_CONFIG = """\
reporting-disabled = true
bind-address = "127.0.0.1:{rpc_port}"
[meta]
  dir = "{workdir}/meta"
[data]
  dir = "{workdir}/data"
  wal-dir = "{workdir}/wal"
  query-log-enabled = false
[monitor]
  store-enabled = false
[http]
  bind-address = "127.0.0.1:{port}"
  log-enabled = false
[logging]
  level = "warn"
  suppress-logo = true
[continuous_queries]
  enabled = false
"""


class Influx:
    """A tiny client of a real InfluxDB 1.x over HTTP."""

    def __init__(self, server: ServerProcess) -> None:
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

    def write(self, lines: str, db: str = "millstream") -> None:
        req = urllib.request.Request(
            f"{self.url}/write?db={db}&precision=ns", data=lines.encode(), method="POST"
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.status == 204


def start_influxd(workdir: Path) -> ServerProcess:
    binary = find_binary("influxd")
    if binary is None:
        pytest.skip("influxd not installed (apt-get install influxdb)")
    workdir.mkdir(parents=True, exist_ok=True)
    port, rpc_port = free_port(), free_port()
    conf = workdir / "influxdb.conf"
    conf.write_text(INFLUXD_CONFIG.format(workdir=workdir, port=port, rpc_port=rpc_port))
    server = ServerProcess([binary, "-config", str(conf)], port, workdir, workdir / "influxd.log")
    return server.start()


@pytest.fixture(scope="session")
def influx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Influx]:
    """Debian's InfluxDB 1.x on free ports, holding the fleet history of ``data.py``."""
    server = start_influxd(tmp_path_factory.mktemp("influxdb"))
    try:
        client = Influx(server)
        status, body = client.query("CREATE DATABASE millstream", db=None)
        assert status == 200, body
        client.write(line_protocol(fleet_points()))
        yield client
    finally:
        server.stop()


@pytest.fixture(scope="session")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStorage]:
    """The embedded store holding the same points."""
    store = EmbeddedStorage(tmp_path_factory.mktemp("embedded") / "telemetry.db")
    store.write_points(fleet_points())
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


@pytest.fixture(scope="session", params=["pushdown", "raw"])
def millstream(request: pytest.FixtureRequest, embedded: EmbeddedStorage) -> Iterator[TestClient]:
    """Millstream's /query over the embedded store, with and without storage pushdown."""
    engine = QueryEngine(embedded, pushdown=request.param == "pushdown")
    with TestClient(query_app(embedded, engine)) as client:
        yield client
