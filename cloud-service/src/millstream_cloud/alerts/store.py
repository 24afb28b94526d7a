"""Persistent alert state in SQLite: alerts, notification log, silences, API rules, history.

The notification log (Alertmanager's nflog) records, per group and integration, which
alerts the last delivered notification said were firing and resolved. After a restart
the dispatcher compares against it, so a firing alert is not announced twice and a
resolution that was not yet delivered is still sent.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
  fingerprint TEXT PRIMARY KEY,
  rule TEXT NOT NULL,
  labels TEXT NOT NULL,
  annotations TEXT NOT NULL,
  state TEXT NOT NULL,
  active_at INTEGER NOT NULL,
  starts_at INTEGER,
  ends_at INTEGER,
  last_true_at INTEGER,
  value REAL,
  acked_by TEXT,
  acked_at INTEGER,
  ack_comment TEXT
);
CREATE TABLE IF NOT EXISTS nflog (
  group_key TEXT NOT NULL,
  integration TEXT NOT NULL,
  firing TEXT NOT NULL,
  resolved TEXT NOT NULL,
  ts INTEGER NOT NULL,
  PRIMARY KEY (group_key, integration)
);
CREATE TABLE IF NOT EXISTS silences (
  id TEXT PRIMARY KEY,
  matchers TEXT NOT NULL,
  starts_at INTEGER NOT NULL,
  ends_at INTEGER NOT NULL,
  created_by TEXT NOT NULL,
  comment TEXT NOT NULL,
  updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS rules (
  name TEXT PRIMARY KEY,
  body TEXT NOT NULL,
  updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS history (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  time INTEGER NOT NULL,
  fingerprint TEXT NOT NULL,
  alertname TEXT NOT NULL,
  event TEXT NOT NULL,
  labels TEXT NOT NULL,
  detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS history_time ON history (time);
CREATE INDEX IF NOT EXISTS history_fp ON history (fingerprint, time);
"""


@dataclass
class Alert:
    """One alert instance; identity is its fingerprint (from its labels)."""

    fingerprint: str
    rule: str
    labels: dict[str, str]
    annotations: dict[str, str]
    state: str  # pending | firing | resolved
    active_at: int  # when the condition began to hold (pending since)
    starts_at: int | None = None  # when it fired
    ends_at: int | None = None  # when it resolved
    last_true_at: int | None = None  # last time the condition held (keep_firing_for)
    value: float | None = None
    acked_by: str | None = None
    acked_at: int | None = None
    ack_comment: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # not persisted

    @property
    def name(self) -> str:
        return self.labels.get("alertname", self.rule)


@dataclass
class NflogEntry:
    firing: frozenset[str]
    resolved: frozenset[str]
    ts: int


class AlertStore:
    def __init__(self, path: str | Path, history_max: int = 100_000) -> None:
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.executescript(_SCHEMA)
        self.history_max = history_max
        self._depth = 0
        self._history_added = 0

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Group the writes of one evaluation into one SQLite transaction (nestable)."""
        with self._lock:
            if self._depth == 0:
                self._db.execute("BEGIN")
            self._depth += 1
            try:
                yield
            except BaseException:
                self._depth -= 1
                if self._depth == 0:
                    self._db.execute("ROLLBACK")
                raise
            self._depth -= 1
            if self._depth == 0:
                self._db.execute("COMMIT")

    # alerts
    def load_alerts(self) -> list[Alert]:
        with self._lock:
            rows = self._db.execute(
                "SELECT fingerprint, rule, labels, annotations, state, active_at, starts_at, "
                "ends_at, last_true_at, value, acked_by, acked_at, ack_comment FROM alerts"
            ).fetchall()
        return [Alert(r[0], r[1], json.loads(r[2]), json.loads(r[3]), *r[4:]) for r in rows]

    def save_alert(self, a: Alert) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO alerts (fingerprint, rule, labels, annotations, state, "
                "active_at, starts_at, ends_at, last_true_at, value, acked_by, acked_at, "
                "ack_comment) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    a.fingerprint,
                    a.rule,
                    json.dumps(a.labels, sort_keys=True),
                    json.dumps(a.annotations, sort_keys=True),
                    a.state,
                    a.active_at,
                    a.starts_at,
                    a.ends_at,
                    a.last_true_at,
                    a.value,
                    a.acked_by,
                    a.acked_at,
                    a.ack_comment,
                ),
            )

    def delete_alerts(self, fingerprints: Iterable[str]) -> None:
        with self._lock:
            self._db.executemany(
                "DELETE FROM alerts WHERE fingerprint = ?", [(f,) for f in fingerprints]
            )

    # notification log
    def load_nflog(self) -> dict[tuple[str, str], NflogEntry]:
        with self._lock:
            rows = self._db.execute(
                "SELECT group_key, integration, firing, resolved, ts FROM nflog"
            ).fetchall()
        return {
            (r[0], r[1]): NflogEntry(frozenset(json.loads(r[2])), frozenset(json.loads(r[3])), r[4])
            for r in rows
        }

    def save_nflog(self, group_key: str, integration: str, entry: NflogEntry) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO nflog (group_key, integration, firing, resolved, ts) "
                "VALUES (?,?,?,?,?)",
                (
                    group_key,
                    integration,
                    json.dumps(sorted(entry.firing)),
                    json.dumps(sorted(entry.resolved)),
                    entry.ts,
                ),
            )

    def delete_nflog_before(self, ts: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM nflog WHERE ts < ?", (ts,))

    # silences
    def load_silences(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, matchers, starts_at, ends_at, created_by, comment, updated_at "
                "FROM silences"
            ).fetchall()
        return [
            {
                "id": r[0],
                "matchers": json.loads(r[1]),
                "starts_at": r[2],
                "ends_at": r[3],
                "created_by": r[4],
                "comment": r[5],
                "updated_at": r[6],
            }
            for r in rows
        ]

    def save_silence(self, s: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO silences (id, matchers, starts_at, ends_at, created_by, "
                "comment, updated_at) VALUES (?,?,?,?,?,?,?)",
                (
                    s["id"],
                    json.dumps(s["matchers"]),
                    s["starts_at"],
                    s["ends_at"],
                    s["created_by"],
                    s["comment"],
                    s["updated_at"],
                ),
            )

    def delete_silences_before(self, ends_before: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM silences WHERE ends_at < ?", (ends_before,))

    # rules created through the API
    def load_rules(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT body FROM rules ORDER BY name").fetchall()
        return [json.loads(r[0]) for r in rows]

    def save_rule(self, name: str, body: dict[str, Any], now: int) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO rules (name, body, updated_at) VALUES (?,?,?)",
                (name, json.dumps(body), now),
            )

    def delete_rule(self, name: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM rules WHERE name = ?", (name,))

    # history
    def add_history(
        self, time_ns: int, a: Alert, event: str, detail: dict[str, Any] | None = None
    ) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO history (time, fingerprint, alertname, event, labels, detail) "
                "VALUES (?,?,?,?,?,?)",
                (
                    time_ns,
                    a.fingerprint,
                    a.name,
                    event,
                    json.dumps(a.labels, sort_keys=True),
                    json.dumps(detail or {}),
                ),
            )
            self._history_added += 1
            if self._history_added >= 1000:
                self._history_added = 0
                self._db.execute(
                    "DELETE FROM history WHERE id <= (SELECT MAX(id) FROM history) - ?",
                    (self.history_max,),
                )

    def history(
        self,
        fingerprint: str | None = None,
        alertname: str | None = None,
        event: str | None = None,
        since: int | None = None,
        until: int | None = None,
        limit: int = 1000,
    ) -> list[dict[str, Any]]:
        where: list[str] = []
        args: list[Any] = []
        for column, value in (
            ("fingerprint", fingerprint),
            ("alertname", alertname),
            ("event", event),
        ):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if since is not None:
            where.append("time >= ?")
            args.append(since)
        if until is not None:
            where.append("time < ?")
            args.append(until)
        sql = "SELECT time, fingerprint, alertname, event, labels, detail FROM history"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [
            {
                "time": r[0],
                "fingerprint": r[1],
                "alertname": r[2],
                "event": r[3],
                "labels": json.loads(r[4]),
                "detail": json.loads(r[5]),
            }
            for r in rows
        ]

    def close(self) -> None:
        with self._lock:
            self._db.close()
