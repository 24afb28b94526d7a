"""Store-and-forward: readings wait here until the broker has acknowledged them.

A reading enters as *pending*. Just before it is published it is *sealed* into a message
that gets the device's next sequence number; the message is deleted only when the
broker's PUBACK for it arrives. A message that was sent but not acknowledged (broker gone,
agent killed) is sent again with the same sequence number, so the cloud can drop the
duplicate. Sealing happens just in time, so after an outage the backlog is packed into
full-size batches instead of one small message per collection interval.

Two implementations share the contract: :class:`SqliteQueue` (on disk, WAL, survives
``kill -9`` and, with ``fsync: full``, power loss) for the agent, and :class:`MemoryQueue`
for the simulator's thousand devices.

Bounds: ``max_bytes`` (stored reading payloads plus a fixed per-row overhead) and
``max_age`` (seconds since a reading was queued). When a bound is exceeded the *oldest*
readings are dropped first, counted in :attr:`dropped` (persisted) and logged.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Optional

log = logging.getLogger("millstream.queue")

ROW_OVERHEAD = 32  # bytes counted per stored reading on top of its JSON text
FSYNC_MODES = {"full": "FULL", "normal": "NORMAL", "off": "OFF"}


@dataclass
class Message:
    """A sealed batch: ``body`` is the JSON array of its readings."""

    seq: int
    n: int
    clock_ok: bool
    body: str
    enq: float


@dataclass
class QueueStats:
    depth: int  # readings not yet acknowledged (pending + sealed)
    oldest_age: float  # seconds since the oldest of them was queued; 0 when empty
    dropped: int  # readings dropped by the bounds, ever (persisted)
    bytes: int


def initial_seq() -> int:
    """A fresh queue starts its sequence at the wall clock in milliseconds.

    A device reinstalled with an empty queue would otherwise restart at 0 and its new
    messages would look like replays to the cloud. One message per millisecond is far
    above any device's rate, so the sequence still only grows.
    """
    return max(1, int(time.time() * 1000))


class BaseQueue:
    """Shared bookkeeping; subclasses store the rows."""

    def __init__(self, max_bytes: int = 0, max_age: float = 0.0) -> None:
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.dropped = 0
        self._lock = threading.RLock()

    # subclass API ---------------------------------------------------------
    def append(
        self, readings: Sequence[str], clock_ok: bool = True, now: Optional[float] = None
    ) -> None:
        """Queue readings (each the JSON text of one reading object)."""
        raise NotImplementedError

    def seal(
        self, max_readings: int, max_delay: float, force: bool = False, max_messages: int = 1 << 30
    ) -> int:
        """Seal pending readings into messages when a batch is full or old enough.

        Returns the number of messages sealed. ``force`` seals whatever is pending.
        """
        raise NotImplementedError

    def unacked(self, after_seq: Optional[int], limit: int) -> list[Message]:
        """Sealed, unacknowledged messages with ``seq > after_seq``, oldest first."""
        raise NotImplementedError

    def ack(self, seqs: Iterable[int]) -> int:
        """Delete acknowledged messages; returns how many readings they held."""
        raise NotImplementedError

    def stats(self) -> QueueStats:
        raise NotImplementedError

    @property
    def pending(self) -> int:
        raise NotImplementedError

    _seq: int  # the next message's sequence number; subclasses load or start it

    @property
    def next_seq(self) -> int:
        return self._seq

    def close(self) -> None:
        pass

    # shared ---------------------------------------------------------------
    def _log_drop(self, count: int, why: str) -> None:
        if count:
            log.warning(
                "queue %s: dropped the %d oldest readings (%d dropped in total)",
                why,
                count,
                self.dropped,
            )


def _batches(
    rows: Sequence[tuple[float, bool, str]], max_readings: int
) -> list[tuple[int, bool, float, str]]:
    """Split (enq, clock_ok, body) rows into (count, clock_ok, enq, body) batches.

    A batch never mixes synced and unsynced readings: the flag is per message.
    """
    out: list[tuple[int, bool, float, str]] = []
    start = 0
    while start < len(rows):
        clock = rows[start][1]
        end = start + 1
        while end < len(rows) and end - start < max_readings and rows[end][1] == clock:
            end += 1
        chunk = rows[start:end]
        out.append((len(chunk), clock, chunk[0][0], "[" + ",".join(r[2] for r in chunk) + "]"))
        start = end
    return out


class MemoryQueue(BaseQueue):
    """In-memory queue (the simulator): same contract, lost on exit."""

    def __init__(
        self, max_bytes: int = 0, max_age: float = 0.0, first_seq: Optional[int] = None
    ) -> None:
        super().__init__(max_bytes, max_age)
        self._pending: collections.deque[tuple[float, bool, str]] = collections.deque()
        self._messages: collections.OrderedDict[int, Message] = collections.OrderedDict()
        self._seq = initial_seq() if first_seq is None else first_seq
        self._bytes = 0
        self._sealed_n = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def append(
        self, readings: Sequence[str], clock_ok: bool = True, now: Optional[float] = None
    ) -> None:
        now = time.time() if now is None else now
        for body in readings:
            self._pending.append((now, clock_ok, body))
            self._bytes += len(body) + ROW_OVERHEAD
        if self.max_bytes and self._bytes > self.max_bytes:
            self._enforce(now)

    def seal(
        self, max_readings: int, max_delay: float, force: bool = False, max_messages: int = 1 << 30
    ) -> int:
        if not self._pending:
            return 0
        now = time.time()
        sealed = 0
        while self._pending and sealed < max_messages:
            oldest = self._pending[0][0]
            due = (
                force
                or len(self._pending) >= max_readings
                or now - oldest >= max_delay
                or now < oldest
            )
            if not due:
                break
            rows: list[tuple[float, bool, str]] = []
            clock = self._pending[0][1]
            while self._pending and len(rows) < max_readings and self._pending[0][1] == clock:
                rows.append(self._pending.popleft())
            for n, clock_ok, enq, body in _batches(rows, max_readings):
                self._messages[self._seq] = Message(self._seq, n, clock_ok, body, enq)
                self._sealed_n += n
                self._seq += 1
                sealed += 1
        return sealed

    def unacked(self, after_seq: Optional[int], limit: int) -> list[Message]:
        out = []
        for seq, msg in self._messages.items():
            if after_seq is None or seq > after_seq:
                out.append(msg)
                if len(out) >= limit:
                    break
        return out

    def ack(self, seqs: Iterable[int]) -> int:
        n = 0
        for seq in seqs:
            msg = self._messages.pop(seq, None)
            if msg is not None:
                n += msg.n
                self._sealed_n -= msg.n
                self._bytes -= len(msg.body) + ROW_OVERHEAD * msg.n - (msg.n - 1) - 2
        return n

    def stats(self) -> QueueStats:
        oldest = None
        if self._messages:
            oldest = next(iter(self._messages.values())).enq
        elif self._pending:
            oldest = self._pending[0][0]
        age = max(0.0, time.time() - oldest) if oldest is not None else 0.0
        return QueueStats(len(self._pending) + self._sealed_n, age, self.dropped, self._bytes)

    def _enforce(self, now: float) -> None:
        dropped = 0
        while self._bytes > self.max_bytes and (self._messages or self._pending):
            if self._messages:
                _, msg = self._messages.popitem(last=False)
                self._sealed_n -= msg.n
                self._bytes -= len(msg.body) + ROW_OVERHEAD * msg.n - (msg.n - 1) - 2
                dropped += msg.n
            else:
                _, _, body = self._pending.popleft()
                self._bytes -= len(body) + ROW_OVERHEAD
                dropped += 1
        self.dropped += dropped
        self._log_drop(dropped, "over max_bytes")


SCHEMA = """
CREATE TABLE IF NOT EXISTS pending (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    enq REAL NOT NULL,
    clock INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY,
    enq REAL NOT NULL,
    clock INTEGER NOT NULL,
    n INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
"""


class SqliteQueue(BaseQueue):
    """The agent's on-disk queue: one SQLite file in WAL mode.

    ``fsync``: ``full`` (default) fsyncs every commit, so a power cut loses nothing that
    was queued; ``normal`` fsyncs only at WAL checkpoints (a power cut may lose the last
    commits, ``kill -9`` still loses nothing); ``off`` leaves it to the OS.
    """

    def __init__(
        self,
        path: str,
        max_bytes: int = 0,
        max_age: float = 0.0,
        fsync: str = "full",
    ) -> None:
        super().__init__(max_bytes, max_age)
        self.path = path
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        self._db = sqlite3.connect(
            path, timeout=30.0, isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={FSYNC_MODES[fsync]}")
        self._db.executescript(SCHEMA)
        with self._tx():
            row = self._db.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
            if row is None:
                self._seq = initial_seq()
                self._set_meta("next_seq", self._seq)
            else:
                self._seq = int(row[0])
            row = self._db.execute("SELECT value FROM meta WHERE key='dropped'").fetchone()
            self.dropped = int(row[0]) if row else 0
            # sealed messages survive restarts; keep the sequence past them
            top = self._db.execute("SELECT MAX(seq) FROM messages").fetchone()[0]
            if top is not None and top >= self._seq:
                self._seq = int(top) + 1
                self._set_meta("next_seq", self._seq)
        self._pending_n, self._pending_bytes = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM pending"
        ).fetchone()
        self._sealed_n, self._sealed_bytes = self._db.execute(
            "SELECT COALESCE(SUM(n), 0), COALESCE(SUM(LENGTH(body)), 0) FROM messages"
        ).fetchone()
        self._pending_bytes += ROW_OVERHEAD * self._pending_n
        self._sealed_bytes += ROW_OVERHEAD * self._sealed_n

    class _Tx:
        def __init__(self, db: sqlite3.Connection) -> None:
            self.db = db

        def __enter__(self) -> None:
            self.db.execute("BEGIN IMMEDIATE")

        def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
            self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")

    def _tx(self) -> SqliteQueue._Tx:
        return SqliteQueue._Tx(self._db)

    def _set_meta(self, key: str, value: object) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def count_lost(self, n: int) -> None:
        """Readings that could not even be stored (disk full): counted as dropped."""
        with self._lock:
            self.dropped += n
            try:
                with self._tx():
                    self._set_meta("dropped", self.dropped)
            except sqlite3.Error:
                pass  # persisted with the next successful write

    def get_meta(self, key: str) -> Optional[str]:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self._lock, self._tx():
            self._set_meta(key, value)

    @property
    def pending(self) -> int:
        return int(self._pending_n)

    def append(
        self, readings: Sequence[str], clock_ok: bool = True, now: Optional[float] = None
    ) -> None:
        if not readings:
            return
        now = time.time() if now is None else now
        flag = 1 if clock_ok else 0
        with self._lock:
            with self._tx():
                self._db.executemany(
                    "INSERT INTO pending(enq, clock, body) VALUES (?, ?, ?)",
                    [(now, flag, body) for body in readings],
                )
            self._pending_n += len(readings)
            self._pending_bytes += sum(len(b) for b in readings) + ROW_OVERHEAD * len(readings)
            if (self.max_bytes and self._pending_bytes + self._sealed_bytes > self.max_bytes) or (
                self.max_age and self._oldest_enq() < now - self.max_age
            ):
                self.enforce(now)

    def seal(
        self, max_readings: int, max_delay: float, force: bool = False, max_messages: int = 1 << 30
    ) -> int:
        with self._lock:
            if not self._pending_n:
                return 0
            now = time.time()
            sealed = 0
            while self._pending_n and sealed < max_messages:
                head = self._db.execute("SELECT enq FROM pending ORDER BY id LIMIT 1").fetchone()
                if head is None:
                    self._pending_n = 0
                    self._pending_bytes = 0
                    break
                oldest = float(head[0])
                due = (
                    force
                    or self._pending_n >= max_readings
                    or now - oldest >= max_delay
                    or now < oldest
                )
                if not due:
                    break
                rows = self._db.execute(
                    "SELECT id, enq, clock, body FROM pending ORDER BY id LIMIT ?", (max_readings,)
                ).fetchall()
                batches = _batches([(r[1], bool(r[2]), r[3]) for r in rows], max_readings)
                with self._tx():
                    used = 0
                    for n, clock_ok, enq, body in batches:
                        self._db.execute(
                            "INSERT INTO messages(seq, enq, clock, n, body) VALUES (?, ?, ?, ?, ?)",
                            (self._seq, enq, 1 if clock_ok else 0, n, body),
                        )
                        self._seq += 1
                        used += n
                        sealed += 1
                        self._sealed_n += n
                        self._sealed_bytes += len(body) + ROW_OVERHEAD * n
                    last_id = rows[used - 1][0]
                    freed = sum(len(r[3]) + ROW_OVERHEAD for r in rows[:used])
                    self._db.execute("DELETE FROM pending WHERE id <= ?", (last_id,))
                    self._set_meta("next_seq", self._seq)
                self._pending_n -= used
                self._pending_bytes -= freed
            return sealed

    def unacked(self, after_seq: Optional[int], limit: int) -> list[Message]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, n, clock, body, enq FROM messages WHERE seq > ? ORDER BY seq LIMIT ?",
                (-1 if after_seq is None else after_seq, limit),
            ).fetchall()
        return [Message(int(r[0]), int(r[1]), bool(r[2]), r[3], float(r[4])) for r in rows]

    def ack(self, seqs: Iterable[int]) -> int:
        seqs = list(seqs)
        if not seqs:
            return 0
        with self._lock:
            marks = ",".join("?" * len(seqs))
            with self._tx():
                n, size = self._db.execute(
                    f"SELECT COALESCE(SUM(n), 0), COALESCE(SUM(LENGTH(body)), 0) FROM messages"
                    f" WHERE seq IN ({marks})",
                    seqs,
                ).fetchone()
                self._db.execute(f"DELETE FROM messages WHERE seq IN ({marks})", seqs)
            self._sealed_n -= n
            self._sealed_bytes -= size + ROW_OVERHEAD * n
            return int(n)

    def _oldest_enq(self) -> float:
        row = self._db.execute(
            "SELECT MIN(enq) FROM (SELECT MIN(enq) AS enq FROM messages"
            " UNION ALL SELECT enq FROM (SELECT enq FROM pending ORDER BY id LIMIT 1))"
        ).fetchone()
        return float(row[0]) if row and row[0] is not None else time.time()

    def stats(self) -> QueueStats:
        with self._lock:
            depth = int(self._pending_n + self._sealed_n)
            age = max(0.0, time.time() - self._oldest_enq()) if depth else 0.0
            return QueueStats(
                depth, age, self.dropped, int(self._pending_bytes + self._sealed_bytes)
            )

    def enforce(self, now: Optional[float] = None) -> int:
        """Apply ``max_bytes`` and ``max_age``, dropping oldest first; returns readings dropped."""
        now = time.time() if now is None else now
        dropped_age = dropped_size = 0
        with self._lock, self._tx():
            if self.max_age:
                cutoff = now - self.max_age
                n, size = self._db.execute(
                    "SELECT COALESCE(SUM(n),0), COALESCE(SUM(LENGTH(body)),0)"
                    " FROM messages WHERE enq < ?",
                    (cutoff,),
                ).fetchone()
                self._db.execute("DELETE FROM messages WHERE enq < ?", (cutoff,))
                self._sealed_n -= n
                self._sealed_bytes -= size + ROW_OVERHEAD * n
                dropped_age += n
                n, size = self._db.execute(
                    "SELECT COUNT(*), COALESCE(SUM(LENGTH(body)),0) FROM pending WHERE enq < ?",
                    (cutoff,),
                ).fetchone()
                self._db.execute("DELETE FROM pending WHERE enq < ?", (cutoff,))
                self._pending_n -= n
                self._pending_bytes -= size + ROW_OVERHEAD * n
                dropped_age += n
            while self.max_bytes and self._pending_bytes + self._sealed_bytes > self.max_bytes:
                row = self._db.execute(
                    "SELECT seq, n, LENGTH(body) FROM messages ORDER BY seq LIMIT 1"
                ).fetchone()
                if row is not None:
                    self._db.execute("DELETE FROM messages WHERE seq = ?", (row[0],))
                    self._sealed_n -= row[1]
                    self._sealed_bytes -= row[2] + ROW_OVERHEAD * row[1]
                    dropped_size += row[1]
                    continue
                if not self._pending_n:
                    break
                excess = self._pending_bytes + self._sealed_bytes - self.max_bytes
                avg = max(1, self._pending_bytes // max(1, self._pending_n))
                k = max(1, min(self._pending_n, -(-excess // avg)))
                rows = self._db.execute(
                    "SELECT id, LENGTH(body) FROM pending ORDER BY id LIMIT ?", (k,)
                ).fetchall()
                if not rows:
                    break
                self._db.execute("DELETE FROM pending WHERE id <= ?", (rows[-1][0],))
                self._pending_n -= len(rows)
                self._pending_bytes -= sum(r[1] + ROW_OVERHEAD for r in rows)
                dropped_size += len(rows)
            if dropped_age or dropped_size:
                self.dropped += dropped_age + dropped_size
                self._set_meta("dropped", self.dropped)
        self._log_drop(dropped_age, f"older than max_age {self.max_age:g}s")
        self._log_drop(dropped_size, f"over max_bytes {self.max_bytes}")
        return dropped_age + dropped_size

    def close(self) -> None:
        with self._lock:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()
