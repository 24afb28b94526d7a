"""Helpers for the agent's tests: a recording MQTT subscriber, agent processes, configs."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.servers import ServerProcess, free_port, mosquitto_server

REPO_ROOT = Path(__file__).resolve().parents[2]


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


class Recorder:
    """Subscribes to millstream/v1/# at QoS 1 with a persistent session and keeps every
    message in arrival order, so a broker restart loses nothing on the test side either."""

    def __init__(self, port: int, client_id: str | None = None) -> None:
        self.port = port
        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"recorder-{os.getpid()}-{id(self)}",
            clean_session=False,
        )
        self.client.reconnect_delay_set(1, 1)
        self.client.max_inflight_messages_set(1000)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_disconnect = lambda *a: self.connected.clear()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if not rc.is_failure:
            client.subscribe("millstream/v1/#", qos=1)
            self.connected.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def start(self) -> Recorder:
        self.client.connect("127.0.0.1", self.port, keepalive=5)
        self.client.loop_start()
        assert self.connected.wait(10), "recorder could not connect"
        time.sleep(0.2)  # the SUBACK
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def publish(self, topic: str, payload: Any, retain: bool = False) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.client.publish(topic, data, qos=1, retain=retain).wait_for_publish(5)

    def on(self, suffix: str) -> list[dict]:
        with self.lock:
            items = list(self.messages)
        out = []
        for topic, payload, _retain in items:
            if topic.endswith(suffix):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(payload))
        return out

    def telemetry(self) -> dict[str, list[dict]]:
        """device -> telemetry messages in arrival order."""
        out: dict[str, list[dict]] = defaultdict(list)
        for msg in self.on("/telemetry"):
            out[msg["device"]].append(msg)
        return out


def check_stream(messages: list[dict]) -> list[dict]:
    """Assert one device's stream is complete and in order; returns its unique readings.

    At least once: a repeated seq is a duplicate (dropped here); the first copies must
    arrive in increasing seq order with no gap, and reading timestamps never go back.
    """
    seen: dict[int, dict] = {}
    order: list[int] = []
    for msg in messages:
        if msg["seq"] in seen:
            assert seen[msg["seq"]]["readings"] == msg["readings"], "same seq, other readings"
            continue
        seen[msg["seq"]] = msg
        order.append(msg["seq"])
    assert order == sorted(order), "messages arrived out of seq order"
    assert order == list(range(order[0], order[0] + len(order))), (
        f"gap in seq: {sorted(set(range(order[0], order[-1] + 1)) - set(order))[:10]}"
    )
    readings = [r for seq in order for r in seen[seq]["readings"]]
    stamps = [r["ts"] for r in readings]
    assert stamps == sorted(stamps), "readings out of time order"
    return readings


def ts_gaps(readings: list[dict]) -> list[float]:
    from datetime import datetime

    def parse(text: str) -> float:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()

    stamps = sorted({parse(r["ts"]) for r in readings})
    return [stamps[i + 1] - stamps[i] for i in range(len(stamps) - 1)]


def agent_config(tmp_path: Path, broker_url: str, **sections: Any) -> dict:
    """A fast-moving test configuration; ``sections`` override top-level sections."""
    config: dict[str, Any] = {
        "device": {"id": "press-01", "site": "plant-a", "kind": "motor"},
        "mqtt": {
            "broker": broker_url,
            "keepalive": "5s",
            "reconnect_min": "200ms",
            "reconnect_max": "1s",
            "refused_retry": "30s",
            "connect_timeout": "2s",
        },
        "queue": {"path": str(tmp_path / "state" / "queue.db"), "fsync": "normal"},
        "batch": {"max_readings": 100, "max_delay": "200ms"},
        "self_monitoring": {"enabled": False, "interval": "1s"},
        "collectors": [
            {
                "type": "simulated",
                "name": "machine",
                "interval": "100ms",
                "options": {"kind": "motor", "metrics": 10, "seed": 1, "faults": "none"},
            }
        ],
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


class AgentProcess:
    """``millstream-agent run -c`` as a child process with its log in a file."""

    def __init__(self, tmp_path: Path, config: dict, name: str = "agent", env: dict | None = None):
        self.tmp_path = tmp_path
        self.config_path = tmp_path / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = tmp_path / f"{name}.log"
        self.env = {**os.environ, **(env or {})}
        self.python = sys.executable  # the interpreter that runs it
        self.proc: subprocess.Popen | None = None

    def start(self) -> AgentProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed right after Popen
        self.proc = subprocess.Popen(
            [self.python, "-m", "millstream_agent.cli", "run", "-c", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )
        log.close()
        return self

    def stop(self, timeout: float = 15.0) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


@pytest.fixture
def recorder(mosquitto: ServerProcess) -> Iterator[Recorder]:
    rec = Recorder(mosquitto.port).start()
    try:
        yield rec
    finally:
        rec.stop()


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    """Agent processes registered here are always stopped at teardown."""
    started: list[AgentProcess] = []
    try:
        yield started
    finally:
        for agent in started:
            agent.kill()


def password_line(user: str, password: str) -> str:
    """A Mosquitto 2 password-file line ($7$: PBKDF2-SHA512, 101 rounds)."""
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101, 64)
    return f"{user}:$7$101${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}\n"


def custom_mosquitto(workdir: Path, extra: str) -> ServerProcess:
    return mosquitto_server(workdir, port=free_port(), extra_config=extra)


def have_mosquitto_passwd() -> bool:
    return shutil.which("mosquitto_passwd") is not None
