from __future__ import annotations

from pathlib import Path

from millstream_agent.clock import ClockWatch
from tests.agent.conftest import AgentProcess, Recorder, agent_config, wait_until
from tests.support.servers import ServerProcess


class Fake:
    def __init__(self, wall: float) -> None:
        self.wall = wall
        self.mono = 100.0

    def step(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def test_pi_booting_at_1970_is_unsynced_until_ntp() -> None:
    t = Fake(wall=30.0)
    clock = ClockWatch(min_year=2024, wall=lambda: t.wall, mono=lambda: t.mono)
    assert not clock.synced()
    t.wall = 1_800_000_000.0  # NTP set the clock: a forward jump is fine
    assert clock.synced()


def test_time_going_backwards_marks_unsynced_for_settle() -> None:
    t = Fake(wall=1_800_000_000.0)
    clock = ClockWatch(settle=60, wall=lambda: t.wall, mono=lambda: t.mono)
    assert clock.synced()
    t.step(1)
    t.wall -= 3600
    assert not clock.synced()
    t.step(30)
    assert not clock.synced()
    t.step(31)
    assert clock.synced()


def test_unsynced_readings_are_marked_on_the_wire(
    tmp_path: Path, mosquitto: ServerProcess, recorder: Recorder, agents: list[AgentProcess]
) -> None:
    """A clock before clock.min_year (here: any clock) marks every message unsynced."""
    config = agent_config(tmp_path, f"mqtt://127.0.0.1:{mosquitto.port}", clock={"min_year": 2100})
    agent = AgentProcess(tmp_path, config)
    agents.append(agent.start())
    messages = wait_until(lambda: recorder.telemetry().get("press-01"), timeout=20)
    assert all(m.get("clock") == "unsynced" for m in messages)
    assert "before the minimum valid time" in agent.log()
