"""`millstream-agent run -c` with the sample-config output, as a user would start it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.agent.conftest import AgentProcess, Recorder, wait_until
from tests.support.servers import ServerProcess

pytestmark = pytest.mark.integration


def test_sample_config_runs_as_it_is(
    tmp_path: Path, mosquitto: ServerProcess, recorder: Recorder, agents: list[AgentProcess]
) -> None:
    sample = subprocess.run(
        [
            sys.executable,
            "-m",
            "millstream_agent.cli",
            "sample-config",
            "--broker",
            f"mqtt://127.0.0.1:{mosquitto.port}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    agent = AgentProcess(tmp_path, {}, env={"STATE_DIRECTORY": str(tmp_path / "state")})
    agent.config_path.write_text(sample)  # byte for byte what sample-config printed
    agents.append(agent.start())
    wait_until(lambda: len(recorder.telemetry().get("press-01", [])) >= 2, timeout=20)
    messages = recorder.telemetry()["press-01"]
    readings = [r for m in messages for r in m["readings"]]
    assert len({r["metric"] for r in readings}) == 10  # ten metrics ...
    assert (tmp_path / "state" / "queue.db").exists()  # ... queued under $STATE_DIRECTORY
    assert agent.stop() == 0
    statuses = [s for s in recorder.on("/status") if s["device"] == "press-01"]
    assert [(s["state"], s["reason"]) for s in statuses] == [
        ("online", "connected"),
        ("offline", "shutdown"),
    ]
    assert statuses[0]["kind"] == "motor" and statuses[0]["agent_version"]
