"""Devices the cloud knows: identity, online state, last seen, and sequence state.

A device appears on its birth message or first reading. Sequence state gives exact
duplicate detection under at-least-once delivery: a high-water mark plus the set of
sequence numbers skipped below it (a gap), so a late message that fills a gap is not
mistaken for a duplicate.

The database is the only source of truth. Several ingest workers may share it (one data
dir, or one PostgreSQL database), and a shared subscription hands any device's messages
to any of them, so per-device state is read and written inside one write transaction per
group of messages (:meth:`DeviceRegistry.transaction`, ``BEGIN IMMEDIATE`` in SQLite,
per-device advisory locks in PostgreSQL). The ingest pipeline keeps that transaction
open until the group's readings are stored, so a worker that dies between storing and
committing leaves the sequence state as it was: the broker redelivers, the readings are
written again (idempotently) and counted once.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Gaps older than this many sequence numbers are given up as lost, to bound memory.
MAX_TRACKED_MISSING = 10_000
# A device first seen at sequence S (not 0: the cloud met it mid-life, or another worker
# is still storing its earlier messages) may still deliver S-1, S-2, ... late; this many
# below S are accepted once each instead of being taken for duplicates.
BIRTH_WINDOW = 1_000


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
    clock_skewed: bool = False
    rejected: int = 0
    seq_floor: int = -1  # first sequence number seen
    below_floor: set[int] = field(default_factory=set)  # seen later, below seq_floor


class SeqVerdict:
    NEW = "new"
    DUPLICATE = "duplicate"
    LATE = "late"  # fills a gap


_COLUMNS = (
    "id, site, kind, online, last_seen_ns, first_seen_ns, agent_version, metadata, last_seq, "
    "missing, metrics, duplicates, gaps, clock_skew_s, restamped, clock_skewed, rejected, "
    "seq_floor, below_floor"
)
_NCOLS = 19

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
  id TEXT PRIMARY KEY,
  site TEXT NOT NULL,
  kind TEXT,
  online INTEGER NOT NULL DEFAULT 0,
  last_seen_ns BIGINT,
  first_seen_ns BIGINT,
  agent_version TEXT,
  metadata TEXT NOT NULL DEFAULT '{}',
  last_seq BIGINT NOT NULL DEFAULT -1,
  missing TEXT NOT NULL DEFAULT '[]',
  metrics TEXT NOT NULL DEFAULT '[]',
  duplicates BIGINT NOT NULL DEFAULT 0,
  gaps BIGINT NOT NULL DEFAULT 0,
  clock_skew_s REAL NOT NULL DEFAULT 0,
  restamped BIGINT NOT NULL DEFAULT 0,
  clock_skewed INTEGER NOT NULL DEFAULT 0,
  rejected BIGINT NOT NULL DEFAULT 0,
  seq_floor BIGINT NOT NULL DEFAULT -1,
  below_floor TEXT NOT NULL DEFAULT '[]'
)
"""


def _row_to_device(r: tuple[Any, ...]) -> Device:
    return Device(
        id=r[0],
        site=r[1],
        kind=r[2],
        online=bool(r[3]),
        last_seen_ns=r[4],
        first_seen_ns=r[5],
        agent_version=r[6],
        metadata=json.loads(r[7]),
        last_seq=r[8],
        missing=set(json.loads(r[9])),
        metrics=set(json.loads(r[10])),
        duplicates=r[11],
        gaps=r[12],
        clock_skew_s=r[13],
        restamped=r[14],
        dirty=False,
        clock_skewed=bool(r[15]),
        rejected=r[16],
        seq_floor=r[17],
        below_floor=set(json.loads(r[18])),
    )


def _device_row(d: Device) -> tuple[Any, ...]:
    return (
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
        int(d.clock_skewed),
        d.rejected,
        d.seq_floor,
        json.dumps(sorted(d.below_floor)),
    )


def check_seq(dev: Device, seq: int) -> tuple[str, int]:
    """Classify ``seq`` for ``dev`` and update its state; returns (verdict, new gap size)."""
    if dev.last_seq < 0:
        dev.seq_floor = seq
    elif seq < dev.seq_floor:
        if seq in dev.below_floor or dev.seq_floor - seq > BIRTH_WINDOW:
            dev.duplicates += 1
            dev.dirty = True
            return SeqVerdict.DUPLICATE, 0
        dev.below_floor.add(seq)
        dev.dirty = True
        return SeqVerdict.LATE, 0
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


class RegistryTransaction:
    """Devices loaded for update inside one write transaction; written back on commit."""

    def __init__(self, registry: DeviceRegistry) -> None:
        self._registry = registry
        self.devices: dict[str, Device] = {}

    def load(self, ids: Iterable[str]) -> dict[str, Device]:
        """Read the current rows of ``ids`` (those that exist) into this transaction."""
        todo = sorted(i for i in set(ids) if i not in self.devices)
        for dev in self._registry._select(todo, for_update=True):
            self.devices[dev.id] = dev
        return self.devices

    def get(self, device_id: str) -> Device | None:
        if device_id not in self.devices:
            self.load([device_id])
        return self.devices.get(device_id)

    def ensure(self, device_id: str, site: str, now_ns: int) -> Device:
        dev = self.get(device_id)
        if dev is None:
            dev = Device(device_id, site, first_seen_ns=now_ns)
            self.devices[device_id] = dev
        return dev

    def check_seq(self, dev: Device, seq: int) -> tuple[str, int]:
        return check_seq(dev, seq)

    def seen(self, dev: Device, now_ns: int) -> None:
        if dev.last_seen_ns is None or now_ns > dev.last_seen_ns:
            dev.last_seen_ns = now_ns
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
        return dev


class DeviceRegistry:
    """The device table, in SQLite (default) or PostgreSQL (``url`` postgresql://...)."""

    def __init__(self, path: str | Path, url: str | None = None) -> None:
        self._lock = threading.RLock()
        self.path = Path(path)  # with ``url``: where another process opens the same table
        self.url = url
        self._pg = bool(url and url.startswith(("postgres://", "postgresql://")))
        if url and not self._pg:
            raise ValueError(f"registry.url {url!r}: only postgresql:// URLs are supported")
        if url and self._pg:
            import psycopg  # optional dependency: pip install 'psycopg[binary]'

            self._conn: Any = psycopg.connect(url, autocommit=True)
            self._ph = "%s"
            self._conn.execute(_SCHEMA.replace("REAL", "DOUBLE PRECISION"))
        else:
            self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._ph = "?"
            self._conn.execute("PRAGMA journal_mode=WAL")
            # Another worker may hold the write lock for one group's write; wait, don't fail.
            self._conn.execute("PRAGMA busy_timeout=60000")
            self._conn.execute(_SCHEMA)
            have = {r[1] for r in self._conn.execute("PRAGMA table_info(devices)")}
            for col, decl in (
                ("clock_skewed", "INTEGER NOT NULL DEFAULT 0"),
                ("rejected", "INTEGER NOT NULL DEFAULT 0"),
                ("seq_floor", "INTEGER NOT NULL DEFAULT -1"),
                ("below_floor", "TEXT NOT NULL DEFAULT '[]'"),
            ):
                if col not in have:
                    self._conn.execute(f"ALTER TABLE devices ADD COLUMN {col} {decl}")

    # -- reads (the API); always from the database, which other workers also write --

    def _select(self, ids: list[str], for_update: bool = False) -> list[Device]:
        if not ids:
            return []
        out: list[Device] = []
        if for_update and self._pg:
            # Row locks cannot lock a device that has no row yet (two workers seeing its
            # first messages): a per-device advisory lock, held to the end of the
            # transaction and taken in id order (no deadlocks), covers both cases.
            with self._conn.cursor() as cur:
                cur.executemany("SELECT pg_advisory_xact_lock(hashtext(%s))", [(i,) for i in ids])
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            marks = ",".join([self._ph] * len(chunk))
            lock = " FOR UPDATE" if for_update and self._pg else ""
            rows = self._conn.execute(
                f"SELECT {_COLUMNS} FROM devices WHERE id IN ({marks}){lock}", chunk
            ).fetchall()
            out.extend(_row_to_device(r) for r in rows)
        return out

    def get(self, device_id: str) -> Device | None:
        with self._lock:
            found = self._select([device_id])
        return found[0] if found else None

    def kind_of(self, device_id: str) -> str | None:
        """The device's machine kind (None when unknown): what detection rules match on."""
        found = self.get(device_id)
        return found.kind if found is not None else None

    def all(self) -> list[Device]:
        return self.page()

    def page(
        self,
        site: str | None = None,
        online: bool | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> list[Device]:
        """Devices ordered by id, filtered; ``after`` is the last id of the previous page."""
        where: list[str] = []
        args: list[object] = []
        if site is not None:
            where.append(f"site = {self._ph}")
            args.append(site)
        if online is not None:
            where.append(f"online = {self._ph}")
            args.append(int(online))
        if after is not None:
            where.append(f"id > {self._ph}")
            args.append(after)
        cond = f" WHERE {' AND '.join(where)}" if where else ""
        lim = f" LIMIT {int(limit)}" if limit else ""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_COLUMNS} FROM devices{cond} ORDER BY id{lim}", args
            ).fetchall()
        return [_row_to_device(r) for r in rows]

    def counts(self) -> tuple[int, int]:
        """(known, online) device counts."""
        with self._lock:
            row = self._conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(online), 0) FROM devices"
            ).fetchone()
        return int(row[0]), int(row[1])

    def __len__(self) -> int:
        return self.counts()[0]

    # -- writes --

    @contextmanager
    def transaction(self) -> Iterator[RegistryTransaction]:
        """One write transaction: load, change, and (on success) persist devices."""
        with self._lock:
            self._conn.execute("BEGIN" if self._pg else "BEGIN IMMEDIATE")
            txn = RegistryTransaction(self)
            try:
                yield txn
                self._write([d for d in txn.devices.values() if d.dirty])
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            for d in txn.devices.values():
                d.dirty = False

    def _write(self, devices: list[Device]) -> None:
        if not devices:
            return
        marks = ",".join([self._ph] * _NCOLS)
        if self._pg:
            cols = [c.strip() for c in _COLUMNS.split(",")]
            updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in cols[1:])
            sql = (
                f"INSERT INTO devices ({_COLUMNS}) VALUES ({marks}) "
                f"ON CONFLICT (id) DO UPDATE SET {updates}"
            )
            with self._conn.cursor() as cur:
                cur.executemany(sql, [_device_row(d) for d in devices])
        else:
            self._conn.executemany(
                f"INSERT OR REPLACE INTO devices ({_COLUMNS}) VALUES ({marks})",
                [_device_row(d) for d in devices],
            )

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
        with self.transaction() as txn:
            return txn.set_status(device_id, site, online, now_ns, kind, agent_version, metadata)

    def ensure(self, device_id: str, site: str, now_ns: int) -> Device:
        """The device, created (and persisted) if it is new."""
        with self.transaction() as txn:
            return txn.ensure(device_id, site, now_ns)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
