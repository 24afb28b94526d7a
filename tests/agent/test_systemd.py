"""Under systemd (``Type=notify``, ``WatchdogSec=``): ready, alive, its status, stopping.

The service manager's side is played by a real Unix datagram socket, as systemd's is:
the agent is told its address in ``NOTIFY_SOCKET`` and its watchdog period in
``WATCHDOG_USEC``, and everything it sends is read back here.
"""

from __future__ import annotations

import itertools
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import millstream_agent.agent as agent_module
from millstream_agent.agent import Agent
from millstream_agent.collectors import register
from millstream_agent.collectors.base import Collector, Sample
from millstream_agent.config import validate
from millstream_agent.systemd import SystemdNotifier
from tests.agent.conftest import AgentProcess, agent_config, wait_until
from tests.support.servers import ServerProcess

pytestmark = pytest.mark.integration


class NotifySocket:
    """systemd's end: a Unix datagram socket that keeps what it is sent, with arrival times."""

    def __init__(self) -> None:
        # A short path: a Unix socket's address is at most 107 bytes.
        self.path = str(Path(tempfile.mkdtemp(prefix="sd-")) / "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except OSError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append((time.monotonic(), fields))

    def with_key(self, key: str) -> list[tuple[float, dict[str, str]]]:
        return [(t, m) for t, m in list(self.messages) if key in m]

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=2)
        self.sock.close()
        Path(self.path).unlink(missing_ok=True)


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    sock = NotifySocket()
    try:
        yield sock
    finally:
        sock.close()


def test_the_agent_says_ready_feeds_the_watchdog_and_shows_its_link_and_queue(
    tmp_path: Path,
    mosquitto: ServerProcess,
    notify_socket: NotifySocket,
    agents: list[AgentProcess],
) -> None:
    broker = f"mqtt://127.0.0.1:{mosquitto.port}"
    env = {"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "2000000"}
    agent = AgentProcess(tmp_path, agent_config(tmp_path, broker), env=env)
    agents.append(agent.start())
    wait_until(lambda: notify_socket.with_key("READY"), timeout=20)
    wait_until(lambda: len(notify_socket.with_key("WATCHDOG")) >= 4, timeout=10)
    pings = [t for t, _ in notify_socket.with_key("WATCHDOG")]
    # Half the watchdog period apart (1 s), as systemd asks: never at its 2 s limit.
    assert max(b - a for a, b in itertools.pairwise(pings)) < 1.9
    assert notify_socket.with_key("READY")[0][0] <= pings[0]
    wait_until(
        lambda: any(
            m["STATUS"].startswith(f"connected to {broker}; 0 readings queued;")
            for _, m in notify_socket.with_key("STATUS")
        ),
        timeout=10,
    )
    # The broker goes away: the status line says so and what piles up meanwhile.
    mosquitto.stop()
    wait_until(
        lambda: any(
            m["STATUS"].startswith(f"not connected to {broker}")
            and "readings queued, oldest" in m["STATUS"]
            for _, m in notify_socket.with_key("STATUS")
        ),
        timeout=15,
    )
    assert agent.stop() == 0
    assert notify_socket.with_key("STOPPING")


def test_outside_systemd_nothing_is_sent_and_a_childs_watchdog_is_not_its_own() -> None:
    assert not SystemdNotifier(environ={}).notify({"READY": "1"})
    assert SystemdNotifier(environ={"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "4000000"}).watchdog_s
    # WATCHDOG_PID names another process (the parent that set it): not ours to answer.
    other = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}
    assert SystemdNotifier(environ=other).watchdog_s is None


HANG = threading.Event()


@register
class HangingCollector(Collector):
    """A source whose read does not return until released (a driver stuck in a call)."""

    type_name = "test-hang"
    options_spec: dict[str, Any] = {}

    def collect(self, now: float) -> list[Sample]:
        HANG.wait(timeout=30)
        return [Sample(now, "level", 1.0)]


def test_a_collector_that_never_returns_withholds_the_watchdog_until_it_does(
    tmp_path: Path,
    mosquitto: ServerProcess,
    notify_socket: NotifySocket,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.path)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # a ping every 0.2 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setattr(agent_module, "STUCK_AFTER", 1.0)
    collectors = [{"type": "test-hang", "name": "plc", "interval": "100ms", "options": {}}]
    raw = agent_config(tmp_path, f"mqtt://127.0.0.1:{mosquitto.port}", collectors=collectors)
    agent = Agent(validate(raw, "agent.yaml", {}))
    HANG.clear()
    released: list[float] = []

    def release() -> None:
        released.append(time.monotonic())
        HANG.set()

    agent.loop.call_later(3.0, release)
    agent.loop.call_later(4.5, agent.request_stop)
    started = time.monotonic()
    assert agent.run() == 0
    pings = [t - started for t, _ in notify_socket.with_key("WATCHDOG")]
    stuck = [
        (t - started, m["STATUS"])
        for t, m in notify_socket.with_key("STATUS")
        if m["STATUS"].startswith("collector plc has not returned for")
    ]
    # Alive while the read is young; silent once it is stuck; alive again once it returns.
    assert stuck and 1.0 <= stuck[0][0] < 2.5
    assert any(t < stuck[0][0] for t in pings)
    assert not [t for t in pings if stuck[0][0] <= t < released[0] - started]
    assert any(t > released[0] - started for t in pings)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_collector_thread_is_reported_as_stuck(tmp_path: Path) -> None:
    from millstream_agent.agent import CollectorRunner, open_queue
    from millstream_agent.clock import ClockWatch

    queue = open_queue(str(tmp_path / "q.db"), fsync="off")
    runner = CollectorRunner(queue, ClockWatch(), None)
    assert runner.stuck(time.monotonic()) is None  # not started: nothing to say

    def die() -> None:
        raise RuntimeError("a bug in the collector loop")

    runner._thread = threading.Thread(target=die, daemon=True)
    runner._thread.start()
    runner._thread.join(timeout=5)
    assert runner.stuck(time.monotonic()) == "the collector thread has died"
    runner.stop()  # a stop asked for is not a death
    assert runner.stuck(time.monotonic()) is None
    queue.close()
