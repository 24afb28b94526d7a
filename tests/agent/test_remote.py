"""config/desired → config/reported, and commands, through a real Mosquitto."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.agent.conftest import AgentProcess, Recorder, agent_config, wait_until
from tests.support.servers import ServerProcess

pytestmark = pytest.mark.integration

PREFIX = "millstream/v1/plant-a/press-01/"


def metrics_in_last(recorder: Recorder, n: int = 3) -> set[str]:
    messages = recorder.telemetry().get("press-01", [])[-n:]
    return {r["metric"] for m in messages for r in m["readings"]}


def reported(recorder: Recorder, revision: int) -> dict | None:
    for msg in reversed(recorder.on("/config/reported")):
        if msg["revision"] == revision:
            return msg
    return None


def desired(revision: int, config: dict) -> dict:
    return {"v": 1, "revision": revision, "config": config}


def three_metrics(interval: str = "100ms") -> dict:
    return {
        "collectors": [
            {
                "type": "simulated",
                "name": "machine",
                "interval": interval,
                "options": {"kind": "motor", "metrics": 3, "seed": 2, "faults": "none"},
            }
        ]
    }


def test_config_desired_applied_reported_and_persisted(
    tmp_path: Path, mosquitto: ServerProcess, recorder: Recorder, agents: list[AgentProcess]
) -> None:
    agent = AgentProcess(tmp_path, agent_config(tmp_path, f"mqtt://127.0.0.1:{mosquitto.port}"))
    agents.append(agent.start())
    wait_until(lambda: len(metrics_in_last(recorder)) == 10, timeout=20)

    recorder.publish(PREFIX + "config/desired", desired(1, three_metrics()), retain=True)
    report = wait_until(lambda: reported(recorder, 1), timeout=10)
    assert report["status"] == "accepted" and report["config"] == three_metrics()
    time.sleep(1.0)
    assert len(metrics_in_last(recorder)) == 3

    # invalid: rejected with the reason, nothing changes
    bad = {"collectors": [{"type": "simulated", "interval": "whenever"}]}
    recorder.publish(PREFIX + "config/desired", desired(2, bad), retain=True)
    report = wait_until(lambda: reported(recorder, 2), timeout=10)
    assert report["status"] == "rejected"
    assert "collectors[0].interval: expected a duration" in report["reason"]
    recorder.publish(PREFIX + "config/desired", desired(3, {"mqtt": {"broker": "mqtt://x"}}))
    report = wait_until(lambda: reported(recorder, 3), timeout=10)
    assert report["status"] == "rejected" and "cannot be changed remotely" in report["reason"]
    time.sleep(0.5)
    assert len(metrics_in_last(recorder)) == 3

    # persisted: a restart with no broker message still runs revision 1
    recorder.publish(PREFIX + "config/desired", b"", retain=True)  # clear the retained copy
    assert agent.stop() == 0
    assert json.loads((tmp_path / "state" / "remote-config.json").read_text())["revision"] == 1
    agents.append(agent.start())
    wait_until(lambda: "applying persisted remote config revision 1" in agent.log(), timeout=10)
    count = len(recorder.telemetry()["press-01"])
    wait_until(lambda: len(recorder.telemetry()["press-01"]) > count + 3, timeout=10)
    assert len(metrics_in_last(recorder)) == 3


def command(recorder: Recorder, name: str, cid: str, args: dict | None = None) -> dict:
    body: dict = {"v": 1, "id": cid}
    if args is not None:
        body["args"] = args
    recorder.publish(PREFIX + f"cmd/{name}", body)
    return wait_until(
        lambda: next((r for r in recorder.on(f"/cmd/{name}/result") if r["id"] == cid), None),
        timeout=10,
    )


def test_commands_ping_restart_collector_flush(
    tmp_path: Path, mosquitto: ServerProcess, recorder: Recorder, agents: list[AgentProcess]
) -> None:
    config = agent_config(
        tmp_path,
        f"mqtt://127.0.0.1:{mosquitto.port}",
        batch={"max_readings": 1000, "max_delay": "1h"},
    )
    agent = AgentProcess(tmp_path, config)
    agents.append(agent.start())
    wait_until(lambda: any(s["state"] == "online" for s in recorder.on("/status")), timeout=20)
    time.sleep(0.5)  # the SUBACK for cmd/+

    pong = command(recorder, "ping", "c-1")
    assert pong["ok"] and pong["result"]["pong"] is True

    # batches wait up to 1h here: flush sends what is queued now
    time.sleep(1.0)
    assert not recorder.telemetry().get("press-01")
    flushed = command(recorder, "flush", "c-2")
    assert flushed["ok"] and flushed["result"]["sealed_readings"] > 0
    wait_until(lambda: recorder.telemetry().get("press-01"), timeout=5)

    restarted = command(recorder, "restart-collector", "c-3", {"name": "machine"})
    assert restarted == {"v": 1, "id": "c-3", "ok": True, "result": {"restarted": "machine"}}
    missing = command(recorder, "restart-collector", "c-4", {"name": "nope"})
    assert not missing["ok"] and "no collector named 'nope'" in missing["error"]
    unknown = command(recorder, "reboot-the-plant", "c-5")
    assert not unknown["ok"] and "unknown command" in unknown["error"]
    assert agent.alive
