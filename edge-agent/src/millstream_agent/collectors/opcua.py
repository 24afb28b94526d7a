"""OPC UA: node values by subscription or by polling (asyncua).

The agent's core is synchronous and asyncua is asyncio, so the collector runs its own
event loop in a background thread. That thread owns the connection: it connects, sets
up the subscription, checks the server every second and reconnects after a loss (every
``reconnect_interval``), forever, until ``close``. ``collect`` never blocks on the
network in subscription mode: it hands over what the subscription delivered since the
last call. In polling mode it reads every node once, in one request, on the loop.

Quality comes from the OPC UA status code: Good -> good, Uncertain -> uncertain, Bad ->
bad. A value that is not a number (a string, an array, or no value at all, which is
what most Bad readings carry) is skipped and logged once per node.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import importlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

from millstream_agent.collectors import register
from millstream_agent.collectors._options import (
    check_keys,
    get_float,
    get_int,
    get_str,
    parse_duration,
)
from millstream_agent.collectors.base import Collector, CollectorError, Sample

# Imported by name so mypy (checking for Python 3.9) does not walk into asyncua 2.x and
# its dependencies, which use 3.10 syntax; an ImportError still names the package.
asyncua: Any = importlib.import_module("asyncua")
Client = asyncua.Client
ua = asyncua.ua

log = logging.getLogger(__name__)

# Status names of a refused identity, retried every _DENIED_RETRY seconds at most.
_DENIED = ("BadUserAccessDenied", "BadIdentityToken", "BadSecurityChecksFailed", "BadCertificate")
_DENIED_RETRY = 60.0
_NODE_KEYS = ("node_id", "name", "unit", "scale", "offset")
MODES = ("subscription", "polling")
TIMESTAMPS = ("auto", "source", "server", "agent")


@dataclass(frozen=True)
class NodeSpec:
    node_id: str
    name: str
    unit: Optional[str] = None
    scale: float = 1.0
    offset: float = 0.0


def parse_nodes(value: Any) -> list[NodeSpec]:
    if not isinstance(value, list) or not value:
        raise ValueError("nodes: required, a list of {node_id, name} (one per metric)")
    specs = []
    names = set()
    ids = set()
    for n, item in enumerate(value):
        where = f"nodes[{n}]."
        if not isinstance(item, dict):
            raise ValueError(f"nodes[{n}]: expected a mapping with node_id and name")
        check_keys(item, _NODE_KEYS, where)
        node_id = item.get("node_id")
        if not isinstance(node_id, str) or not node_id:
            raise ValueError(f"{where}node_id: required, e.g. ns=2;s=Line1.Temperature")
        try:
            ua.NodeId.from_string(node_id)
        except Exception as exc:
            raise ValueError(
                f"{where}node_id: {node_id!r} is not an OPC UA node id "
                f"(expected e.g. ns=2;s=Line1.Temperature or ns=2;i=1001): {exc}"
            ) from None
        if node_id in ids:
            raise ValueError(f"{where}node_id: {node_id!r} is listed twice")
        ids.add(node_id)
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}name: required, the metric name (e.g. oven_temperature)")
        if name in names:
            raise ValueError(f"{where}name: {name!r} is used twice; metric names must be unique")
        names.add(name)
        specs.append(
            NodeSpec(
                node_id=node_id,
                name=name,
                unit=get_str(item, "unit", None, where=where),
                scale=get_float(item, "scale", 1.0, where=where),
                offset=get_float(item, "offset", 0.0, where=where),
            )
        )
    return specs


def quality(status: Any) -> str:
    """good / uncertain / bad from an OPC UA StatusCode (its two top bits)."""
    if status is None:
        return "good"
    if status.is_good():
        return "good"
    if status.is_uncertain():
        return "uncertain"
    return "bad"


def status_name(status: Any) -> str:
    try:
        return str(ua.status_codes.get_name_and_doc(status.value)[0])
    except Exception:
        return str(status)


def _epoch(stamp: Optional[datetime.datetime]) -> Optional[float]:
    if stamp is None:
        return None
    if stamp.tzinfo is None:  # asyncua < 1.1 hands out naive UTC datetimes
        stamp = stamp.replace(tzinfo=datetime.timezone.utc)
    return stamp.timestamp()


class _Handler:
    """asyncua subscription handler: runs on the collector's loop, only appends to a deque."""

    def __init__(self, collector: OpcUaCollector) -> None:
        self.collector = collector

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        spec = self.collector._by_id.get(node.nodeid)
        if spec is not None:
            self.collector._received(spec, data.monitored_item.Value)

    def status_change_notification(self, status: Any) -> None:
        log.warning("opcua %s: subscription status changed: %s", self.collector.name, status)


@register
class OpcUaCollector(Collector):
    """Values of OPC UA nodes, each mapped to a metric name."""

    type_name = "opcua"
    options_spec = {
        "endpoint": (str, None, "server URL, e.g. opc.tcp://plc.local:4840 (required)"),
        "mode": (str, "subscription", "subscription (server pushes changes) or polling"),
        "publishing_interval": (object, "1s", "subscription: publishing and sampling interval"),
        "timestamps": (str, "auto", "auto, source, server or agent (auto: source for subs)"),
        "timeout": (object, "5s", "connect and request timeout"),
        "reconnect_interval": (object, "5s", "wait between reconnect attempts after a loss"),
        "username": (str, None, "user name, if the server wants one"),
        "password": (str, None, "password; better kept out of the file with password_env"),
        "password_env": (str, None, "environment variable holding the password"),
        "security": (str, None, "asyncua security string: Policy,Mode,cert,key[,server_cert]"),
        "buffer_size": (int, 10000, "samples kept between collects; beyond it oldest dropped"),
        "nodes": (list, None, "the nodes: node_id, name, unit, scale, offset"),
    }

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        super().__init__(name, options)
        check_keys(options, self.options_spec)
        endpoint = get_str(options, "endpoint", None)
        if not endpoint or not endpoint.startswith("opc.tcp://"):
            raise ValueError(
                f"endpoint: required, an opc.tcp:// URL (e.g. opc.tcp://plc.local:4840), "
                f"got {endpoint!r}"
            )
        self.endpoint = endpoint
        self.mode = get_str(options, "mode", "subscription", list(MODES)) or "subscription"
        self.interval = parse_duration(
            options.get("publishing_interval", "1s"), "publishing_interval"
        )
        self.timeout = parse_duration(options.get("timeout", "5s"), "timeout")
        self.reconnect_interval = parse_duration(
            options.get("reconnect_interval", "5s"), "reconnect_interval"
        )
        for key, value in (("timeout", self.timeout), ("publishing_interval", self.interval)):
            if value <= 0:
                raise ValueError(f"{key}: must be positive")
        stamps = get_str(options, "timestamps", "auto", list(TIMESTAMPS)) or "auto"
        if stamps == "auto":
            # A polled value's source timestamp is when it last *changed*: polling a
            # steady value would repeat one old timestamp, so polls are stamped now.
            stamps = "source" if self.mode == "subscription" else "agent"
        self.timestamps = stamps
        self.username = get_str(options, "username", None)
        self.password = get_str(options, "password", None)
        self.password_env = get_str(options, "password_env", None)
        self.security = get_str(options, "security", None)
        self.nodes = parse_nodes(options.get("nodes"))
        self._by_id = {ua.NodeId.from_string(spec.node_id): spec for spec in self.nodes}
        self._buffer: collections.deque = collections.deque(
            maxlen=get_int(options, "buffer_size", 10000, minimum=1)
        )
        self.dropped = 0
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._stop: Optional[asyncio.Event] = None
        self._client: Any = None
        self._ua_nodes: list[Any] = []
        self._connected = threading.Event()
        self._last_error = "not connected yet"
        self._retry_in = self.reconnect_interval
        self._reported: set = set()

    # -- the agent's side -------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        if self._thread is not None:
            return
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            self._stop = asyncio.Event()
            ready.set()
            try:
                loop.run_until_complete(self._supervise())
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name=f"opcua-{self.name}", daemon=True)
        self._thread.start()
        ready.wait(5)

    def close(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None or self._loop is None or self._stop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop already ended
            self._loop.call_soon_threadsafe(self._stop.set)
        thread.join(self.timeout + 5)

    def wait_connected(self, timeout: float) -> bool:
        """Block until connected (for tests and start-up diagnostics)."""
        return self._connected.wait(timeout)

    def collect(self, now: float) -> list[Sample]:
        if self._thread is None:
            self.start()
        if self.mode == "polling" and self._connected.is_set():
            assert self._loop is not None
            future = asyncio.run_coroutine_threadsafe(self._poll(now), self._loop)
            try:
                future.result(self.timeout + 1)
            except Exception as exc:
                future.cancel()
                raise CollectorError(
                    f"opcua {self.name}: reading {len(self.nodes)} nodes from {self.endpoint} "
                    f"failed: {_describe(exc)}"
                ) from exc
        samples = []
        buffer = self._buffer
        while buffer:
            samples.append(buffer.popleft())
        if not samples and not self._connected.is_set():
            raise CollectorError(
                f"opcua {self.name}: not connected to {self.endpoint} ({self._last_error}); "
                f"reconnecting every {self._retry_in:g}s"
            )
        return samples

    # -- the loop's side --------------------------------------------------------------
    def _received(self, spec: NodeSpec, dv: Any, now: Optional[float] = None) -> None:
        raw = dv.Value.Value if dv.Value is not None else None
        if isinstance(raw, bool):
            raw = 1.0 if raw else 0.0
        if not isinstance(raw, (int, float)) or raw != raw or raw in (float("inf"), float("-inf")):
            key = f"value:{spec.node_id}:{type(raw).__name__}:{status_name(dv.StatusCode)}"
            if key not in self._reported:
                self._reported.add(key)
                log.warning(
                    "opcua %s: %s (%s) has no numeric value (%r, status %s); skipped",
                    self.name,
                    spec.name,
                    spec.node_id,
                    raw,
                    status_name(dv.StatusCode),
                )
            return
        ts = None
        if self.timestamps == "source":
            ts = _epoch(dv.SourceTimestamp) or _epoch(dv.ServerTimestamp)
        elif self.timestamps == "server":
            ts = _epoch(dv.ServerTimestamp) or _epoch(dv.SourceTimestamp)
        if ts is None:
            ts = now if now is not None else time.time()
        if len(self._buffer) == self._buffer.maxlen:
            self.dropped += 1
        value = float(raw) * spec.scale + spec.offset
        self._buffer.append(Sample(ts, spec.name, value, spec.unit, quality(dv.StatusCode)))

    async def _poll(self, now: float) -> None:
        client = self._client
        if client is None:
            raise ConnectionError("connection lost")
        try:
            values = await asyncio.wait_for(
                client.read_attributes(self._ua_nodes, ua.AttributeIds.Value), self.timeout
            )
        except Exception:
            # Let the supervisor notice and reconnect rather than wait for its next probe.
            self._connected.clear()
            raise
        for spec, dv in zip(self.nodes, values):
            self._received(spec, dv, now)

    async def _supervise(self) -> None:
        assert self._stop is not None
        while not self._stop.is_set():
            client = Client(self.endpoint, timeout=self.timeout)
            try:
                await self._session(client)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._last_error = _describe(exc)
                # Refused credentials will not fix themselves: ask again only now and
                # then (a new config restarts the collector anyway), never in a hot loop.
                denied = any(word in self._last_error for word in _DENIED)
                self._retry_in = max(self.reconnect_interval, _DENIED_RETRY if denied else 0.0)
                if self._last_error not in self._reported:
                    self._reported.add(self._last_error)
                    log.warning(
                        "opcua %s: %s: %s; reconnecting every %gs",
                        self.name,
                        self.endpoint,
                        self._last_error,
                        self._retry_in,
                    )
            finally:
                session = self._client is not None
                self._connected.clear()
                self._client = None
                with contextlib.suppress(Exception):  # the connection is gone either way
                    if session:
                        await asyncio.wait_for(client.disconnect(), 2)
                    else:
                        # Never got a session: closing a channel that was not opened
                        # makes asyncua warn on every attempt of an outage.
                        client.disconnect_socket()
            if not self._stop.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self._retry_in)

    async def _session(self, client: Any) -> None:
        assert self._stop is not None
        if self.username:
            client.set_user(self.username)
        password = os.environ.get(self.password_env, "") if self.password_env else self.password
        if self.password_env and not password:
            raise ValueError(f"environment variable {self.password_env} (password_env) is not set")
        if password:
            client.set_password(password)
        if self.security:
            await client.set_security_string(self.security)
        await asyncio.wait_for(client.connect(), self.timeout + 1)
        self._ua_nodes = [client.get_node(spec.node_id) for spec in self.nodes]
        if self.mode == "subscription":
            period_ms = self.interval * 1000.0
            subscription = await client.create_subscription(period_ms, _Handler(self))
            results = await subscription.subscribe_data_change(
                self._ua_nodes, sampling_interval=period_ms
            )
            for spec, result in zip(self.nodes, results):
                if isinstance(result, ua.StatusCode):
                    log.warning(
                        "opcua %s: cannot subscribe to %s (%s): %s",
                        self.name,
                        spec.name,
                        spec.node_id,
                        status_name(result),
                    )
        self._client = client
        self._last_error = ""
        self._retry_in = self.reconnect_interval
        self._reported.clear()
        self._connected.set()
        log.info("opcua %s: connected to %s (%s)", self.name, self.endpoint, self.mode)
        # Probe the server every second: a dead TCP connection can look open for minutes.
        while not self._stop.is_set() and self._connected.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), 1.0)
            except asyncio.TimeoutError:
                await asyncio.wait_for(client.nodes.server_state.read_value(), self.timeout)
        if not self._stop.is_set():
            raise ConnectionError("connection lost")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    text = str(exc) or type(exc).__name__
    return text
