"""``millstream-agent simulate``: many devices, one process, real Mosquitto."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def test_history_sends_each_machines_healthy_past_first_then_goes_live(
    broker_url: str, recorder: Recorder, tmp_path: Path
) -> None:
    """``--history``: back-dated readings every ``--history-step`` up to the start, in
    order before the live ones, with no fault in them (faults are planned from the live
    start, so a detector has learned the machine before the first)."""
    truth = tmp_path / "faults.jsonl"
    started = time.time()
    result = subprocess.run(
        simulate(
            "--devices", "2", "--rate", "5", "--metrics", "4", "--duration", "3",
            "--broker", broker_url, "--site", "plant-h",
            "--history", "10m", "--history-step", "10", "--history-rate", "200",
            "--fault-rate", "3600", "--fault-types", "spike", "--fault-start-after", "0s",
            "--ground-truth", str(truth),
        ),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    assert counts["generated"] == counts["acknowledged"]
    wait_until(
        lambda: (
            sum(len(check_stream(m)) for m in recorder.telemetry().values()) == counts["generated"]
        ),
        timeout=10,
    )
    faults = [json.loads(line) for line in truth.read_text().splitlines()]
    assert faults, "no fault injected live"
    for device, messages in recorder.telemetry().items():
        readings = check_stream(messages)  # one stream, in time order: the past, then live
        stamps = sorted({_epoch(r["ts"]) for r in readings})
        past = [t for t in stamps if t < started]
        assert len(past) == 60, f"{device}: {len(past)} past collections, expected 10 min / 10 s"
        assert started - 600 - 1 <= past[0] and past[-1] < started
        assert {round(b - a, 3) for a, b in itertools.pairwise(past)} == {10.0}
        live = [t for t in stamps if t >= started]
        assert len(live) >= 5  # at 5 Hz for 3 s, behind a past sent at 200 readings/s
        mine = [f for f in faults if f["device"] == device]
        assert mine and all(_epoch(f["start"]) >= live[0] for f in mine)


def test_history_is_refused_when_negative() -> None:
    result = subprocess.run(
        simulate("--history", "-1h"), capture_output=True, text=True, timeout=30
    )
    assert result.returncode != 0
    assert "--history" in result.stderr


def _epoch(text: str) -> float:
    from datetime import datetime, timezone

    stamp = datetime.strptime(text.replace("Z", ""), "%Y-%m-%dT%H:%M:%S.%f")
    return stamp.replace(tzinfo=timezone.utc).timestamp()
