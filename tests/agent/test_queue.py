"""The store-and-forward queue: ordering, acks, persistence, bounds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from millstream_agent.queue import BaseQueue, MemoryQueue, SqliteQueue


def readings(start: int, n: int) -> list[str]:
    return [
        json.dumps({"ts": "2026-01-01T00:00:00.000Z", "metric": "m", "value": i})
        for i in range(start, start + n)
    ]


def values(queue: BaseQueue) -> list[int]:
    return [r["value"] for m in queue.unacked(None, 10_000) for r in json.loads(m.body)]


@pytest.fixture(params=["sqlite", "memory"])
def queue(request: pytest.FixtureRequest, tmp_path: Path) -> BaseQueue:
    if request.param == "sqlite":
        return SqliteQueue(str(tmp_path / "q.db"), fsync="off")
    return MemoryQueue(first_seq=1)


def test_seal_in_order_and_ack(queue: BaseQueue) -> None:
    queue.append(readings(0, 250))
    assert queue.seal(100, 60.0) == 2  # two full batches; 50 wait for max_delay
    assert queue.seal(100, 60.0, force=True) == 1
    msgs = queue.unacked(None, 10)
    assert [m.n for m in msgs] == [100, 100, 50]
    assert [m.seq for m in msgs] == list(range(msgs[0].seq, msgs[0].seq + 3))
    assert values(queue) == list(range(250))
    assert queue.ack([msgs[0].seq]) == 100
    assert queue.stats().depth == 150
    assert [m.seq for m in queue.unacked(msgs[0].seq, 10)] == [msgs[1].seq, msgs[2].seq]


def test_batch_waits_for_max_delay(queue: BaseQueue) -> None:
    queue.append(readings(0, 5))
    assert queue.seal(100, 60.0) == 0
    assert queue.seal(100, 0.0) == 1
    queue.append(readings(5, 5))
    assert queue.seal(100, 60.0, force=True) == 1


def test_clock_flag_splits_batches(queue: BaseQueue) -> None:
    queue.append(readings(0, 3), clock_ok=False)
    queue.append(readings(3, 3), clock_ok=True)
    queue.seal(100, 0.0)
    assert [(m.n, m.clock_ok) for m in queue.unacked(None, 10)] == [(3, False), (3, True)]


def test_max_bytes_drops_oldest_and_counts(tmp_path: Path) -> None:
    queue = SqliteQueue(str(tmp_path / "q.db"), max_bytes=20_000, fsync="off")
    for i in range(20):
        queue.append(readings(i * 50, 50))
    stats = queue.stats()
    assert stats.dropped > 0
    assert stats.bytes <= 20_000
    kept = [json.loads(b)["value"] for b in _pending_bodies(queue)]
    assert kept == list(range(1000 - len(kept), 1000))  # the newest survive, in order
    assert stats.dropped + len(kept) == 1000
    queue.close()
    again = SqliteQueue(str(tmp_path / "q.db"), max_bytes=20_000, fsync="off")
    assert again.stats().dropped == stats.dropped  # the count is persisted


def _pending_bodies(queue: SqliteQueue) -> list[str]:
    return [r[0] for r in queue._db.execute("SELECT body FROM pending ORDER BY id")]


def test_max_age_drops_old(tmp_path: Path) -> None:
    queue = SqliteQueue(str(tmp_path / "q.db"), max_age=60, fsync="off")
    queue.append(readings(0, 10), now=1000.0)
    queue.append(readings(10, 10), now=2000.0)  # appending enforces the bounds too
    assert queue.stats().dropped == 10
    assert queue.stats().depth == 10
    assert queue.enforce(now=2070.0) == 10
    assert queue.stats().depth == 0


def test_sqlite_survives_reopen_and_seq_keeps_growing(tmp_path: Path) -> None:
    path = str(tmp_path / "q.db")
    queue = SqliteQueue(path, fsync="full")
    queue.append(readings(0, 30))
    queue.seal(10, 0.0)
    first = queue.unacked(None, 10)
    queue.ack([first[0].seq])
    queue.append(readings(30, 5))
    # no close(): as if killed
    again = SqliteQueue(path)
    msgs = again.unacked(None, 10)
    assert [m.seq for m in msgs] == [first[1].seq, first[2].seq]
    assert again.pending == 5
    again.seal(10, 0.0)
    assert again.unacked(None, 10)[-1].seq == first[2].seq + 1
    assert values(again) == list(range(10, 35))


def test_new_queue_starts_sequence_at_clock(tmp_path: Path) -> None:
    # a reinstalled device must not restart at 0 (the cloud would take it for replays)
    assert SqliteQueue(str(tmp_path / "q.db")).next_seq > 1_700_000_000_000


def test_memory_queue_bound_drops_oldest() -> None:
    queue = MemoryQueue(max_bytes=10_000, first_seq=1)
    for i in range(20):
        queue.append(readings(i * 10, 10))
    queue.seal(1000, 0.0, force=True)
    kept = values(queue)
    assert queue.dropped > 0 and queue.dropped + len(kept) == 200
    assert kept == list(range(200 - len(kept), 200))
