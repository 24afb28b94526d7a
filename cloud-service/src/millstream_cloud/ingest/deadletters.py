"""Dead letters: every rejected message kept for inspection, bounded, oldest out."""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

MAX_PAYLOAD_KEPT = 64 * 1024  # an oversize payload is kept truncated, with its real size


@dataclass(slots=True)
class DeadLetter:
    id: int
    time_ns: int
    topic: str
    reason: str
    error: str
    size: int
    payload: bytes


class DeadLetterStore:
    def __init__(self, path: str | Path, max_items: int = 10_000) -> None:
        self.max_items = max_items
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS dead_letters (id INTEGER PRIMARY KEY AUTOINCREMENT, "
            "time_ns INTEGER NOT NULL, topic TEXT NOT NULL, reason TEXT NOT NULL, "
            "error TEXT NOT NULL, size INTEGER NOT NULL, payload BLOB NOT NULL)"
        )

    def add_many(self, items: list[tuple[int, str, str, str, bytes]]) -> None:
        """Keep (time_ns, topic, reason, error, payload) rows; drop the oldest past the bound."""
        if not items or self.max_items == 0:
            return
        rows = [
            (t, topic, reason, err, len(p), p[:MAX_PAYLOAD_KEPT])
            for t, topic, reason, err, p in items
        ]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "INSERT INTO dead_letters (time_ns, topic, reason, error, size, payload) "
                "VALUES (?,?,?,?,?,?)",
                rows,
            )
            self._db.execute(
                "DELETE FROM dead_letters WHERE id <= (SELECT MAX(id) FROM dead_letters) - ?",
                (self.max_items,),
            )
            self._db.execute("COMMIT")

    def list(
        self, limit: int = 100, before_id: int | None = None, reason: str | None = None
    ) -> list[DeadLetter]:
        where: list[str] = []
        args: list[object] = []
        if before_id is not None:
            where.append("id < ?")
            args.append(before_id)
        if reason:
            where.append("reason = ?")
            args.append(reason)
        cond = f"WHERE {' AND '.join(where)}" if where else ""
        with self._lock:
            rows = self._db.execute(
                f"SELECT id, time_ns, topic, reason, error, size, payload FROM dead_letters {cond} "
                "ORDER BY id DESC LIMIT ?",
                [*args, limit],
            ).fetchall()
        return [DeadLetter(*r) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
