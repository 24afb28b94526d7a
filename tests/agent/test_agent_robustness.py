"""The agent survives what the field throws at its disk: an unreadable queue file, a full disk."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from millstream_agent.agent import CollectorRunner, open_queue
from millstream_agent.clock import ClockWatch
from millstream_agent.queue import SqliteQueue
from tests.agent.conftest import AgentProcess, Recorder, agent_config, wait_until
from tests.support.servers import ServerProcess


def test_unreadable_queue_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    path.write_bytes(b"this is not an SQLite database" * 100)
    queue = open_queue(str(path), fsync="off")
    queue.append(['{"ts":"2026-01-01T00:00:00.000Z","metric":"m","value":1}'])
    assert queue.stats().depth == 1
    assert [p.name.split(".corrupt-")[0] for p in tmp_path.glob("queue.db.corrupt-*")] == [
        "queue.db"
    ]


class FullDisk(SqliteQueue):
    def append(self, readings, clock_ok=True, now=None):  # type: ignore[no-untyped-def]
        raise sqlite3.OperationalError("database or disk is full")


def test_full_disk_counts_the_loss_and_keeps_collecting(tmp_path: Path) -> None:
    queue = FullDisk(str(tmp_path / "q.db"), fsync="off")
    runner = CollectorRunner(queue, ClockWatch(), lambda: None)
    runner.configure(
        [
            {
                "type": "simulated",
                "name": "m",
                "interval": 0.05,
                "enabled": True,
                "options": {"metrics": 5, "faults": "none"},
            }
        ]
    )
    runner.start()
    try:
        wait_until(lambda: queue.dropped >= 50, timeout=10)
        assert runner._thread.is_alive()
    finally:
        runner.stop()


def test_agent_starts_with_a_corrupt_queue(
    tmp_path: Path, mosquitto: ServerProcess, recorder: Recorder, agents: list[AgentProcess]
) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "queue.db").write_bytes(b"\x00garbage" * 512)
    agent = AgentProcess(tmp_path, agent_config(tmp_path, f"mqtt://127.0.0.1:{mosquitto.port}"))
    agents.append(agent.start())
    wait_until(lambda: recorder.telemetry().get("press-01"), timeout=20)
    assert "is unreadable" in agent.log()
    time.sleep(0.2)
    assert agent.alive
