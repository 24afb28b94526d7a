"""InfluxDB 1.x's ``/query`` (and ``/ping``) on the Millstream API, for Grafana.

Grafana's built-in InfluxDB datasource (query language InfluxQL, URL
``http://HOST:8000``, database ``millstream``) talks to this router exactly as to
InfluxDB: ``GET /query?db=..&q=..&epoch=ms`` or ``POST /query`` with a form body.
Statements run through :class:`~millstream_cloud.grafana.engine.QueryEngine` over the
configured storage backend, so the dashboards work on the embedded store too.

Credentials arrive the InfluxDB ways (``u``/``p`` parameters, Basic, ``Authorization:
Token``). The API's token middleware (:mod:`millstream_cloud.security.auth`) checks them
before the route runs (``/query`` needs the ``read`` scope, by GET or POST). Beyond that,
they are parsed into :class:`InfluxCredentials` and handed to the callable in
``services.extras["influx_authorizer"]`` when there is one (e.g. to limit a token to some
sites); without it every request that got through is answered.
"""

from __future__ import annotations

import base64
import logging
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from millstream_cloud.api.deps import get_services
from millstream_cloud.grafana.engine import EPOCH_DIVISORS, QueryEngine
from millstream_cloud.grafana.influxql import InfluxQLError, ParseError
from millstream_cloud.security.auth import needs_scope
from millstream_cloud.services import Services

log = logging.getLogger("millstream.grafana.query")

router = APIRouter(tags=["influxdb-compat"])

VERSION_HEADERS = {"X-Influxdb-Version": "1.8.10-millstream", "X-Influxdb-Build": "OSS"}
AUTHORIZER_KEY = "influx_authorizer"
ENGINE_KEY = "influxql_engine"


@dataclass(frozen=True)
class InfluxCredentials:
    """What the client presented; ``scheme`` is ``params``, ``basic``, ``token`` or ``none``."""

    scheme: str
    username: str | None = None
    password: str | None = None
    token: str | None = None


Authorizer = Callable[[InfluxCredentials], bool]


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=VERSION_HEADERS)


async def _params(request: Request) -> dict[str, str]:
    """Query-string parameters, overridden by a form body (as InfluxDB reads them)."""
    params = dict(request.query_params)
    if request.method == "POST":
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("application/x-www-form-urlencoded"):
            # parsed here rather than with request.form(): no python-multipart needed
            body = (await request.body()).decode("utf-8", errors="replace")
            params.update(urllib.parse.parse_qsl(body, keep_blank_values=True))
    return params


def credentials(request: Request, params: dict[str, str]) -> InfluxCredentials:
    auth = request.headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "token" and value:
        return InfluxCredentials("token", token=value.strip())
    if scheme.lower() == "basic" and value:
        try:
            user, _, pw = base64.b64decode(value.strip()).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return InfluxCredentials("invalid")
        return InfluxCredentials("basic", username=user, password=pw)
    if scheme.lower() == "bearer" and value:
        return InfluxCredentials("token", token=value.strip())
    if "u" in params or "p" in params:
        return InfluxCredentials("params", username=params.get("u"), password=params.get("p"))
    return InfluxCredentials("none")


def authorize(services: Services, creds: InfluxCredentials) -> bool:
    """The authorization hook: ``services.extras["influx_authorizer"]`` or allow all."""
    hook = services.extras.get(AUTHORIZER_KEY)
    if hook is None:
        return creds.scheme != "invalid"
    return bool(hook(creds))  # type: ignore[operator]


def engine_for(services: Services) -> QueryEngine:
    engine = services.extras.get(ENGINE_KEY)
    if not isinstance(engine, QueryEngine) or engine.storage is not services.storage:
        engine = QueryEngine(services.storage)
        services.extras[ENGINE_KEY] = engine
    return engine


def run_query(engine: QueryEngine, params: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) for one ``/query`` call, InfluxDB 1.x style."""
    q = params.get("q", "")
    if not q.strip():
        return 400, {"error": 'missing required parameter "q"'}
    epoch = params.get("epoch") or None
    if epoch is not None and epoch not in EPOCH_DIVISORS:
        epoch = None  # InfluxDB answers RFC 3339 for an unknown precision
    try:
        return 200, engine.execute(
            q, db=params.get("db") or None, epoch=epoch, rp=params.get("rp") or None
        )
    except ParseError as exc:
        return 400, {"error": str(exc)}
    except InfluxQLError as exc:
        return 200, {"results": [{"statement_id": 0, "error": str(exc)}]}


async def _query(request: Request, services: Services) -> Response:
    params = await _params(request)
    creds = credentials(request, params)
    if not authorize(services, creds):
        return _error(401, "authorization failed")
    engine = engine_for(services)
    from starlette.concurrency import run_in_threadpool

    status, body = await run_in_threadpool(run_query, engine, params)
    if status == 200:
        for r in body.get("results", []):
            if "error" in r:
                log.info("influxql statement failed: %s (q=%r)", r["error"], params.get("q"))
    return JSONResponse(body, status_code=status, headers=VERSION_HEADERS)


@router.get("/query")
async def query_get(request: Request, services: Services = Depends(get_services)) -> Response:
    """InfluxDB 1.x query API (read-only subset), for Grafana's InfluxDB datasource."""
    return await _query(request, services)


# Grafana POSTs queries; they only read, so a read-scope token must do (see security.auth).
@router.post("/query", openapi_extra=needs_scope("read"))
async def query_post(request: Request, services: Services = Depends(get_services)) -> Response:
    """The same as GET; parameters may come in a form body."""
    return await _query(request, services)


# One route per method, each with its own operation id: a route of both had one id for
# the two operations, which the OpenAPI document may not (a client generated from it
# gets two functions of one name).
@router.head("/ping", operation_id="ping_head")
@router.get("/ping", operation_id="ping_get")
async def ping() -> Response:
    """InfluxDB's liveness answer (204 with version headers)."""
    return Response(status_code=204, headers=VERSION_HEADERS)
