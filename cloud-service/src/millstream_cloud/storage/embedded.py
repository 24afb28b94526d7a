"""The embedded default store: one directory, no server, written for ingest speed.

Layout (one SQLite database in WAL mode, ``store.db``; docs/storage.md has the figures):

* ``wal``: the write path. One row per ``write_points`` call holding the whole batch as
  columns (series ids, times, float values as packed arrays; other types msgpack). No
  index is touched, so a 5,000-point batch is one row and one fsync'd commit.
* a **memtable** in memory holds the same points per series until they are compacted;
  queries read it, so a write is visible as soon as ``write_points`` returns.
* ``chunks``: a background thread compacts the memtable into one row per series and
  time window (``chunk_s``): sorted, deduplicated times and values as packed arrays, and
  a summary (count, first, last, min, max, sum). In the same transaction it deletes the
  compacted ``wal`` rows, so after a crash the remaining ``wal`` rows are exactly what
  must be replayed into the memtable.
* rolled-up chunks (``rollup`` > 0) keep, past ``downsample_after_s``, one
  (count, sum, min, max, first, last) per ``downsample_every_s`` bucket instead of points.

Idempotency: a point rewritten at the same (series, time) replaces the older value, at
query time (newest source wins) and at compaction. Queries with ``every``/``agg`` use a
chunk's summary when the chunk lies inside the range and inside one bucket, so long
ranges read few bytes.

Threads: one writer at a time (a lock), any number of readers (one read connection per
thread; SQLite WAL readers do not block the writer), one compactor thread.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from millstream_cloud.model import Reading
from millstream_cloud.settings import EmbeddedSettings, Settings
from millstream_cloud.storage.base import (
    TELEMETRY,
    FieldValue,
    Point,
    Series,
    SeriesQuery,
    Storage,
    register,
)

log = logging.getLogger("millstream.storage.embedded")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS series (
  id INTEGER PRIMARY KEY,
  measurement TEXT NOT NULL,
  tags TEXT NOT NULL,
  field TEXT NOT NULL,
  ftype TEXT NOT NULL,
  UNIQUE (measurement, tags, field)
);
CREATE TABLE IF NOT EXISTS wal (
  id INTEGER PRIMARY KEY,
  writer TEXT NOT NULL,
  sids BLOB NOT NULL,
  times BLOB NOT NULL,
  vals BLOB NOT NULL,
  other BLOB
);
CREATE TABLE IF NOT EXISTS chunks (
  series_id INTEGER NOT NULL,
  start_ns INTEGER NOT NULL,
  rollup INTEGER NOT NULL,
  n INTEGER NOT NULL,
  first_t INTEGER NOT NULL,
  last_t INTEGER NOT NULL,
  first_v,
  last_v,
  vmin REAL,
  vmax REAL,
  vsum REAL,
  times BLOB NOT NULL,
  vals BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS chunks_series_start ON chunks (series_id, start_ns);
CREATE INDEX IF NOT EXISTS wal_writer ON wal (writer, id);
INSERT OR IGNORE INTO meta (key, value) VALUES ('chunks_version', '0');
"""

_NUMPY_DTYPE = {"float": np.float64, "integer": np.int64, "boolean": np.int8, "string": object}
_NUMERIC = ("float", "integer", "boolean")
_SEC = 1_000_000_000

_I64 = np.int64
_F64 = np.float64


def _ftype(value: FieldValue) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    raise TypeError(f"unsupported field value {value!r} ({type(value).__name__})")


def _tags_key(tags: Mapping[str, str]) -> str:
    return json.dumps(dict(sorted(tags.items())), separators=(",", ":"))


def _encode_values(values: np.ndarray, ftype: str) -> bytes:
    if ftype == "string":
        return msgspec.msgpack.encode(values.tolist())
    return np.ascontiguousarray(values, dtype=_NUMPY_DTYPE[ftype]).tobytes()


def _decode_values(blob: bytes, ftype: str) -> np.ndarray:
    if ftype == "string":
        out = np.empty(0, dtype=object)
        items = msgspec.msgpack.decode(blob)
        out = np.empty(len(items), dtype=object)
        out[:] = items
        return out
    return np.frombuffer(blob, dtype=_NUMPY_DTYPE[ftype])


def _to_array(values: Sequence[Any], ftype: str) -> np.ndarray:
    if ftype == "string":
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out
    return np.asarray(values, dtype=_NUMPY_DTYPE[ftype])


def _dedupe_last(t: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort by time; of several values at one time keep the last one given (newest)."""
    if len(t) > 1 and not bool((t[1:] > t[:-1]).all()):  # already strictly increasing: done
        order = np.argsort(t, kind="stable")
        t = t[order]
        v = v[order]
        keep = np.empty(len(t), dtype=bool)
        np.not_equal(t[1:], t[:-1], out=keep[:-1])
        keep[-1] = True
        if not keep.all():
            t = t[keep]
            v = v[keep]
    return t, v


@dataclass(slots=True)
class _Partials:
    """Per-bucket partial aggregates; several of them combine into one answer."""

    b: np.ndarray
    cnt: np.ndarray
    sm: np.ndarray
    mn: np.ndarray
    mx: np.ndarray
    ft: np.ndarray
    fv: np.ndarray
    lt: np.ndarray
    lv: np.ndarray


def _bucket(t: np.ndarray, every: int | None) -> np.ndarray:
    if every is None:
        return np.zeros(len(t), dtype=_I64)
    return t - np.mod(t, every)


def _partials_from_points(
    t: np.ndarray, v: np.ndarray, every: int | None, numeric: bool
) -> _Partials:
    """``t`` sorted; one partial per non-empty bucket."""
    b = _bucket(t, every)
    n = len(t)
    brk = np.empty(n, dtype=bool)
    brk[0] = True
    np.not_equal(b[1:], b[:-1], out=brk[1:])
    starts = np.flatnonzero(brk)
    ends = np.empty(len(starts), dtype=np.intp)
    ends[:-1] = starts[1:] - 1
    ends[-1] = n - 1
    cnt = ends - starts + 1
    if numeric:
        vf = v.astype(_F64, copy=False)
        sm = np.add.reduceat(vf, starts)
        mn = np.minimum.reduceat(vf, starts)
        mx = np.maximum.reduceat(vf, starts)
    else:
        sm = mn = mx = np.zeros(len(starts), dtype=_F64)
    return _Partials(b[starts], cnt, sm, mn, mx, t[starts], v[starts], t[ends], v[ends])


def _combine(parts: list[_Partials], force: bool = False) -> _Partials:
    """Merge partials into one per bucket (``force``: even a single, non-unique set)."""
    if len(parts) == 1 and not force:
        return parts[0]
    b = np.concatenate([p.b for p in parts])
    cnt = np.concatenate([p.cnt for p in parts])
    sm = np.concatenate([p.sm for p in parts])
    mn = np.concatenate([p.mn for p in parts])
    mx = np.concatenate([p.mx for p in parts])
    ft = np.concatenate([p.ft for p in parts])
    fv = np.concatenate([p.fv for p in parts])
    lt = np.concatenate([p.lt for p in parts])
    lv = np.concatenate([p.lv for p in parts])
    order = np.lexsort((ft, b))
    bs = b[order]
    brk = np.empty(len(bs), dtype=bool)
    brk[0] = True
    np.not_equal(bs[1:], bs[:-1], out=brk[1:])
    starts = np.flatnonzero(brk)
    out_cnt = np.add.reduceat(cnt[order], starts)
    out_sm = np.add.reduceat(sm[order], starts)
    out_mn = np.minimum.reduceat(mn[order], starts)
    out_mx = np.maximum.reduceat(mx[order], starts)
    first_idx = order[starts]
    order2 = np.lexsort((lt, b))
    ends = np.empty(len(starts), dtype=np.intp)
    ends[:-1] = starts[1:] - 1
    ends[-1] = len(bs) - 1
    last_idx = order2[ends]
    return _Partials(
        bs[starts], out_cnt, out_sm, out_mn, out_mx, ft[first_idx], fv[first_idx],
        lt[last_idx], lv[last_idx],
    )  # fmt: skip


def _py(value: Any, ftype: str) -> FieldValue:
    if ftype == "float":
        return float(value)
    if ftype == "integer":
        return int(value)
    if ftype == "boolean":
        return bool(value)
    return str(value)


@dataclass(slots=True)
class _Memtable:
    """Points not yet compacted, per series in arrival order (newest write last).

    Float batches are kept as the writer gave them (``pending``: three arrays, no per-point
    work on the write path) and sorted into ``points`` by series in bulk later (``index``,
    by the compactor thread); a series is either float (pending) or not (points directly),
    so its order is kept.
    """

    points: dict[int, tuple[list[int], list[Any]]] = field(default_factory=dict)
    pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    n: int = 0
    wal_ids: list[int] = field(default_factory=list)  # the wal rows it holds

    def add_batch(self, sids: np.ndarray, times: np.ndarray, vals: np.ndarray) -> None:
        if len(sids):
            self.pending.append((sids, times, vals))
            self.n += len(sids)

    def index(self) -> None:
        """Move pending batches into ``points`` (one argsort for all of them)."""
        if not self.pending:
            return
        if len(self.pending) == 1:
            s, t, v = self.pending[0]
        else:
            s = np.concatenate([p[0] for p in self.pending])
            t = np.concatenate([p[1] for p in self.pending])
            v = np.concatenate([p[2] for p in self.pending])
        order = np.argsort(s, kind="stable")
        s, t, v = s[order], t[order], v[order]
        starts = np.flatnonzero(np.concatenate(([True], s[1:] != s[:-1])))
        ends = np.append(starts[1:], len(s))
        pts = self.points
        tl, vl = t.tolist(), v.tolist()
        for sid, a, b in zip(s[starts].tolist(), starts.tolist(), ends.tolist(), strict=True):
            e = pts.get(sid)
            if e is None:
                e = pts[sid] = ([], [])
            e[0].extend(tl[a:b])
            e[1].extend(vl[a:b])
        self.pending.clear()

    def tail(self, sid: int, ts: list[int], vs: list[Any]) -> None:
        """Append this series' points, in order, to ``ts``/``vs``."""
        e = self.points.get(sid)
        if e is not None:
            ts.extend(e[0])
            vs.extend(e[1])
        for s, t, v in self.pending:
            idx = np.flatnonzero(s == sid)
            if idx.size:
                ts.extend(t[idx].tolist())
                vs.extend(v[idx].tolist())

    def add(self, sids: Iterable[int], times: Iterable[int], vals: Iterable[Any]) -> None:
        """Non-float points, straight into ``points``."""
        pts = self.points
        n = 0
        for sid, t, v in zip(sids, times, vals, strict=False):
            e = pts.get(sid)
            if e is None:
                e = pts[sid] = ([], [])
            e[0].append(t)
            e[1].append(v)
            n += 1
        self.n += n


@dataclass(slots=True)
class _SeriesMeta:
    measurement: str
    tags: dict[str, str]
    field: str
    ftype: str


@dataclass(slots=True)
class _Chunk:
    rowid: int
    start_ns: int
    rollup: int
    n: int
    first_t: int
    last_t: int
    first_v: Any
    last_v: Any
    vmin: float | None
    vmax: float | None
    vsum: float | None


@register
class EmbeddedStorage(Storage):
    name = "embedded"

    def __init__(
        self, path: str | Path, settings: EmbeddedSettings | None = None, start: bool = True
    ) -> None:
        self.settings = settings or EmbeddedSettings()
        path = Path(path)
        if path.suffix == ".db":  # the skeleton's file path: keep the directory beside it
            path = path.with_suffix("")
        self.dir = path
        self.dir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.dir / "store.db"
        self._wlock = threading.RLock()  # the write connection and series allocation
        # Several processes may share one store (cloud workers on one data_dir). Each is a
        # "writer" with an id and a lock file it holds while alive: its uncompacted batches
        # are read by the others, and adopted by whoever finds it dead.
        self.writer_id = uuid.uuid4().hex
        self._writers_dir = self.dir / "writers"
        self._writers_dir.mkdir(exist_ok=True)
        # locked before it appears under its name, so nobody takes a starting writer for dead
        tmp = self._writers_dir / f".{self.writer_id}.tmp"
        self._lock_fd = os.open(tmp, os.O_RDWR | os.O_CREAT)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        tmp.rename(self._writers_dir / f"{self.writer_id}.lock")
        self._mlock = threading.Lock()  # memtables and in-memory series metadata
        self._closed = False
        self._sync = self.settings.synchronous.upper()
        self._db = self._connect()
        with self._db:
            self._db.executescript(_SCHEMA)
        self.chunk_ns = self._meta_int("chunk_ns", self.settings.chunk_s * _SEC)
        self._readers: list[sqlite3.Connection] = []
        self._local = threading.local()

        self._meta: dict[int, _SeriesMeta] = {}
        self._by_key: dict[tuple[str, str, str], int] = {}
        self._by_reading: dict[tuple[str, str, str | None, str], int] = {}
        self._by_field: dict[tuple[str, str], set[int]] = {}
        self._by_tag: dict[tuple[str, str, str], set[int]] = {}
        self._series_scanned = 0
        self._refresh_series(self._db)

        self._active = _Memtable()
        self._frozen: list[_Memtable] = []
        # other writers' uncompacted wal rows, decoded by series, shared by reader threads
        self._foreign: dict[int, dict[int, tuple[list[int], list[Any]]]] = {}
        self._foreign_lock = threading.Lock()
        self._adopt_dead_writers()

        self._wake = threading.Event()
        self._room = threading.Condition(self._mlock)
        self._compact_lock = threading.Lock()
        self.compactions = 0
        self._last_maintenance = time.monotonic()
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(
                target=self._run, name="embedded-compactor", daemon=True
            )
            self._thread.start()

    @classmethod
    def from_settings(cls, settings: Settings) -> EmbeddedStorage:
        emb = settings.storage.embedded
        path = Path(emb.path) if emb.path else settings.data_path / "embedded"
        return cls(path, emb)

    # -- connections --------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(
            self.db_path, check_same_thread=False, isolation_level=None, timeout=60
        )
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self._sync}")
        db.execute("PRAGMA cache_size=-65536")
        return db

    def _reader(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._connect()
            self._local.db = db
            with self._mlock:
                self._readers.append(db)
        return db

    def _meta_int(self, key: str, default: int) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is not None:
            return int(row[0])
        self._db.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, str(default)))
        return default

    # -- series metadata ----------------------------------------------------------------

    def _index_series(
        self, sid: int, measurement: str, tags: dict[str, str], fname: str, ftype: str
    ) -> None:
        self._meta[sid] = _SeriesMeta(measurement, tags, fname, ftype)
        self._by_key[(measurement, _tags_key(tags), fname)] = sid
        self._by_field.setdefault((measurement, fname), set()).add(sid)
        for k, v in tags.items():
            self._by_tag.setdefault((measurement, k, v), set()).add(sid)
        if (
            measurement == TELEMETRY
            and set(tags) <= {"site", "device", "kind"}
            and "site" in tags
            and "device" in tags
        ):
            self._by_reading[(tags["site"], tags["device"], tags.get("kind"), fname)] = sid

    def _unindex_series(self, sid: int) -> None:
        m = self._meta.pop(sid)
        self._by_key.pop((m.measurement, _tags_key(m.tags), m.field), None)
        self._by_field.get((m.measurement, m.field), set()).discard(sid)
        for k, v in m.tags.items():
            self._by_tag.get((m.measurement, k, v), set()).discard(sid)
        self._by_reading.pop((m.tags.get("site", ""), m.tags.get("device", ""),
                              m.tags.get("kind"), m.field), None)  # fmt: skip

    def _refresh_series(self, db: sqlite3.Connection) -> None:
        """Learn series other processes created (cheap: new rowids only)."""
        rows = db.execute(
            "SELECT id, measurement, tags, field, ftype FROM series WHERE id > ? ORDER BY id",
            (self._series_scanned,),
        ).fetchall()
        if not rows:
            return
        with self._mlock:
            for sid, m, tags, f, ft in rows:
                if int(sid) not in self._meta:
                    self._index_series(int(sid), m, json.loads(tags), f, ft)
            self._series_scanned = max(self._series_scanned, int(rows[-1][0]))

    def _new_series(
        self,
        measurement: str,
        tags: Mapping[str, str],
        fname: str,
        ftype: str,
        created: list[int],
    ) -> tuple[int, str]:
        """The id and type of a series not known here: created in the open write
        transaction, or found when another process created it first."""
        tags = dict(sorted(tags.items()))
        tkey = _tags_key(tags)
        cur = self._db.execute(
            "INSERT OR IGNORE INTO series (measurement, tags, field, ftype) VALUES (?, ?, ?, ?)",
            (measurement, tkey, fname, ftype),
        )
        if cur.rowcount == 1:
            sid, have = int(cur.lastrowid or 0), ftype
            created.append(sid)
        else:
            row = self._db.execute(
                "SELECT id, ftype FROM series WHERE measurement = ? AND tags = ? AND field = ?",
                (measurement, tkey, fname),
            ).fetchone()
            sid, have = int(row[0]), str(row[1])
        with self._mlock:
            if sid not in self._meta:
                self._index_series(sid, measurement, tags, fname, have)
        return sid, have

    # -- writes -------------------------------------------------------------------------

    def write_readings(
        self, readings: Sequence[Reading], kinds: Mapping[str, str] | None = None
    ) -> None:
        """Telemetry fast path: no Point objects, series ids from one dictionary lookup."""
        if not readings:
            return
        kget = (kinds or {}).get
        self._wait_for_room()
        with self._wlock:
            self._check_open()
            self._begin()
            created: list[int] = []
            try:
                cache = self._by_reading
                sids = []
                for r in readings:
                    kind = kget(r.device) or None
                    sid = cache.get((r.site, r.device, kind, r.metric))
                    if sid is None:
                        tags = {"site": r.site, "device": r.device}
                        if kind:
                            tags["kind"] = kind
                        sid = self._by_key.get((TELEMETRY, _tags_key(tags), r.metric))
                        if sid is None:
                            sid, have = self._new_series(
                                TELEMETRY, tags, r.metric, "float", created
                            )
                        else:
                            have = self._meta[sid].ftype
                        if have != "float":
                            raise TypeError(f"field {r.metric!r} of {tags} is {have}, not float")
                    sids.append(sid)
                times = [r.time_ns for r in readings]
                vals = [r.value for r in readings]
                self._commit(sids, times, vals, [])
            except BaseException:
                self._rollback(created)
                raise

    def write_points(self, points: Sequence[Point]) -> None:
        if not points:
            return
        self._wait_for_room()
        with self._wlock:
            self._check_open()
            self._begin()
            created: list[int] = []
            try:
                sids: list[int] = []
                times: list[int] = []
                vals: list[float] = []
                other: list[tuple[int, int, Any]] = []
                for p in points:
                    tkey = _tags_key(p.tags)
                    for fname, value in p.fields.items():
                        ftype = _ftype(value)
                        sid = self._by_key.get((p.measurement, tkey, fname))
                        if sid is None:
                            sid, have = self._new_series(
                                p.measurement, p.tags, fname, ftype, created
                            )
                        else:
                            have = self._meta[sid].ftype
                        if have != ftype:
                            if not (have == "float" and ftype == "integer"):
                                raise TypeError(
                                    f"field type conflict: {p.measurement} {dict(p.tags)} "
                                    f"{fname!r} is {have}, got {ftype} {value!r}"
                                )
                            value = float(value)
                            ftype = "float"
                        if ftype == "float":
                            sids.append(sid)
                            times.append(p.time_ns)
                            vals.append(value)  # type: ignore[arg-type]
                        else:
                            other.append((sid, p.time_ns, value))
                self._commit(sids, times, vals, other)
            except BaseException:
                self._rollback(created)
                raise

    def _begin(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")  # also the lock between processes

    def _rollback(self, created: list[int]) -> None:
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")
        if created:  # rolled back with the transaction: forget them here too
            with self._mlock:
                for sid in created:
                    self._unindex_series(sid)

    def _commit(
        self,
        sids: list[int],
        times: list[int],
        vals: list[Any],
        other: list[tuple[int, int, Any]],
    ) -> None:
        """Within the open transaction: one wal row, commit; then the memtable."""
        try:
            blob_s = array("q", sids).tobytes()
            blob_t = array("q", times).tobytes()
            blob_v = array("d", vals).tobytes()
            blob_o = msgspec.msgpack.encode(other) if other else None
        except (TypeError, OverflowError) as exc:
            raise TypeError(f"cannot store values: {exc}") from None
        db = self._db
        cur = db.execute(
            "INSERT INTO wal (writer, sids, times, vals, other) VALUES (?, ?, ?, ?, ?)",
            (self.writer_id, blob_s, blob_t, blob_v, blob_o),
        )
        db.execute("COMMIT")
        wal_id = int(cur.lastrowid or 0)
        with self._mlock:
            mem = self._active
            mem.add_batch(
                np.frombuffer(blob_s, dtype=_I64),
                np.frombuffer(blob_t, dtype=_I64),
                np.frombuffer(blob_v, dtype=_F64),
            )
            if other:
                mem.add(*zip(*other, strict=False))
            mem.wal_ids.append(wal_id)
            if mem.n >= self.settings.memtable_max_points or len(mem.pending) >= 32:
                self._wake.set()

    def _wait_for_room(self) -> None:
        """Bounded memory: when compaction falls far behind, writers wait for it."""
        limit = 4 * self.settings.memtable_max_points
        with self._room:
            while (
                self._active.n + sum(f.n for f in self._frozen) > limit
                and not self._closed
                and self._thread is not None
                and self._thread.is_alive()
            ):
                self._wake.set()
                self._room.wait(1.0)

    def _writer_alive(self, writer: str) -> bool:
        if writer == self.writer_id:
            return True
        path = self._writers_dir / f"{writer}.lock"
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True  # its process holds the lock
        finally:
            os.close(fd)
        path.unlink(missing_ok=True)
        return False

    def _adopt_dead_writers(self) -> int:
        """Uncompacted batches of processes that died (or of this store's previous run)
        become ours: replayed into the memtable, compacted like our own."""
        writers = [w for (w,) in self._reader().execute("SELECT DISTINCT writer FROM wal")]
        dead = [w for w in writers if not self._writer_alive(w)]
        if not dead:
            return 0
        with self._wlock:
            self._begin()
            try:
                marks = ",".join("?" * len(dead))
                rows = self._db.execute(
                    f"SELECT id, sids, times, vals, other FROM wal WHERE writer IN ({marks}) "
                    "ORDER BY id",
                    dead,
                ).fetchall()
                self._db.execute(
                    f"UPDATE wal SET writer = ? WHERE writer IN ({marks})", [self.writer_id, *dead]
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback([])
                raise
            self._refresh_series(self._db)
            n = 0
            with self._mlock:
                mem = self._active
                for wid, bs, bt, bv, bo in rows:
                    sids, _, _, other = _decode_wal(bs, bt, bv, bo)
                    mem.add_batch(
                        np.frombuffer(bs, dtype=_I64),
                        np.frombuffer(bt, dtype=_I64),
                        np.frombuffer(bv, dtype=_F64),
                    )
                    if other:
                        mem.add(*zip(*other, strict=False))
                    mem.wal_ids.append(int(wid))
                    n += len(sids) + len(other)
        log.info("embedded store: took over %d uncompacted points of %d stopped writer(s)", n,
                 len(dead))  # fmt: skip
        return n

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("storage is closed")

    # -- compaction ---------------------------------------------------------------------

    def _run(self) -> None:
        interval = self.settings.compact_interval_s
        last = time.monotonic()
        while not self._closed:
            self._wake.wait(min(interval, 1.0))
            self._wake.clear()
            if self._closed:
                break
            try:
                with self._mlock:
                    due = self._active.n >= self.settings.memtable_max_points
                    if len(self._active.pending) >= 16:  # keep queries' scans of it short
                        self._active.index()
                if not due and time.monotonic() - last < interval:
                    continue
                last = time.monotonic()
                self.compact()
                self._adopt_dead_writers()
                if (
                    time.monotonic() - self._last_maintenance
                    >= self.settings.maintenance_interval_s
                ):
                    self._last_maintenance = time.monotonic()
                    self.maintain()
            except Exception:
                log.exception("embedded store: compaction failed; retrying later")
                time.sleep(1.0)

    def flush(self) -> None:
        """Compact everything written so far into chunks (tests, benchmarks, shutdown)."""
        self.compact()
        self.compact()

    def compact(self) -> int:
        """Move the memtable into chunks; returns the number of points compacted."""
        with self._compact_lock:
            with self._mlock:
                if not self._frozen:
                    if self._active.n == 0:
                        return 0
                    self._frozen.append(self._active)
                    self._active = _Memtable()
                mem = self._frozen[0]
            rdb = self._reader()
            version = _chunks_version(rdb)
            rows = self._merge_memtable(mem, rdb)  # outside the write lock: writers go on
            with self._wlock:
                db = self._db
                self._begin()
                try:
                    if _chunks_version(db) != version:  # another process compacted meanwhile
                        rows = self._merge_memtable(mem, db)
                    _put_chunks(db, rows)
                    db.executemany("DELETE FROM wal WHERE id = ?", [(i,) for i in mem.wal_ids])
                    db.execute("COMMIT")
                except BaseException:
                    self._rollback([])
                    raise
            with self._room:
                self._frozen.remove(mem)
                self._room.notify_all()
            self.compactions += 1
            return mem.n

    def _merge_memtable(self, mem: _Memtable, db: sqlite3.Connection) -> list[tuple[Any, ...]]:
        """Chunk rows for everything in ``mem``, merged with the chunks already stored."""
        chunk_ns = self.chunk_ns
        with self._mlock:  # frozen: no writer appends, but readers look at it
            mem.index()
        series: list[tuple[int, str, np.ndarray, np.ndarray]] = []
        floats = [sid for sid in mem.points if self._meta[sid].ftype == "float"]
        if floats:  # the common case in bulk: two array conversions instead of two per series
            lens = [len(mem.points[sid][0]) for sid in floats]
            total = sum(lens)
            all_t = np.fromiter(chain.from_iterable(mem.points[s][0] for s in floats), _I64, total)
            all_v = np.fromiter(chain.from_iterable(mem.points[s][1] for s in floats), _F64, total)
            off = 0
            for sid, n in zip(floats, lens, strict=True):
                series.append((sid, "float", all_t[off : off + n], all_v[off : off + n]))
                off += n
        for sid, (tl, vl) in mem.points.items():
            ftype = self._meta[sid].ftype
            if ftype != "float":
                series.append((sid, ftype, np.asarray(tl, dtype=_I64), _to_array(vl, ftype)))
        pieces: list[tuple[int, int, np.ndarray, np.ndarray, str]] = []
        for sid, ftype, t0, v0 in series:
            t, v = _dedupe_last(t0, v0)
            first = int(t[0] - t[0] % chunk_ns)
            if int(t[-1]) < first + chunk_ns:
                pieces.append((sid, first, t, v, ftype))
                continue
            w = t - np.mod(t, chunk_ns)
            brk = np.flatnonzero(w[1:] != w[:-1]) + 1
            for ts, vs in zip(np.split(t, brk), np.split(v, brk), strict=True):
                pieces.append((sid, int(ts[0] - ts[0] % chunk_ns), ts, vs, ftype))
        existing = self._existing_chunks(db, [(p[0], p[1]) for p in pieces])
        rows: list[tuple[Any, ...]] = []
        for sid, start, ts, vs, ftype in pieces:
            old = existing.get((sid, start))
            if old is None:
                rows.append(self._raw_row(sid, start, ts, vs, ftype))
            elif old[0] == 0:
                ot = np.frombuffer(old[1], dtype=_I64)
                ov = _decode_values(old[2], ftype)
                mt, mv = _dedupe_last(np.concatenate([ot, ts]), np.concatenate([ov, vs]))
                rows.append(self._raw_row(sid, start, mt, mv, ftype))
            else:  # late points into a rolled-up window are folded into its buckets
                width = int(old[0])
                parts = _combine([
                    _rollup_partials(old[1], old[2], width, width),
                    _partials_from_points(ts, vs, width, True),
                ])  # fmt: skip
                rows.append(_rollup_row(sid, start, width, parts))
        return rows

    @staticmethod
    def _existing_chunks(
        rdb: sqlite3.Connection, keys: list[tuple[int, int]]
    ) -> dict[tuple[int, int], tuple[int, bytes, bytes]]:
        """Stored chunks for (series, window start) keys, a few hundred keys per statement."""
        out: dict[tuple[int, int], tuple[int, bytes, bytes]] = {}
        for i in range(0, len(keys), 500):
            part = keys[i : i + 500]
            sql = (
                "SELECT series_id, start_ns, rollup, times, vals FROM chunks "
                "WHERE (series_id, start_ns) IN (VALUES " + ",".join(["(?,?)"] * len(part)) + ")"
            )
            for sid, start, rollup, bt, bv in rdb.execute(sql, [x for k in part for x in k]):
                out[(int(sid), int(start))] = (int(rollup), bt, bv)
        return out

    @staticmethod
    def _raw_row(sid: int, start: int, t: np.ndarray, v: np.ndarray, ftype: str) -> tuple[Any, ...]:
        vmin: float | None = None
        vmax: float | None = None
        vsum: float | None = None
        if ftype in _NUMERIC:
            vf = v.astype(_F64, copy=False)
            vmin, vmax, vsum = float(vf.min()), float(vf.max()), float(vf.sum())
            first_v: Any = v[0].item()
            last_v: Any = v[-1].item()
        else:
            first_v, last_v = v[0], v[-1]
        return (sid, start, 0, len(t), int(t[0]), int(t[-1]), first_v, last_v, vmin, vmax,
                vsum, t.tobytes(), _encode_values(v, ftype))  # fmt: skip

    # -- retention and downsampling -----------------------------------------------------

    def maintain(self, now_ns: int | None = None) -> dict[str, int]:
        """Drop chunks past retention, roll up numeric chunks past ``downsample_after_s``.

        Runs in one write transaction (writers wait; it is rare and, past the first run,
        small), so several processes sharing the store never undo each other's work."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        s = self.settings
        dropped = rolled = 0
        width = s.downsample_every_s * _SEC
        with self._compact_lock, self._wlock:
            db = self._db
            self._begin()
            try:
                if s.retention_s:
                    cutoff = now_ns - s.retention_s * _SEC
                    cur = db.execute(
                        "DELETE FROM chunks WHERE start_ns + ? <= ?", (self.chunk_ns, cutoff)
                    )
                    dropped = cur.rowcount
                    if dropped:
                        _put_chunks(db, [])
                if s.downsample_after_s and self.chunk_ns % width == 0:
                    cutoff = now_ns - s.downsample_after_s * _SEC
                    while True:
                        todo = db.execute(
                            "SELECT c.series_id, c.start_ns, c.times, c.vals, s.ftype "
                            "FROM chunks c JOIN series s ON s.id = c.series_id "
                            "WHERE c.rollup = 0 AND c.start_ns + ? <= ? "
                            "AND s.ftype IN ('float', 'integer') LIMIT 2000",
                            (self.chunk_ns, cutoff),
                        ).fetchall()
                        rows = [
                            _rollup_row(sid, start, width, _partials_from_points(
                                np.frombuffer(bt, dtype=_I64), _decode_values(bv, ftype), width, True))
                            for sid, start, bt, bv, ftype in todo
                        ]  # fmt: skip
                        _put_chunks(db, rows)
                        rolled += len(rows)
                        if len(todo) < 2000:
                            break
                db.execute("COMMIT")
            except BaseException:
                self._rollback([])
                raise
        if dropped or rolled:
            log.info("embedded store: retention dropped %d chunks, rolled up %d", dropped, rolled)
        return {"dropped": dropped, "rolled_up": rolled}

    # -- queries ------------------------------------------------------------------------

    def _matching(
        self, measurement: str, tags: Mapping[str, str], fields: Sequence[str] | None
    ) -> list[int]:
        with self._mlock:
            if fields is None:
                cand: set[int] = {s for s, m in self._meta.items() if m.measurement == measurement}
            else:
                cand = set()
                for f in fields:
                    cand |= self._by_field.get((measurement, f), set())
            for k, v in tags.items():
                if not cand:
                    break
                cand = cand & self._by_tag.get((measurement, k, v), set())
            return sorted(cand)

    def _with_foreign(
        self, db: sqlite3.Connection, tails: dict[int, tuple[list[int], list[Any]]]
    ) -> dict[int, tuple[list[int], list[Any]]]:
        """Add other processes' uncompacted points (their wal rows) to the tails, before
        ours; inside the caller's read transaction, so consistent with the chunks."""
        if not tails:
            return tails
        ids = [
            int(i)
            for (i,) in db.execute(
                "SELECT id FROM wal WHERE writer < ? OR writer > ? ORDER BY id",
                (self.writer_id, self.writer_id),
            )
        ]
        if not ids:
            if self._foreign:
                with self._foreign_lock:
                    self._foreign.clear()
            return tails
        rows = [self._foreign_row(db, i) for i in ids]
        with self._foreign_lock:
            for gone in set(self._foreign) - set(ids):  # compacted by their writer meanwhile
                del self._foreign[gone]
        out = {}
        for sid, own in tails.items():
            ft: list[int] = []
            fv: list[Any] = []
            for row in rows:
                e = row.get(sid)
                if e is not None:
                    ft.extend(e[0])
                    fv.extend(e[1])
            out[sid] = (ft + own[0], fv + own[1]) if ft else own
        return out

    def _foreign_row(
        self, db: sqlite3.Connection, wal_id: int
    ) -> dict[int, tuple[list[int], list[Any]]]:
        """Another writer's wal row, by series; rows never change, so decoded once."""
        with self._foreign_lock:
            row = self._foreign.get(wal_id)
        if row is None:
            found = db.execute(
                "SELECT sids, times, vals, other FROM wal WHERE id = ?", (wal_id,)
            ).fetchone()
            row = {}
            if found is not None:
                sids, times, vals, other = _decode_wal(*found)
                for sid, t, v in chain(zip(sids, times, vals, strict=True), other):
                    e = row.get(sid)
                    if e is None:
                        e = row[sid] = ([], [])
                    e[0].append(t)
                    e[1].append(v)
            with self._foreign_lock:
                self._foreign[wal_id] = row
        return row

    def _tail(self, sid: int) -> tuple[list[int], list[Any]]:
        """The series' uncompacted points, oldest source first (caller holds _mlock)."""
        ts: list[int] = []
        vs: list[Any] = []
        for mem in (*self._frozen, self._active):
            mem.tail(sid, ts, vs)
        return ts, vs

    def _chunks(
        self, db: sqlite3.Connection, sid: int, start: int | None, end: int | None
    ) -> list[_Chunk]:
        lo = -(2**63) if start is None else start - start % self.chunk_ns
        hi = 2**63 - 1 if end is None else end
        return [
            _Chunk(*row)
            for row in db.execute(
                "SELECT rowid, start_ns, rollup, n, first_t, last_t, first_v, last_v, vmin, vmax, "
                "vsum FROM chunks WHERE series_id = ? AND start_ns >= ? AND start_ns < ? "
                "ORDER BY start_ns",
                (sid, lo, hi),
            )
        ]

    def query(self, query: SeriesQuery) -> list[Series]:
        q = query
        agg = q.agg if q.agg else None
        every = int(q.every_ns) if (q.every_ns and agg) else None
        db = self._reader()
        self._refresh_series(db)
        sids = self._matching(q.measurement, q.tags, list(q.fields))
        groups: dict[tuple[str, tuple[tuple[str, str], ...]], list[int]] = {}
        with self._mlock:
            metas = {sid: self._meta[sid] for sid in sids}
            tails = {sid: self._tail(sid) for sid in sids}
        for sid in sids:
            m = metas[sid]
            gkey = tuple((k, m.tags.get(k, "")) for k in q.group_by)
            groups.setdefault((m.field, gkey), []).append(sid)
        result = []
        # one read transaction: a consistent snapshot of chunks taken after the memtables
        db.execute("BEGIN")
        try:
            tails = self._with_foreign(db, tails)
            for (fname, gkey), ids in sorted(groups.items()):
                if agg is None:
                    points = self._raw(db, ids, tails, metas, q)
                else:
                    points = self._aggregate(db, ids, tails, metas, q, agg, every)
                if points:
                    result.append(Series(fname, dict(gkey), points))
        finally:
            db.execute("COMMIT")
        return result

    def _series_points(
        self,
        db: sqlite3.Connection,
        sid: int,
        tail: tuple[list[int], list[Any]],
        ftype: str,
        q: SeriesQuery,
        summary: Callable[[_Chunk, np.ndarray], bool] | None = None,
        rollups: list[tuple[_Chunk, bytes, bytes]] | None = None,
        summarized: list[_Chunk] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Deduplicated points of one series in [start, end), chunks then memtable."""
        start, end = q.start_ns, q.end_ns
        tt = np.asarray(tail[0], dtype=_I64)
        tv = _to_array(tail[1], ftype)
        if len(tt) and (start is not None or end is not None):
            sel = np.ones(len(tt), dtype=bool)
            if start is not None:
                sel &= tt >= start
            if end is not None:
                sel &= tt < end
            tt, tv = tt[sel], tv[sel]
        t_parts = []
        v_parts = []
        for c in self._chunks(db, sid, start, end):
            if summary is not None and c.rollup == 0 and summary(c, tt):
                assert summarized is not None
                summarized.append(c)
                continue
            bt, bv = db.execute(
                "SELECT times, vals FROM chunks WHERE rowid = ?", (c.rowid,)
            ).fetchone()
            if c.rollup:
                if rollups is not None:
                    rollups.append((c, bt, bv))
                    continue
                p = _rollup_partials(bt, bv, c.rollup, c.rollup)
                ct, cv = p.b, (p.sm / p.cnt)  # raw reads of rolled-up data: bucket means
            else:
                ct = np.frombuffer(bt, dtype=_I64)
                cv = _decode_values(bv, ftype)
            if (start is not None and c.first_t < start) or (end is not None and c.last_t >= end):
                sel = np.ones(len(ct), dtype=bool)
                if start is not None:
                    sel &= ct >= start
                if end is not None:
                    sel &= ct < end
                ct, cv = ct[sel], cv[sel]
            t_parts.append(ct)
            v_parts.append(cv)
        if len(tt):
            t_parts.append(tt)
            v_parts.append(tv)
            if len(t_parts) == 1:
                return _dedupe_last(tt, tv)
            return _dedupe_last(np.concatenate(t_parts), np.concatenate(v_parts))
        if not t_parts:
            return np.empty(0, dtype=_I64), _to_array([], ftype)
        if len(t_parts) == 1:
            return t_parts[0], v_parts[0]
        return np.concatenate(t_parts), np.concatenate(v_parts)  # disjoint, sorted windows

    def _raw(
        self,
        db: sqlite3.Connection,
        ids: list[int],
        tails: dict[int, tuple[list[int], list[Any]]],
        metas: dict[int, _SeriesMeta],
        q: SeriesQuery,
    ) -> list[tuple[int, FieldValue]]:
        ftype = metas[ids[0]].ftype
        ts, vs = [], []
        for sid in ids:
            t, v = self._series_points(db, sid, tails[sid], metas[sid].ftype, q)
            ts.append(t)
            vs.append(v)
        if len(ts) == 1:
            t, v = ts[0], vs[0]
        else:
            t = np.concatenate(ts)
            v = np.concatenate([x.astype(object) if x.dtype == object else x for x in vs])
            order = np.argsort(t, kind="stable")
            t, v = t[order], v[order]
        if q.limit:
            t, v = t[: q.limit], v[: q.limit]
        if ftype == "float" or v.dtype == _F64:
            return list(zip(t.tolist(), v.astype(_F64, copy=False).tolist(), strict=False))
        return [(tt, _py(vv, ftype)) for tt, vv in zip(t.tolist(), v.tolist(), strict=False)]

    def _aggregate(
        self,
        db: sqlite3.Connection,
        ids: list[int],
        tails: dict[int, tuple[list[int], list[Any]]],
        metas: dict[int, _SeriesMeta],
        q: SeriesQuery,
        agg: str,
        every: int | None,
    ) -> list[tuple[int, FieldValue]]:
        ftype = metas[ids[0]].ftype
        numeric = ftype in _NUMERIC
        if not numeric and agg not in ("count", "first", "last"):
            raise ValueError(f"aggregate {agg!r} needs a numeric field; {ftype} given")
        start, end = q.start_ns, q.end_ns

        def summary(c: _Chunk, tail_t: np.ndarray) -> bool:
            if (start is not None and c.first_t < start) or (end is not None and c.last_t >= end):
                return False
            if every is not None and (c.first_t - c.first_t % every) != (
                c.last_t - c.last_t % every
            ):
                return False
            if not numeric and agg not in ("count", "first", "last"):
                return False
            return not (len(tail_t) and bool(((tail_t >= c.first_t) & (tail_t <= c.last_t)).any()))

        parts: list[_Partials] = []
        from_points = 0
        for sid in ids:
            st = metas[sid].ftype
            summarized: list[_Chunk] = []
            rollups: list[tuple[_Chunk, bytes, bytes]] = []
            t, v = self._series_points(db, sid, tails[sid], st, q, summary, rollups, summarized)
            if len(t):
                parts.append(_partials_from_points(t, v, every, numeric))
                from_points += 1
            for c, bt, bv in rollups:
                p = _rollup_partials(bt, bv, every, c.rollup)
                sel = np.ones(len(p.ft), dtype=bool)
                if start is not None:
                    sel &= p.ft >= start
                if end is not None:
                    sel &= p.ft < end
                if sel.any():
                    parts.append(_Partials(*(getattr(p, f)[sel] for f in p.__slots__)))  # type: ignore[attr-defined]
            if summarized:
                n = len(summarized)
                fv = _to_array([c.first_v for c in summarized], st)
                lv = _to_array([c.last_v for c in summarized], st)
                ft = np.fromiter((c.first_t for c in summarized), dtype=_I64, count=n)
                parts.append(
                    _Partials(
                        _bucket(ft, every),
                        np.fromiter((c.n for c in summarized), dtype=_I64, count=n),
                        np.fromiter((c.vsum or 0.0 for c in summarized), dtype=_F64, count=n),
                        np.fromiter((c.vmin or 0.0 for c in summarized), dtype=_F64, count=n),
                        np.fromiter((c.vmax or 0.0 for c in summarized), dtype=_F64, count=n),
                        ft,
                        fv,
                        np.fromiter((c.last_t for c in summarized), dtype=_I64, count=n),
                        lv,
                    )
                )
        if not parts:
            return []
        # partials made from points have one entry per bucket; summaries and rollups may not
        p = parts[0] if (len(parts) == 1 and from_points == 1) else _combine(parts, force=True)
        n = len(p.b) if q.limit is None else min(len(p.b), q.limit)
        if every is not None:
            times = p.b[:n].tolist()
        elif agg == "first":
            times = p.ft[:n].tolist()
        elif agg == "last":
            times = p.lt[:n].tolist()
        else:
            times = [start if start is not None else 0] * n
        if agg == "mean":
            vals: list[Any] = (p.sm[:n] / p.cnt[:n]).tolist()
        elif agg == "count":
            vals = p.cnt[:n].tolist()
        elif agg in ("sum", "min", "max"):
            arr = {"sum": p.sm, "min": p.mn, "max": p.mx}[agg][:n]
            vals = arr.astype(_I64).tolist() if ftype in ("integer", "boolean") else arr.tolist()
        elif agg in ("first", "last"):
            arr = (p.fv if agg == "first" else p.lv)[:n]
            vals = [_py(x, ftype) for x in arr.tolist()]
        else:
            raise ValueError(f"unknown aggregate {agg!r}")
        return list(zip(times, vals, strict=False))

    def latest(
        self, measurement: str, tags: Mapping[str, str]
    ) -> dict[str, tuple[int, FieldValue]]:
        db = self._reader()
        self._refresh_series(db)
        sids = self._matching(measurement, tags, None)
        with self._mlock:
            metas = {sid: self._meta[sid] for sid in sids}
            tails = {sid: self._tail(sid) for sid in sids}
        out: dict[str, tuple[int, FieldValue]] = {}
        db.execute("BEGIN")
        try:
            tails = self._with_foreign(db, tails)
            for sid in sids:
                m = metas[sid]
                best: tuple[int, Any] | None = None
                row = db.execute(
                    "SELECT last_t, last_v FROM chunks WHERE series_id = ? "
                    "ORDER BY start_ns DESC LIMIT 1",
                    (sid,),
                ).fetchone()
                if row is not None:
                    best = (int(row[0]), row[1])
                tt, tv = tails[sid]
                if tt:
                    i = max(range(len(tt)), key=lambda j: (tt[j], j))
                    if best is None or tt[i] >= best[0]:
                        best = (tt[i], tv[i])
                if best is None:
                    continue
                value = _py(best[1], m.ftype)
                if m.field not in out or best[0] > out[m.field][0]:
                    out[m.field] = (best[0], value)
        finally:
            db.execute("COMMIT")
        return out

    def _metas(self) -> list[_SeriesMeta]:
        self._refresh_series(self._reader())
        with self._mlock:
            return list(self._meta.values())

    def measurements(self) -> list[str]:
        return sorted({m.measurement for m in self._metas()})

    def field_keys(self, measurement: str) -> dict[str, str]:
        return {m.field: m.ftype for m in self._metas() if m.measurement == measurement}

    def tag_keys(self, measurement: str) -> list[str]:
        return sorted({k for m in self._metas() if m.measurement == measurement for k in m.tags})

    def tag_values(
        self, measurement: str, key: str, tags: Mapping[str, str] | None = None
    ) -> list[str]:
        self._refresh_series(self._reader())
        sids = self._matching(measurement, tags or {}, None)
        with self._mlock:
            return sorted({self._meta[s].tags[key] for s in sids if key in self._meta[s].tags})

    def count(self) -> int:
        """Stored points (each (series, time) once); for tests."""
        total = 0
        for m in self.measurements():
            for series in self.query(SeriesQuery(m, list(self.field_keys(m)))):
                total += len(series.points)
        return total

    def stats(self) -> dict[str, float]:
        """``memtable_points``: written, not yet compacted; ``compactions``: since start."""
        with self._mlock:
            waiting = self._active.n + sum(f.n for f in self._frozen)
        return {"memtable_points": float(waiting), "compactions": float(self.compactions)}

    def ping(self) -> bool:
        if self._closed:
            return False
        try:
            self._reader().execute("SELECT 1").fetchone()
        except sqlite3.Error:
            return False
        return True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        with self._room:
            self._room.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            self.compact()  # so the next start has little to replay
        except Exception:
            log.exception("embedded store: final compaction failed; the wal keeps the data")
        with self._wlock, self._mlock:
            for db in self._readers:
                db.close()
            self._readers.clear()
            self._db.close()
        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        os.close(self._lock_fd)
        (self._writers_dir / f"{self.writer_id}.lock").unlink(missing_ok=True)


def _chunks_version(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT value FROM meta WHERE key = 'chunks_version'").fetchone()
    return int(row[0]) if row else 0


def _put_chunks(db: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    """Write chunk rows in the open transaction and tell other processes chunks changed."""
    db.executemany(
        "INSERT OR REPLACE INTO chunks (series_id, start_ns, rollup, n, first_t, last_t, "
        "first_v, last_v, vmin, vmax, vsum, times, vals) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
        rows,
    )
    db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'chunks_version'")


def _decode_wal(
    bs: bytes, bt: bytes, bv: bytes, bo: bytes | None
) -> tuple[array[int], array[int], array[float], list[Any]]:
    sids = array("q")
    sids.frombytes(bs)
    times = array("q")
    times.frombytes(bt)
    vals = array("d")
    vals.frombytes(bv)
    other = msgspec.msgpack.decode(bo) if bo else []
    return sids, times, vals, other


def _rollup_partials(bt: bytes, bv: bytes, every: int | None, width: int) -> _Partials:
    t = np.frombuffer(bt, dtype=_I64)
    m = np.frombuffer(bv, dtype=_F64).reshape(6, len(t))
    p = _Partials(t, m[0].astype(_I64), m[1], m[2], m[3], t, m[4], t, m[5])
    if every != width:
        p.b = _bucket(t, every)
    return p


def _rollup_row(sid: int, start: int, width: int, p: _Partials) -> tuple[Any, ...]:
    blob = np.stack(
        [p.cnt.astype(_F64), p.sm, p.mn, p.mx, p.fv.astype(_F64), p.lv.astype(_F64)]
    ).tobytes()
    return (sid, start, width, int(p.cnt.sum()), int(p.ft[0]), int(p.lt[-1]),
            float(p.fv[0]), float(p.lv[-1]), float(p.mn.min()), float(p.mx.max()),
            float(p.sm.sum()), np.ascontiguousarray(p.b, dtype=_I64).tobytes(), blob)  # fmt: skip
