"""``millstream-agent simulate``: many devices, one process, real Mosquitto."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.agent.conftest import Recorder, check_stream, wait_until
from tests.support.servers import ServerProcess

pytestmark = pytest.mark.integration


def simulate(*args: str) -> list[str]:
    return [sys.executable, "-m", "millstream_agent.cli", "simulate", *args]


def test_five_devices_every_reading_acknowledged_and_received(
    broker_url: str, recorder: Recorder
) -> None:
    result = subprocess.run(
        simulate(
            "--devices",
            "5",
            "--rate",
            "5",
            "--metrics",
            "4",
            "--duration",
            "3",
            "--broker",
            broker_url,
            "--site",
            "plant-b",
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    assert counts["generated"] == counts["published"] == counts["acknowledged"] > 5 * 4 * 10
    wait_until(
        lambda: (
            sum(len(check_stream(m)) for m in recorder.telemetry().values()) == counts["generated"]
        ),
        timeout=10,
    )
    streams = recorder.telemetry()
    assert sorted(streams) == [f"plant-b-{i:04d}" for i in range(1, 6)]
    for device, messages in streams.items():
        for msg in messages:
            assert msg["v"] == 1 and msg["device"] == device and "clock" not in msg
    statuses = recorder.on("/status")
    online = [s for s in statuses if s["state"] == "online"]
    offline = [s for s in statuses if s["state"] == "offline"]
    assert {s["device"] for s in online} == set(streams)
    assert {(s["device"], s["reason"]) for s in offline} == {(d, "shutdown") for d in streams}


def test_runs_until_sigterm_and_prints_counts_last(
    broker_url: str, recorder: Recorder, mosquitto: ServerProcess
) -> None:
    proc = subprocess.Popen(
        simulate("--devices", "3", "--broker", broker_url, "--rate", "2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: len(recorder.telemetry()) == 3, timeout=15)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    counts = json.loads(out.strip().splitlines()[-1])
    assert counts["generated"] == counts["acknowledged"] > 0


def test_last_will_when_the_process_dies(mosquitto: ServerProcess, recorder: Recorder) -> None:
    proc = subprocess.Popen(
        simulate("--devices", "2", "--broker", f"mqtt://127.0.0.1:{mosquitto.port}"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: len([s for s in recorder.on("/status") if s["state"] == "online"]) == 2)
        time.sleep(0.5)
        proc.kill()
        proc.wait()
        # the broker notices the dead sockets at once and publishes each device's will
        wait_until(
            lambda: (
                {s["device"] for s in recorder.on("/status") if s["reason"] == "connection-lost"}
                == {"sim-0001", "sim-0002"}
            ),
            timeout=15,
        )
    finally:
        if proc.poll() is None:
            proc.kill()


def test_exits_promptly_when_the_broker_is_gone(
    mosquitto: ServerProcess, recorder: Recorder
) -> None:
    proc = subprocess.Popen(
        simulate("--devices", "3", "--broker", f"mqtt://127.0.0.1:{mosquitto.port}"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: len(recorder.telemetry()) == 3, timeout=15)
        recorder.stop()
        mosquitto.stop()
        time.sleep(1.5)  # readings pile up unacknowledged
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert took < 10, f"exit took {took:.1f}s with the broker gone"
    counts = json.loads(out.strip().splitlines()[-1])
    assert counts["generated"] > counts["acknowledged"] > 0
