"""Run `millstream-cloud serve` as a real child process for end-to-end tests."""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.servers import ServerProcess, free_port

BIN = Path(sys.executable).parent


def cloud_server(
    workdir: Path,
    broker_url: str,
    port: int | None = None,
    client_id: str = "millstream-cloud-1",
    extra_args: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> ServerProcess:
    """A cloud service process (not started) with its data in ``workdir / 'data'``."""
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [
        str(BIN / "millstream-cloud"),
        "serve",
        "--broker",
        broker_url,
        "--port",
        str(port),
        "--data-dir",
        str(workdir / "data"),
        "--client-id",
        client_id,
        *(extra_args or []),
    ]
    return ServerProcess(argv, port, workdir, workdir / f"cloud-{port}.log", env=env or {})


class API:
    """A tiny JSON client for the service's HTTP API."""

    def __init__(self, port: int, token: str | None = None) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.token = token

    def request(
        self, method: str, path: str, body: Any = None, timeout: float = 10.0
    ) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
                status = resp.status
        except urllib.error.HTTPError as exc:
            raw, status = exc.read(), exc.code
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def get(self, path: str) -> Any:
        status, body = self.request("GET", path)
        assert status == 200, f"GET {path}: {status} {body}"
        return body

    def text(self, path: str) -> str:
        with urllib.request.urlopen(self.base + path, timeout=10) as resp:
            return str(resp.read().decode())

    def wait_for(self, predicate: Any, timeout: float = 30.0, interval: float = 0.2) -> Any:
        """Poll until ``predicate(self)`` returns a truthy value; return it."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = predicate(self)
            except (OSError, AssertionError, KeyError):
                last = None
            if last:
                return last
            time.sleep(interval)
        raise TimeoutError(f"condition not met in {timeout}s (last: {last!r})")


def metric_value(text: str, name: str, labels: str | None = None) -> float:
    """Sum of a Prometheus metric's samples (optionally one label set) in exposition text."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        key, _, value = line.rpartition(" ")
        metric, _, label_part = key.partition("{")
        if metric != name:
            continue
        if labels is not None and labels not in label_part:
            continue
        total += float(value)
    return total
