"""`make demo` as a user runs it: it serves the fleet, then stops cleanly with exit 0."""

from __future__ import annotations

import importlib.util
import os
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
            "15",
            "--port",
            str(port),
            "--interval",
            "2",
            "--workdir",
            str(tmp_path / "demo"),
            # No past (its 12 h take 20 devices three minutes to send), and faults from the
            # start (detection is still warming up: none is found), so the closing report
            # has the fleet's ground truth to read.
            "--history",
            "0",
            "--fault-types",
            "stuck,spike",
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
        _stop(proc)
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
         "--duration", "10", "--history", "0", "--port", str(free_port()), "--interval", "3",
         "--workdir", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "embedded in-process MQTT broker" in proc.stdout
    assert "devices online 3/3" in proc.stdout


def test_demo_fleet_sends_its_past_so_device_models_are_trained_before_its_faults(
    tmp_path: Path,
) -> None:
    """The default demo: each machine first sends 12 h of its healthy past through the
    broker, the cloud learns it (its device models train on it), then the live fleet's
    faults are judged by them and the closing report says what was found."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--devices", "1",
         "--duration", "40", "--port", str(port), "--interval", "5",
         "--workdir", str(tmp_path / "demo"), "--history", "12h",
         # a stuck sensor once the past is in: found within 12 readings of it
         "--fault-types", "stuck", "--fault-rate", "3600", "--fault-start-after", "15s"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        # A detection queue too small for the past: the cloud leaves it in the store and
        # reads it back (docs/cloud.md, Detection falling behind), in order, all of it.
        env={**os.environ, "MILLSTREAM_DETECTION__QUEUE_MAX_READINGS": "1000"},
    )  # fmt: skip
    try:
        api = API(port)
        api.wait_for(lambda a: a.get("/healthz") == {"status": "ok"}, timeout=60)
        trained = api.wait_for(
            lambda a: a.get("/api/v1/devices/demo-plant-0001/detection")["device_model"]["trained"],
            timeout=70,
            interval=1.0,
        )
        assert trained
        # Scored, not skipped: the past outran the detection queue, was read back from the
        # store, and nothing of it was lost.
        counters = {
            name: float(value)
            for name, value in (
                line.rsplit(" ", 1)
                for line in api.text("/metrics").splitlines()
                if line.startswith("millstream_detection_")
            )
        }
        assert counters["millstream_detection_skipped_readings_total"] == 0
        assert counters["millstream_detection_read_back_readings_total"] > 0, counters
        out, _ = proc.communicate(timeout=120)
    finally:
        _stop(proc)
    assert proc.returncode == 0, out
    assert "each machine first sends 12 h of its healthy past (43,200 readings" in out
    # Whether a summary line catches detection behind depends on this machine's speed
    # (test_summary_says_when_detection_is_learning_the_past checks the note itself).
    assert re.search(r"readings stored 4\d,\d{3} ", out), out  # the past and the live minute
    assert re.search(r"found            stuck [12] of [12]\n", out), out
    assert "0 outside one" in out, out


def _stop(proc: subprocess.Popen[str]) -> None:
    """Kill the demo if it is still running (a failed test must not leave it behind)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_summary_says_when_detection_is_learning_the_past() -> None:
    """The summary line notes how far detection trails what is stored, once that is more
    than a trickle (the fleet's past being learned), and says nothing while it keeps up."""
    spec = importlib.util.spec_from_file_location("demo_script", ROOT / "scripts" / "demo.py")
    assert spec and spec.loader
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert demo.detection_note(43_200, 9_900) == "  detection learning (33,300 readings behind)"
    assert demo.detection_note(43_320, 43_300) == ""
    assert demo.detection_note(2_001, 1_000) == "  detection learning (1,001 readings behind)"
    assert demo.detection_note(2_000, 1_000) == ""


def test_a_demo_too_short_to_show_a_fault_found_says_so_before_it_runs() -> None:
    """A DURATION that ends before the first fault (or too soon after it) is told at
    start what it will miss and what length shows faults found; one long enough, or a
    run until Ctrl-C, is told nothing."""
    spec = importlib.util.spec_from_file_location("demo_script", ROOT / "scripts" / "demo.py")
    assert spec and spec.loader
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    before = demo.duration_note(300, 312)
    assert "ends before the first fault is injected (at 312 s)" in before
    assert "DURATION=660 or more" in before
    soon = demo.duration_note(400, 312)
    assert "stops 88 s after the first fault" in soon and "DURATION=660" in soon
    assert demo.duration_note(660, 312) == ""
    assert demo.duration_note(0, 312) == ""
