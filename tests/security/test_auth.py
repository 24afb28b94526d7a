"""API security: every route of the real app (enumerated, so a new route cannot slip
through) answers 401 without a token, 403 with too small a scope, 401 with a revoked one."""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient
from starlette.routing import Route

from millstream_cloud.security.auth import (
    AuthSettings,
    InsecureBindError,
    default_scope,
    install_auth,
    needs_scope,
    startup_policy,
)
from millstream_cloud.security.tokens import TokenStore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TokenStore]:
    s = TokenStore(tmp_path / "tokens.sqlite3")
    yield s
    s.close()


def sample_app() -> FastAPI:
    """A small app with every kind of route the real one has or will have."""
    app = FastAPI()
    r = APIRouter(prefix="/api/v1/things")

    @r.get("")
    def list_things() -> dict[str, Any]:
        return {"things": []}

    @r.get("/{thing_id}")
    def get_thing(thing_id: str) -> dict[str, str]:
        return {"id": thing_id}

    @r.put("/{thing_id}")
    def put_thing(thing_id: str) -> dict[str, str]:
        return {"id": thing_id}

    @r.delete("/{thing_id}")
    def delete_thing(thing_id: str) -> dict[str, str]:
        return {"id": thing_id}

    @r.post("/{thing_id}/export", openapi_extra=needs_scope("read"))  # a POST that only reads
    def export_thing(thing_id: str) -> dict[str, str]:
        return {"id": thing_id}

    admin = APIRouter(prefix="/api/v1/admin", tags=["admin"])

    @admin.post("/rotate")
    def rotate() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/query")
    def query(q: str = "") -> dict[str, Any]:
        return {"results": []}

    @app.post("/query")
    def query_post() -> dict[str, Any]:
        return {"results": []}

    @app.post("/api/v1/echo")
    async def echo(body: dict[str, Any]) -> dict[str, Any]:
        return body

    @app.get("/api/v1/settings", openapi_extra={"x-millstream-scope": "admin"})
    def settings_view() -> dict[str, str]:
        return {}

    app.include_router(r)
    app.include_router(admin)
    return app


def real_app(tmp_path: Path) -> FastAPI:
    """The service's app factory, with auth installed the way the factory must do it."""
    from millstream_cloud.app import create_app
    from millstream_cloud.settings import load_settings

    settings = load_settings(overrides={"data_dir": str(tmp_path / "data")}, environ={})
    app = create_app(settings, start=False)
    if not hasattr(app.state, "auth_policy"):
        # Until the factory calls install_auth itself (see docs/security.md).
        install_auth(app, settings)
    return app


def concrete_paths(app: FastAPI) -> list[tuple[str, str, str]]:
    """(method, path, needed scope) for every route the app serves, path parameters filled.

    Read from the app itself: its OpenAPI schema (every API route, however routers are
    nested) and its plain routes (/docs, /openapi.json, ...).
    """
    found: dict[tuple[str, str], str] = {}
    for path, ops in app.openapi()["paths"].items():
        for method, op in ops.items():
            scope = default_scope(
                path, method.upper(), op.get("tags"), op.get("x-millstream-scope")
            )
            found[(method.upper(), path)] = scope or "open"
    for route in app.routes:
        if isinstance(route, Route):
            for method in route.methods or ():
                found.setdefault((method, route.path), default_scope(route.path, method) or "open")
    out = [
        (method, re.sub(r"\{[^}]+\}", "x", path), scope)
        for (method, path), scope in sorted(found.items())
        if method != "HEAD"
    ]
    assert out
    return out


@pytest.fixture(params=["sample", "real"])
def secured(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """An app with tokens of every scope and one revoked admin token."""
    if request.param == "sample":
        app = sample_app()
        tokens_path = tmp_path / "tokens.sqlite3"
        store = TokenStore(tokens_path)
        install_auth(app, AuthSettings(tokens_path=tokens_path), tokens=store)
    else:
        app = real_app(tmp_path)
        store = app.state.tokens
    toks = {scope: store.create(f"t-{scope}", scope)[1] for scope in ("read", "write", "admin")}
    revoked = store.create("gone", "admin")[1]
    store.revoke("gone")
    with TestClient(app, raise_server_exceptions=False) as client:
        yield {"app": app, "client": client, "tokens": toks, "revoked": revoked}
    store.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_every_route_needs_a_token_of_the_right_scope(secured: dict[str, Any]) -> None:
    client: TestClient = secured["client"]
    tokens: dict[str, str] = secured["tokens"]
    routes = concrete_paths(secured["app"])
    failures = []
    for method, path, needed in routes:

        def call(headers: dict[str, str] | None = None, m: str = method, p: str = path) -> int:
            return client.request(m, p, headers=headers or {}).status_code

        if needed == "open":
            assert path == "/healthz", f"{method} {path} is open"
            assert call() == 200
            continue
        checks = {
            "missing": (call(), 401),
            "revoked": (call(bearer(secured["revoked"])), 401),
            "garbage": (call(bearer("ms_not-a-real-token")), 401),
        }
        lower = {"write": "read", "admin": "write"}.get(needed)
        if lower:
            checks["wrong scope"] = (call(bearer(tokens[lower])), 403)
        status = call(bearer(tokens[needed]))
        if status in (401, 403):
            failures.append(f"{method} {path}: right scope {needed} got {status}")
        for what, (got, want) in checks.items():
            if got != want:
                failures.append(f"{method} {path}: {what} token got {got}, want {want}")
    assert not failures, "\n".join(failures)


def test_real_app_routes_are_all_checked(tmp_path: Path) -> None:
    paths = {p for _, p, _ in concrete_paths(real_app(tmp_path))}
    assert {"/healthz", "/api/v1/devices"} <= paths


def test_a_route_added_after_install_is_protected(store: TokenStore) -> None:
    app = sample_app()
    install_auth(app, AuthSettings(tokens_path=store.path), tokens=store)
    store.create("r", "read")

    @app.get("/api/v1/late")
    def late() -> dict[str, str]:
        return {}

    with TestClient(app) as client:
        assert client.get("/api/v1/late").status_code == 401
        assert client.get("/api/v1/no-such-route").status_code == 401


def test_influxdb_style_credentials_on_query(store: TokenStore) -> None:
    app = sample_app()
    install_auth(app, AuthSettings(tokens_path=store.path), tokens=store)
    _, token = store.create("grafana", "read")
    basic = base64.b64encode(f"grafana:{token}".encode()).decode()
    with TestClient(app) as client:
        assert client.get("/query", params={"q": "SHOW DATABASES"}).status_code == 401
        assert client.get("/query", params={"u": "grafana", "p": token}).status_code == 200
        assert client.get("/query", params={"u": "grafana", "p": "wrong"}).status_code == 401
        assert client.get("/query", headers={"Authorization": f"Token {token}"}).status_code == 200
        assert client.get("/query", headers={"Authorization": f"Basic {basic}"}).status_code == 200
        # Grafana's httpMode POST: InfluxQL in a form body, still a read.
        posted = client.post(
            "/query", data={"q": "SELECT 1"}, headers={"Authorization": f"Token {token}"}
        )
        assert posted.status_code == 200
        # Query-string credentials are for InfluxDB-compatible paths only.
        assert client.get("/api/v1/things", params={"p": token}).status_code == 401
        # A browser gets a Basic challenge, so /docs can be opened with a token as password.
        r = client.get("/docs")
        assert r.status_code == 401 and "Basic" in r.headers["www-authenticate"]


def test_open_on_loopback_without_tokens_and_says_so(
    store: TokenStore, caplog: pytest.LogCaptureFixture
) -> None:
    app = sample_app()
    with caplog.at_level(logging.WARNING, logger="millstream.security"):
        policy = install_auth(app, AuthSettings(tokens_path=store.path), tokens=store)
    assert policy == "open-loopback"
    assert "API is OPEN" in caplog.text
    with TestClient(app) as client:
        assert client.get("/api/v1/things").status_code == 200
        assert client.delete("/api/v1/things/a").status_code == 200
        # Credentials sent to an open API (Grafana's datasource, say) are ignored.
        assert client.get("/query", headers={"Authorization": "Token anything"}).status_code == 200
        # The first token closes the API at once, without a restart.
        store.create("ops", "admin")
        assert client.get("/api/v1/things").status_code == 401


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "::", "millstream.example.com"])
def test_refuses_to_start_beyond_loopback_without_tokens(store: TokenStore, host: str) -> None:
    with pytest.raises(InsecureBindError, match="--insecure"):
        install_auth(sample_app(), AuthSettings(tokens_path=store.path, host=host), tokens=store)
    assert startup_policy(host, store, insecure=True) == "open-insecure"
    store.create("ops", "admin")
    assert startup_policy(host, store, insecure=False) == "enforced"


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_loopback_hosts(store: TokenStore, host: str) -> None:
    assert startup_policy(host, store, insecure=False) == "open-loopback"


def test_request_body_limit(store: TokenStore) -> None:
    app = sample_app()
    install_auth(app, AuthSettings(tokens_path=store.path, max_body_bytes=1000), tokens=store)
    _, token = store.create("w", "write")
    with TestClient(app) as client:
        ok = client.post("/api/v1/echo", json={"a": "x" * 100}, headers=bearer(token))
        assert ok.status_code == 200 and ok.json() == {"a": "x" * 100}
        big = client.post("/api/v1/echo", json={"a": "x" * 5000}, headers=bearer(token))
        assert big.status_code == 413

        def chunks() -> Iterator[bytes]:
            yield b'{"a": "'
            for _ in range(50):
                yield b"x" * 100
            yield b'"}'

        streamed = client.post(
            "/api/v1/echo",
            content=chunks(),
            headers={**bearer(token), "Content-Type": "application/json"},
        )
        assert streamed.status_code == 413


def test_cors_off_by_default_and_on_when_configured(store: TokenStore) -> None:
    app = sample_app()
    install_auth(app, AuthSettings(tokens_path=store.path), tokens=store)
    with TestClient(app) as client:
        r = client.get("/healthz", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers
    app2 = sample_app()
    install_auth(
        app2,
        AuthSettings(tokens_path=store.path, cors_origins=["https://grafana.example"]),
        tokens=store,
    )
    with TestClient(app2) as client:
        r = client.get("/healthz", headers={"Origin": "https://grafana.example"})
        assert r.headers["access-control-allow-origin"] == "https://grafana.example"
