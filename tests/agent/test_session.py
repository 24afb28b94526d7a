"""Session edge cases that need no broker: a silent server, a bad URL."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from millstream_agent.session import BrokerURLError, parse_broker_url
from tests.agent.conftest import AgentProcess, agent_config, wait_until


def test_broker_urls() -> None:
    assert parse_broker_url("mqtt://10.0.0.5") == ("mqtt", "10.0.0.5", 1883)
    assert parse_broker_url("mqtts://broker.example") == ("mqtts", "broker.example", 8883)
    assert parse_broker_url("mqtt://[::1]:1884") == ("mqtt", "::1", 1884)
    for bad in ("http://x", "mqtt://", "tcp://x:1883", "mqtt://x:port"):
        with pytest.raises(BrokerURLError):
            parse_broker_url(bad)


def test_silent_broker_times_out_and_retries(tmp_path: Path, agents: list[AgentProcess]) -> None:
    """A server that accepts TCP but never answers CONNECT does not stall the agent."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                held.append(conn)
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        url = f"mqtt://127.0.0.1:{server.getsockname()[1]}"
        agent = AgentProcess(
            tmp_path, agent_config(tmp_path, url, mqtt={"broker": url, "connect_timeout": "1s"})
        )
        agents.append(agent.start())
        wait_until(lambda: agent.log().count("no CONNACK") >= 2, timeout=15)
        assert agent.alive
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()
