"""Devices the cloud knows: identity, online state, last seen, and sequence state.

A device appears on its birth message or first reading. Sequence state gives exact
duplicate detection under at-least-once delivery: a high-water mark plus the set of
sequence numbers skipped below it (a gap), so a late message that fills a gap is not
mistaken for a duplicate. State is cached in memory and persisted in SQLite by the
writer after each stored batch.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

# Gaps older than this many sequence numbers are given up as lost, to bound memory.
MAX_TRACKED_MISSING = 10_000


@dataclass(slots=True)
class Device:
    id: str
    site: str
    kind: str | None = None
    online: bool = False
    last_seen_ns: int | None = None
    first_seen_ns: int | None = None
    agent_version: str | None = None
    metadata: dict[str, object] = field(default_factory=dict)
    last_seq: int = -1
    missing: set[int] = field(default_factory=set)
    metrics: set[str] = field(default_factory=set)
    duplicates: int = 0
    gaps: int = 0
    clock_skew_s: float = 0.0
    restamped: int = 0
    dirty: bool = True


class SeqVerdict:
    NEW = "new"
    DUPLICATE = "duplicate"
    LATE = "late"  # fills a gap


_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
  id TEXT PRIMARY KEY,
  site TEXT NOT NULL,
  kind TEXT,
  online INTEGER NOT NULL DEFAULT 0,
  last_seen_ns INTEGER,
  first_seen_ns INTEGER,
  agent_version TEXT,
  metadata TEXT NOT NULL DEFAULT '{}',
  last_seq INTEGER NOT NULL DEFAULT -1,
  missing TEXT NOT NULL DEFAULT '[]',
  metrics TEXT NOT NULL DEFAULT '[]',
  duplicates INTEGER NOT NULL DEFAULT 0,
  gaps INTEGER NOT NULL DEFAULT 0,
  clock_skew_s REAL NOT NULL DEFAULT 0,
  restamped INTEGER NOT NULL DEFAULT 0
);
"""


class DeviceRegistry:
    def __init__(self, path: str | Path) -> None:
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.executescript(_SCHEMA)
        self._devices: dict[str, Device] = {}
        self.reload()

    def reload(self) -> None:
        """Re-read every device from disk (another worker may share the file)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, site, kind, online, last_seen_ns, first_seen_ns, agent_version, "
                "metadata, last_seq, missing, metrics, duplicates, gaps, clock_skew_s, restamped "
                "FROM devices"
            ).fetchall()
            for r in rows:
                self._devices[r[0]] = Device(
                    r[0],
                    r[1],
                    r[2],
                    bool(r[3]),
                    r[4],
                    r[5],
                    r[6],
                    json.loads(r[7]),
                    r[8],
                    set(json.loads(r[9])),
                    set(json.loads(r[10])),
                    r[11],
                    r[12],
                    r[13],
                    r[14],
                    False,
                )

    def get(self, device_id: str) -> Device | None:
        return self._devices.get(device_id)

    def all(self) -> list[Device]:
        with self._lock:
            return sorted(self._devices.values(), key=lambda d: d.id)

    def __len__(self) -> int:
        return len(self._devices)

    def ensure(self, device_id: str, site: str, now_ns: int) -> Device:
        dev = self._devices.get(device_id)
        if dev is None:
            with self._lock:
                dev = self._devices.get(device_id)
                if dev is None:
                    dev = Device(device_id, site, first_seen_ns=now_ns)
                    self._devices[device_id] = dev
        return dev

    def check_seq(self, dev: Device, seq: int) -> tuple[str, int]:
        """Classify ``seq`` and update the state; returns (verdict, new gap size)."""
        if seq > dev.last_seq:
            gap = seq - dev.last_seq - 1 if dev.last_seq >= 0 else 0
            if gap:
                dev.missing.update(range(max(dev.last_seq + 1, seq - MAX_TRACKED_MISSING), seq))
                if len(dev.missing) > MAX_TRACKED_MISSING:
                    for old in sorted(dev.missing)[: len(dev.missing) - MAX_TRACKED_MISSING]:
                        dev.missing.discard(old)
                dev.gaps += gap
            dev.last_seq = seq
            dev.dirty = True
            return SeqVerdict.NEW, gap
        if seq in dev.missing:
            dev.missing.discard(seq)
            dev.gaps -= 1
            dev.dirty = True
            return SeqVerdict.LATE, 0
        dev.duplicates += 1
        dev.dirty = True
        return SeqVerdict.DUPLICATE, 0

    def seen(self, dev: Device, now_ns: int) -> None:
        dev.last_seen_ns = now_ns
        if not dev.online:
            dev.online = True
        dev.dirty = True

    def set_status(
        self,
        device_id: str,
        site: str,
        online: bool,
        now_ns: int,
        kind: str | None = None,
        agent_version: str | None = None,
        metadata: dict[str, object] | None = None,
    ) -> Device:
        with self._lock:
            dev = self.ensure(device_id, site, now_ns)
            dev.online = online
            if online:
                dev.last_seen_ns = now_ns
            if kind:
                dev.kind = kind
            if agent_version:
                dev.agent_version = agent_version
            if metadata:
                dev.metadata.update(metadata)
            dev.dirty = True
            self.flush([dev])
            return dev

    def flush(self, devices: Iterable[Device] | None = None) -> None:
        """Persist changed devices in one transaction."""
        with self._lock:
            todo = [
                d for d in (devices if devices is not None else self._devices.values()) if d.dirty
            ]
            if not todo:
                return
            rows = [
                (
                    d.id,
                    d.site,
                    d.kind,
                    int(d.online),
                    d.last_seen_ns,
                    d.first_seen_ns,
                    d.agent_version,
                    json.dumps(d.metadata),
                    d.last_seq,
                    json.dumps(sorted(d.missing)),
                    json.dumps(sorted(d.metrics)),
                    d.duplicates,
                    d.gaps,
                    d.clock_skew_s,
                    d.restamped,
                )
                for d in todo
            ]
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "INSERT OR REPLACE INTO devices (id, site, kind, online, last_seen_ns, "
                "first_seen_ns, agent_version, metadata, last_seq, missing, metrics, duplicates, "
                "gaps, clock_skew_s, restamped) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                rows,
            )
            self._db.execute("COMMIT")
            for d in todo:
                d.dirty = False

    def close(self) -> None:
        with self._lock:
            self.flush()
            self._db.close()
