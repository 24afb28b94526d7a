"""/query in the real app: the service's configured storage, and the API token middleware."""

from __future__ import annotations

import base64
from pathlib import Path

from fastapi.testclient import TestClient

from millstream_cloud.app import create_app
from millstream_cloud.grafana import query_api
from millstream_cloud.security.auth import install_auth
from millstream_cloud.security.tokens import TokenStore
from millstream_cloud.settings import load_settings
from tests.grafana.data import FROM_MS, TO_MS, fleet_points

Q = f'SELECT mean("temperature") FROM "telemetry" WHERE time >= {FROM_MS}ms and time <= {TO_MS}ms GROUP BY time(30m), "device"'


def _app(tmp_path: Path, with_auth: bool) -> tuple[TestClient, TokenStore | None]:
    settings = load_settings(overrides={"data_dir": str(tmp_path / "data")})
    app = create_app(settings, start=False)
    if not any(getattr(r, "path", None) == "/query" for r in app.routes):
        app.include_router(query_api.router)  # until api.ROUTERS lists it
    app.state.services.storage.write_points(fleet_points())
    tokens = None
    if with_auth:
        tokens = TokenStore(tmp_path / "tokens.sqlite3")
        install_auth(app, settings, tokens)
    return TestClient(app), tokens


def test_query_runs_over_the_configured_storage(tmp_path: Path) -> None:
    client, _ = _app(tmp_path, with_auth=False)
    with client:
        body = client.get("/query", params={"db": "millstream", "q": Q, "epoch": "ms"}).json()
    series = body["results"][0]["series"]
    assert [s["tags"]["device"] for s in series] == ["lathe-01", "press-01", "press-02"]
    assert all(len(s["values"]) == 4 for s in series)


def test_grafana_credentials_with_a_read_token(tmp_path: Path) -> None:
    client, tokens = _app(tmp_path, with_auth=True)
    assert tokens is not None
    _, read_token = tokens.create("grafana", "read")
    form = {"db": "millstream", "q": Q}
    with client:
        assert client.post("/query", data=form).status_code == 401
        # Grafana's InfluxDB datasource: Basic auth with the token as password, by POST
        basic = base64.b64encode(f"grafana:{read_token}".encode()).decode()
        ok = client.post("/query", data=form, headers={"Authorization": f"Basic {basic}"})
        assert ok.status_code == 200 and "series" in ok.json()["results"][0]
        # InfluxDB 2.x style header, and u/p parameters, by GET
        hdr = {"Authorization": f"Token {read_token}"}
        assert client.get("/query", params=form, headers=hdr).status_code == 200
        params = {**form, "u": "grafana", "p": read_token}
        assert client.get("/query", params=params).status_code == 200


def test_ping_answers_get_and_head_and_the_api_names_each_operation_once(
    tmp_path: Path,
) -> None:
    """Grafana's InfluxDB datasource pings with GET or HEAD; an OpenAPI client generated
    from /openapi.json needs one operation id per operation (GET and HEAD of one route
    shared one)."""
    client, _ = _app(tmp_path, with_auth=False)
    assert client.get("/ping").status_code == 204
    assert client.head("/ping").status_code == 204
    spec = client.get("/openapi.json").json()
    ids = [op["operationId"] for ops in spec["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})
    assert set(spec["paths"]["/ping"]) == {"get", "head"}
