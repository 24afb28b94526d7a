"""API authentication for the FastAPI app: token scopes on every route, body size limit, CORS.

The app factory calls :func:`install_auth` once, after it has built the app::

    app = FastAPI(...)
    app.include_router(...)
    install_auth(app, settings)

Every request goes through :class:`AuthMiddleware`, which works out the scope the request
needs *before* any route runs. Routes are read from the app's OpenAPI schema (a public,
stable view of every route however routers are nested) plus its plain routes (``/docs``,
``/openapi.json``); a path that matches no known route still needs a token, so a route
cannot slip through unprotected: only ``OPEN_PATHS`` (``/healthz``) are open.

Scope of a route, first match wins:

1. an explicit declaration on the route: ``openapi_extra=needs_scope("read")``
   (``{"x-millstream-scope": "read"}``), e.g. for a POST that only reads;
2. ``admin`` for routes tagged ``admin`` or under ``/api/v1/admin``;
3. by method: GET, HEAD and OPTIONS need ``read``; every other method needs ``write``,
   except ``POST /query`` (InfluxQL, read-only) which needs ``read``.
   When several routes match a path, the strictest scope wins.

Credentials: ``Authorization: Bearer <token>``, ``Authorization: Token <token>``
(InfluxDB style) or HTTP Basic with the token as the password (any user name; browsers
and Grafana's InfluxDB datasource send this). On InfluxDB-compatible paths (``/query``,
``/write``) the ``p`` query parameter (with ``u``) is accepted too, as InfluxDB 1.x does.

Policy when no token exists: bound to loopback, the API is open and logs a warning saying
so; bound beyond loopback, :func:`install_auth` raises :class:`InsecureBindError` unless
``insecure`` is set. Once a token exists, every protected route requires one.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from starlette.middleware.cors import CORSMiddleware

from millstream_cloud.security.tokens import SCOPES, TokenInfo, TokenStore, scope_allows

log = logging.getLogger("millstream.security")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = frozenset({"/healthz"})
ADMIN_PREFIXES = ("/api/v1/admin",)
INFLUX_PARAM_PATHS = ("/query", "/write")
# InfluxQL over POST (Grafana's httpMode POST) only reads: the /query endpoint refuses
# SELECT INTO, DROP, DELETE and CREATE (grafana/influxql.py).
READ_ONLY_POST_PATHS = frozenset({"/query"})
SCOPE_EXTRA = "x-millstream-scope"
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
HTTP_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE"})
DEFAULT_MAX_BODY = 1_048_576


class InsecureBindError(RuntimeError):
    """The API would listen beyond loopback without any token to protect it."""


def needs_scope(scope: str) -> dict[str, Any]:
    """``openapi_extra`` for a route whose scope is not the one its method implies::

    @router.post("/export", openapi_extra=needs_scope("read"))
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}: use one of {', '.join(SCOPES)}")
    return {SCOPE_EXTRA: scope}


@dataclass
class AuthSettings:
    """What the middleware needs; built from the app's settings by :func:`auth_settings`."""

    tokens_path: Path
    host: str = "127.0.0.1"
    insecure: bool = False
    cors_origins: list[str] = field(default_factory=list)
    max_body_bytes: int = DEFAULT_MAX_BODY


def auth_settings(settings: Any) -> AuthSettings:
    """Read the security fields of the cloud settings object, with safe defaults.

    Looked up in ``settings.api`` (then on ``settings`` itself): ``host`` ("127.0.0.1"),
    ``insecure`` (False), ``api_tokens_file`` / ``tokens_file`` (default
    ``<data_dir>/security/tokens.sqlite3``), ``cors_origins`` ([]: CORS off),
    ``max_request_bytes`` (1 MiB).
    """
    if isinstance(settings, AuthSettings):
        return settings
    api = getattr(settings, "api", None)

    def pick(*names: str, default: Any = None) -> Any:
        for obj in (api, settings):
            for name in names:
                value = getattr(obj, name, None) if obj is not None else None
                if value is not None:
                    return value
        return default

    tokens = pick("api_tokens_file", "tokens_file")
    if tokens is None:
        data_dir = Path(getattr(settings, "data_dir", None) or "millstream-data")
        tokens = data_dir / "security" / "tokens.sqlite3"
    origins = pick("cors_origins", default=[])
    if isinstance(origins, str):
        origins = [o.strip() for o in origins.split(",") if o.strip()]
    return AuthSettings(
        tokens_path=Path(tokens),
        host=str(pick("host", default="127.0.0.1")),
        insecure=bool(pick("insecure", default=False)),
        cors_origins=list(origins),
        max_body_bytes=int(pick("max_request_bytes", default=DEFAULT_MAX_BODY)),
    )


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def startup_policy(host: str, tokens: TokenStore, insecure: bool) -> str:
    """``enforced``, ``open-loopback`` or ``open-insecure``; raises when it must not start."""
    if tokens.has_active_tokens():
        return "enforced"
    if is_loopback(host):
        log.warning(
            "API is OPEN: no API token exists and it listens on loopback (%s) only; "
            "create one with `millstream-cloud tokens create --scope read --name NAME` "
            "to require tokens",
            host,
        )
        return "open-loopback"
    if insecure:
        log.warning(
            "API is OPEN to the network on %s: no API token exists and --insecure was "
            "given; anyone who can reach this port can read and change everything",
            host,
        )
        return "open-insecure"
    raise InsecureBindError(
        f"refusing to serve the API on {host} without an API token: create one with "
        "`millstream-cloud tokens create --scope admin --name ops`, bind to 127.0.0.1, "
        "or pass --insecure to run open on purpose"
    )


def default_scope(path: str, method: str, tags: Any = (), declared: Any = None) -> str | None:
    """The scope a route needs; None only for ``OPEN_PATHS``."""
    if path in OPEN_PATHS:
        return None
    if declared in SCOPES:
        return str(declared)
    if "admin" in (tags or ()) or any(path.startswith(p) for p in ADMIN_PREFIXES):
        return "admin"
    if method == "POST" and path in READ_ONLY_POST_PATHS:
        return "read"
    return "read" if method in READ_METHODS else "write"


@dataclass(frozen=True)
class RouteRule:
    path: str  # the route's template, e.g. /api/v1/devices/{device_id}
    method: str
    scope: str | None
    regex: re.Pattern[str]


_PARAM = re.compile(r"\{([^}:]+)(:[^}]*)?\}")


def _template_regex(path: str) -> re.Pattern[str]:
    parts = []
    pos = 0
    for m in _PARAM.finditer(path):
        parts.append(re.escape(path[pos : m.start()]))
        parts.append(".+" if m.group(2) == ":path" else "[^/]+")
        pos = m.end()
    parts.append(re.escape(path[pos:]))
    return re.compile("".join(parts))


def route_rules(app: Any) -> list[RouteRule]:
    """Every (path, method) the app serves, with the scope it needs."""
    rules: list[RouteRule] = []
    seen: set[tuple[str, str]] = set()
    try:
        paths = app.openapi().get("paths", {})
    except Exception:  # a broken schema must not open anything: defaults still apply
        log.exception("cannot build the OpenAPI schema; routes get the default scopes")
        paths = {}
    for path, operations in paths.items():
        for method, op in operations.items():
            method = method.upper()
            if method not in HTTP_METHODS or not isinstance(op, dict):
                continue
            scope = default_scope(path, method, op.get("tags"), op.get(SCOPE_EXTRA))
            rules.append(RouteRule(path, method, scope, _template_regex(path)))
            seen.add((path, method))
    for route in getattr(app, "routes", []):  # plain routes outside the schema (/docs, ...)
        path = getattr(route, "path", None)
        for method in getattr(route, "methods", None) or ():
            if path and (path, method) not in seen:
                rules.append(
                    RouteRule(path, method, default_scope(path, method), _template_regex(path))
                )
                seen.add((path, method))
    return rules


def required_scope(rules: list[RouteRule], method: str, path: str) -> str | None:
    """The strictest scope among the routes matching this request (by method first)."""
    lookup = "GET" if method == "HEAD" else method
    matching = [r for r in rules if r.method == lookup and r.regex.fullmatch(path)]
    if not matching:
        return default_scope(path, method)
    scopes = [r.scope for r in matching]
    if all(s is None for s in scopes):
        return None
    return max((s for s in scopes if s is not None), key=SCOPES.index)


def _credentials(scope: Scope) -> str | None:
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    auth = headers.get("authorization", "").strip()
    if auth:
        kind, _, value = auth.partition(" ")
        kind = kind.lower()
        value = value.strip()
        if kind in ("bearer", "token") and value:
            return value
        if kind == "basic" and value:
            try:
                decoded = base64.b64decode(value, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return None
            return decoded.partition(":")[2] or None
        return None
    path = scope.get("path", "")
    if any(path == p or path.endswith(p) for p in INFLUX_PARAM_PATHS):
        params = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if params.get("p"):
            return params["p"][0]
    return None


async def _reply(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


CHALLENGE = [(b"www-authenticate", b'Bearer realm="millstream", Basic realm="millstream"')]


class AuthMiddleware:
    """Pure ASGI middleware: scope check per route and a request body limit."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        app_with_routes: Any,
        tokens: TokenStore,
        open_without_tokens: bool,
        max_body_bytes: int = DEFAULT_MAX_BODY,
    ) -> None:
        self.app = app
        self.routed_app = app_with_routes
        self._rules: list[RouteRule] | None = None
        self.tokens = tokens
        self.open_without_tokens = open_without_tokens
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "GET")
        if self._rules is None:  # on the first request: every router is included by then
            self._rules = route_rules(self.routed_app)
        needed = required_scope(self._rules, method, scope.get("path", ""))
        if needed is not None:
            token = _credentials(scope)
            info: TokenInfo | None = self.tokens.verify(token) if token else None
            if info is None:
                # Open (no token exists; loopback or --insecure, announced at start): any
                # credentials a client sends anyway are ignored, as if the API had none.
                if not self.open_without_tokens or self.tokens.has_active_tokens():
                    await self._deny(scope, send, 401, "missing or invalid API token")
                    return
            elif not scope_allows(info.scope, needed):
                await self._deny(
                    scope, send, 403, f"token {info.name!r} has scope {info.scope}; needs {needed}"
                )
                return
            scope.setdefault("state", {})["token"] = info
        if scope["type"] == "http":
            await self._limited(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _deny(self, scope: Scope, send: Send, status: int, detail: str) -> None:
        log.info("API %s %s refused: %s", scope.get("method", "WS"), scope.get("path", ""), detail)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await _reply(send, status, detail, CHALLENGE if status == 401 else [])

    async def _limited(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.max_body_bytes
        declared = None
        for k, v in scope["headers"]:
            if k.lower() == b"content-length":
                declared = v
                break
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await _reply(send, 400, "invalid Content-Length", [])
                return
            if size > limit:
                await _reply(send, 413, f"request body larger than {limit} bytes", [])
                return
            await self.app(scope, receive, send)
            return
        if scope.get("method") in READ_METHODS:
            await self.app(scope, receive, send)
            return
        # A chunked body: read it (bounded) before the route sees any of it.
        body = await _read_bounded(receive, limit)
        if body is None:
            await _reply(send, 413, f"request body larger than {limit} bytes", [])
            return
        await self.app(scope, _replay(body, receive), send)


async def _read_bounded(receive: Receive, limit: int) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def install_auth(app: Any, settings: Any, tokens: TokenStore | None = None) -> str:
    """Protect every route of ``app`` (a FastAPI/Starlette app); return the policy in force.

    Raises :class:`InsecureBindError` when the settings bind beyond loopback without a
    token and without ``insecure``. Call it after the routers are included (routes added
    later are protected too: the check runs per request).
    """
    cfg = auth_settings(settings)
    store = tokens or TokenStore(cfg.tokens_path)
    policy = startup_policy(cfg.host, store, cfg.insecure)
    app.state.auth_policy = policy
    app.state.tokens = store
    app.add_middleware(
        AuthMiddleware,
        app_with_routes=app,
        tokens=store,
        open_without_tokens=policy != "enforced",
        max_body_bytes=cfg.max_body_bytes,
    )
    if cfg.cors_origins:
        # Added last, so it runs first: preflight requests carry no token.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=cfg.cors_origins,
            allow_methods=["GET", "POST", "PUT", "DELETE", "PATCH"],
            allow_headers=["Authorization", "Content-Type"],
        )
    return policy
