"""Fixtures for ingest tests: a cloud process (``millstream-cloud serve``) and a publisher."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest

from tests.support.servers import free_port

NS = 1_000_000_000


def ts(time_ns: int) -> str:
    secs, frac = divmod(time_ns, NS)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac // 1000:06d}Z"


def batch(device: str, seq: int, t0_ns: int, n: int = 40, metrics: int = 4, **extra: Any) -> bytes:
    """A valid telemetry message: ``n`` readings over ``metrics`` metrics, 1 ms apart."""
    readings = [
        {"ts": ts(t0_ns + i * 1_000_000), "metric": f"m{i % metrics}", "value": float(seq * n + i)}
        for i in range(n)
    ]
    return json.dumps(
        {"v": 1, "device": device, "seq": seq, "readings": readings, **extra}
    ).encode()


def telemetry_topic(device: str, site: str = "plant1") -> str:
    return f"millstream/v1/{site}/{device}/telemetry"


class Publisher:
    """A paho QoS 1 publisher that waits for every PUBACK."""

    def __init__(self, broker_url: str, client_id: str = "test-publisher") -> None:
        port = int(broker_url.rsplit(":", 1)[1])
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self._infos: list[mqtt.MQTTMessageInfo] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        self._infos.append(info)

    def flush(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        for info in self._infos:
            info.wait_for_publish(max(deadline - time.monotonic(), 0.01))
            assert info.is_published(), "broker did not acknowledge a publish"
        self._infos.clear()

    def close(self) -> None:
        self.flush()
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Cloud:
    """``millstream-cloud serve`` as a child process (killable with SIGKILL)."""

    broker_url: str
    data_dir: Path
    client_id: str = "cloud-1"
    port: int = field(default_factory=free_port)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.client_id}.log"

    def start(self, wait_ready: bool = True) -> Cloud:
        argv = [
            sys.executable, "-m", "millstream_cloud.cli", "serve",
            "--broker", self.broker_url, "--data-dir", str(self.data_dir),
            "--port", str(self.port), "--client-id", self.client_id,
        ]  # fmt: skip
        log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env},
            start_new_session=True,
        )  # fmt: skip
        log.close()
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"cloud exited:\n{self.log()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"cloud not ready:\n{self.log()}")

    def get(self, path: str, **params: Any) -> Any:
        r = httpx.get(self.url + path, params=params, timeout=30)
        r.raise_for_status()
        return r.json()

    def metrics_text(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=10).text

    def metric(self, name: str, labels: str = "") -> float:
        """Value of one sample in /metrics (0 when absent)."""
        key = f"{name}{{{labels}}}" if labels else name
        for line in self.metrics_text().splitlines():
            if line.startswith(key + " "):
                return float(line.split()[-1])
        return 0.0

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""


@pytest.fixture
def clouds(broker_url: str, tmp_path: Path) -> Iterator[list[Cloud]]:
    """Make clouds with ``clouds.append(Cloud(...))``-style helper: see ``make_cloud``."""
    made: list[Cloud] = []
    yield made
    for c in made:
        c.stop()


@pytest.fixture
def make_cloud(clouds: list[Cloud], broker_url: str, tmp_path: Path) -> Any:
    def make(client_id: str = "cloud-1", data_dir: Path | None = None, start: bool = True) -> Cloud:
        cloud = Cloud(broker_url, data_dir or tmp_path / "data", client_id)
        clouds.append(cloud)
        return cloud.start() if start else cloud

    return make


@pytest.fixture
def publisher(broker_url: str) -> Iterator[Publisher]:
    pub = Publisher(broker_url)
    yield pub
    try:
        pub.close()
    except Exception:
        pass


def wait_until(pred: Any, timeout: float = 30.0, interval: float = 0.1, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what or pred}")


def stored_count(cloud: Cloud, devices: list[str], metrics: int = 4) -> int:
    """Readings stored for ``devices`` (count aggregate over all time, through the API)."""
    total = 0
    for d in devices:
        try:
            res = cloud.get(
                f"/api/v1/devices/{d}/telemetry",
                metric=[f"m{i}" for i in range(metrics)],
                start="2000-01-01T00:00:00Z",
                end="2100-01-01T00:00:00Z",
                agg="count",
            )
        except httpx.HTTPStatusError:
            continue
        for series in res if isinstance(res, list) else [res]:
            total += sum(int(p["value"]) for p in series["points"])
    return total
