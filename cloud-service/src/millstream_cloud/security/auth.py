"""API authentication for the FastAPI app: token scopes on every route, body size limit, CORS.

The app factory calls :func:`install_auth` once, after it has built the app::

    app = FastAPI(...)
    app.include_router(...)
    install_auth(app, settings)

Every request goes through :class:`AuthMiddleware`, which finds the route the request
will reach and the scope it needs, *before* the route runs, so a router added later
cannot be forgotten: a route is protected unless it is listed in ``OPEN_PATHS``.

Scope of a route, first match wins:

1. an explicit declaration: ``@requires_scope("admin")`` on the endpoint function, or
   ``openapi_extra={"x-millstream-scope": "admin"}`` on the route;
2. ``admin`` for routes tagged ``admin`` or under ``/api/v1/admin``;
3. by method: GET, HEAD and OPTIONS need ``read``; every other method needs ``write``;
   a path that matches no route needs ``read`` (unknown paths answer 401, not 404, to
   callers without a token).

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
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs

from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Match, Mount

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
SCOPE_ATTR = "__millstream_scope__"
SCOPE_EXTRA = "x-millstream-scope"
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
DEFAULT_MAX_BODY = 1_048_576

F = TypeVar("F", bound=Callable[..., Any])


class InsecureBindError(RuntimeError):
    """The API would listen beyond loopback without any token to protect it."""


def requires_scope(scope: str | None) -> Callable[[F], F]:
    """Declare the scope an endpoint needs (``None``: open to everyone; use with care).

    Put it *below* the router decorator so the router registers the marked function.
    """
    if scope is not None and scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}")

    def mark(func: F) -> F:
        setattr(func, SCOPE_ATTR, scope or "open")
        return func

    return mark


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

    Fields: ``host`` ("127.0.0.1"), ``insecure`` (False), ``data_dir``,
    ``api_tokens_file`` (default ``<data_dir>/security/tokens.sqlite3``),
    ``cors_origins`` ([] = CORS off), ``max_request_bytes`` (1 MiB).
    """
    if isinstance(settings, AuthSettings):
        return settings
    tokens = getattr(settings, "api_tokens_file", None)
    if tokens is None:
        data_dir = Path(getattr(settings, "data_dir", None) or "var")
        tokens = data_dir / "security" / "tokens.sqlite3"
    origins = getattr(settings, "cors_origins", None) or []
    if isinstance(origins, str):
        origins = [o.strip() for o in origins.split(",") if o.strip()]
    return AuthSettings(
        tokens_path=Path(tokens),
        host=str(getattr(settings, "host", "127.0.0.1") or "127.0.0.1"),
        insecure=bool(getattr(settings, "insecure", False)),
        cors_origins=list(origins),
        max_body_bytes=int(getattr(settings, "max_request_bytes", DEFAULT_MAX_BODY) or 0)
        or DEFAULT_MAX_BODY,
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


def route_scope(route: Any, method: str) -> str | None:
    """The scope a matched route needs for ``method``; None when it is open."""
    path = getattr(route, "path", "")
    if path in OPEN_PATHS:
        return None
    endpoint = getattr(route, "endpoint", None)
    declared = getattr(endpoint, SCOPE_ATTR, None)
    extra = getattr(route, "openapi_extra", None) or {}
    declared = extra.get(SCOPE_EXTRA, declared)
    if declared == "open":
        return None
    if declared in SCOPES:
        return str(declared)
    tags = getattr(route, "tags", None) or []
    if "admin" in tags or any(path.startswith(p) for p in ADMIN_PREFIXES):
        return "admin"
    return "read" if method in READ_METHODS else "write"


def find_route(routes: list[Any], scope: Scope) -> Any | None:
    """The route Starlette will dispatch ``scope`` to (a partial match: wrong method)."""
    partial = None
    for route in routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            if isinstance(route, Mount) and getattr(route, "routes", None):
                child_scope = dict(scope)
                child_scope.update(_)
                inner = find_route(route.routes, child_scope)
                return inner or route
            return route
        if match == Match.PARTIAL and partial is None:
            partial = route
    return partial


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
        router_app: Any,
        tokens: TokenStore,
        open_without_tokens: bool,
        max_body_bytes: int = DEFAULT_MAX_BODY,
    ) -> None:
        self.app = app
        self.router_app = router_app
        self.tokens = tokens
        self.open_without_tokens = open_without_tokens
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "GET")
        route = find_route(self.router_app.routes, scope)
        needed = route_scope(route, method) if route is not None else "read"
        if needed is not None:
            token = _credentials(scope)
            info: TokenInfo | None = self.tokens.verify(token) if token else None
            if info is None:
                if token or not self.open_without_tokens or self.tokens.has_active_tokens():
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
        log.info(
            "API %s %s refused: %s", scope.get("method", "WS"), scope.get("path", ""), detail
        )
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await _reply(send, status, detail, CHALLENGE if status == 401 else [])

    async def _limited(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.max_body_bytes
        for k, v in scope["headers"]:
            if k.lower() == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    await _reply(send, 400, "invalid Content-Length", [])
                    return
                if declared > limit:
                    await _reply(send, 413, f"request body larger than {limit} bytes", [])
                    return
                break
        else:
            if scope.get("method") in READ_METHODS:
                await self.app(scope, receive, send)
                return
            # Chunked body: read it (bounded) before the route sees any of it.
            chunks: list[bytes] = []
            size = 0
            more = True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    break
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    await _reply(send, 413, f"request body larger than {limit} bytes", [])
                    return
                chunks.append(chunk)
                more = bool(message.get("more_body"))
            body = b"".join(chunks)
            sent = False

            async def replay() -> Message:
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send)
            return
        await self.app(scope, receive, send)


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
        router_app=app.router,
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
