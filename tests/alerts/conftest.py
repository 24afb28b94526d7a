"""Real receivers for alert tests: an HTTP webhook server and an SMTP server, on free
loopback ports, always stopped; and a factory for an AlertService on a manual clock."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from millstream_cloud.alerts.clock import ManualClock
from millstream_cloud.alerts.service import AlertService
from millstream_cloud.alerts.settings import AlertSettings
from millstream_cloud.model import Reading

T0 = 1_780_000_000 * 1_000_000_000  # a fixed start of alert time


@dataclass
class Received:
    time: float  # wall clock (time.time()) at arrival
    path: str
    body: Any
    headers: dict[str, str]


@dataclass
class WebhookServer:
    """Records every POST; ``status`` makes it answer with an error (a receiver that is down)."""

    port: int = 0
    received: list[Received] = field(default_factory=list)
    status: int = 200
    attempts: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None
    listeners: list[Callable[[Received], None]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> WebhookServer:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                arrived = time.time()
                with outer.lock:
                    outer.attempts += 1
                    status = outer.status
                if status != 200:
                    self.send_response(status)
                    self.end_headers()
                    return
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw.decode(errors="replace")
                rec = Received(arrived, self.path, body, dict(self.headers))
                with outer.lock:
                    outer.received.append(rec)
                for listener in outer.listeners:
                    listener(rec)
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def bodies(self) -> list[Any]:
        with self.lock:
            return [r.body for r in self.received]

    def wait_for(self, n: int, timeout: float = 10.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.received) >= n:
                break
            time.sleep(0.01)
        return self.bodies()


@pytest.fixture
def webhook() -> Iterator[WebhookServer]:
    server = WebhookServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def webhook2() -> Iterator[WebhookServer]:
    server = WebhookServer().start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class SmtpSink:
    port: int
    messages: list[Any]

    def wait_for(self, n: int, timeout: float = 10.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.messages) < n:
            time.sleep(0.01)
        return list(self.messages)


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    from aiosmtpd.controller import Controller
    from aiosmtpd.handlers import Message

    from tests.support.servers import free_port

    messages: list[Any] = []

    class Collect(Message):
        def handle_message(self, message: Any) -> None:
            messages.append(message)

    port = free_port()
    controller = Controller(Collect(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield SmtpSink(port, messages)
    finally:
        controller.stop()


def write_rules(path: Path, rules: list[dict[str, Any]]) -> str:
    path.write_text(yaml.safe_dump({"rules": rules}))
    return str(path)


ServiceFactory = Callable[..., AlertService]


@pytest.fixture
def make_service(tmp_path: Path) -> Iterator[ServiceFactory]:
    """Build AlertServices on one data dir (so a second one is a restart) and stop them all."""
    made: list[AlertService] = []

    def factory(
        rules: list[dict[str, Any]],
        route: dict[str, Any],
        receivers: list[dict[str, Any]],
        clock: ManualClock,
        devices: Callable[[], Any] | None = None,
        **extra: Any,
    ) -> AlertService:
        settings = AlertSettings.model_validate(
            {
                "rule_files": [write_rules(tmp_path / "rules.yaml", rules)],
                "route": route,
                "receivers": receivers,
                "delivery": {
                    "max_attempts": 4,
                    "backoff_initial_s": 0.05,
                    "backoff_max_s": 0.2,
                    "timeout_s": 2,
                },
                **extra,
            }
        )
        svc = AlertService(settings, tmp_path / "data", devices=devices, clock=clock)
        made.append(svc)
        return svc

    yield factory
    for svc in made:
        try:
            svc.stop()
        except Exception:
            pass


def reading(
    device: str, metric: str, value: float, clock: ManualClock, site: str = "plant-a"
) -> Reading:
    return Reading(device=device, site=site, metric=metric, time_ns=clock.now_ns(), value=value)


@dataclass
class FakeDevice:
    id: str
    site: str
    online: bool = True
    last_seen_ns: int | None = None
