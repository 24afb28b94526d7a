"""`make demo` as a user runs it: it serves the fleet, then stops cleanly with exit 0."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.cloud import API
from tests.support.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_serves_twenty_devices_then_exits_cleanly(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "scripts" / "demo.py"),
            "--devices",
            "20",
            "--duration",
            "25",
            "--port",
            str(port),
            "--interval",
            "2",
            "--workdir",
            str(tmp_path / "demo"),
            # Faults from the start (detection is still warming up: none is found), so the
            # closing report has the fleet's ground truth to read.
            "--fault-start-after",
            "2s",
            "--fault-rate",
            "120",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        api = API(port)
        api.wait_for(lambda a: a.get("/healthz") == {"status": "ok"}, timeout=60)
        devices = api.wait_for(
            lambda a: (
                (d := a.get("/api/v1/devices")["devices"])
                and len(d) == 20
                and all(x["online"] for x in d)
                and d
            ),
            timeout=30,
        )
        assert len(devices) == 20
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert "devices online 20/20" in out
    assert "nothing left running" in out
    # The closing report: the faults the fleet injected (its ground-truth file) against the
    # anomalies the API lists.
    assert "demo: what detection found" in out
    injected = (tmp_path / "demo" / "faults.jsonl").read_text().splitlines()
    assert injected, out
    counted = re.search(r"injected faults  (\d+) .*?(?:\((\d+) more injected|$)", out, re.M)
    assert counted, out
    assert int(counted[1]) + int(counted[2] or 0) == len(injected)
    assert re.search(r"found            (stuck|spike) \d+ of \d+", out), out
    # Nothing left behind: the API port is free again and a second run could start.
    time.sleep(0.5)
    import socket

    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_demo_runs_on_the_embedded_broker_when_asked(tmp_path: Path) -> None:
    """Without Mosquitto the demo falls back to an in-process broker and says so."""
    pytest.importorskip("amqtt", reason="amqtt is installed by requirements-dev.txt")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--embedded-broker", "--devices", "3",
         "--duration", "10", "--port", str(free_port()), "--interval", "3",
         "--workdir", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "embedded in-process MQTT broker" in proc.stdout
    assert "devices online 3/3" in proc.stdout
