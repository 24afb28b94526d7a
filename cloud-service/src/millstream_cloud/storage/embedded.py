"""The embedded default store: SQLite, one file, no server to run.

Points live in one table keyed by (series, time), so a rewrite of the same point is an
idempotent upsert; series (measurement + tag set + field) are numbered in a small table
kept in memory as well, so tag filters are resolved without touching the points.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from millstream_cloud.storage.base import (
    FieldValue,
    Point,
    Series,
    SeriesQuery,
    Storage,
    register,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
  id INTEGER PRIMARY KEY,
  measurement TEXT NOT NULL,
  tags TEXT NOT NULL,
  field TEXT NOT NULL,
  ftype TEXT NOT NULL,
  UNIQUE (measurement, tags, field)
);
CREATE TABLE IF NOT EXISTS points (
  series_id INTEGER NOT NULL,
  time_ns INTEGER NOT NULL,
  value,
  PRIMARY KEY (series_id, time_ns)
) WITHOUT ROWID;
"""

_AGG_SQL = {
    "mean": "AVG(value)",
    "min": "MIN(value)",
    "max": "MAX(value)",
    "sum": "SUM(value)",
    "count": "COUNT(value)",
}


def _ftype(value: FieldValue) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    return "string"


@register
class EmbeddedStorage(Storage):
    name = "embedded"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        # (measurement, tags json, field) -> (id, tags dict, ftype)
        self._series: dict[tuple[str, str, str], int] = {}
        self._meta: dict[int, tuple[str, dict[str, str], str, str]] = {}
        for sid, m, tags, f, ft in self._db.execute(
            "SELECT id, measurement, tags, field, ftype FROM series"
        ):
            self._series[(m, tags, f)] = sid
            self._meta[sid] = (m, json.loads(tags), f, ft)

    def _series_id(
        self, measurement: str, tags: Mapping[str, str], field: str, value: FieldValue
    ) -> int:
        key_tags = json.dumps(dict(sorted(tags.items())), separators=(",", ":"))
        key = (measurement, key_tags, field)
        sid = self._series.get(key)
        if sid is None:
            ftype = _ftype(value)
            cur = self._db.execute(
                "INSERT INTO series (measurement, tags, field, ftype) VALUES (?, ?, ?, ?)",
                (measurement, key_tags, field, ftype),
            )
            sid = int(cur.lastrowid or 0)
            self._series[key] = sid
            self._meta[sid] = (measurement, dict(sorted(tags.items())), field, ftype)
        return sid

    def write_points(self, points: Sequence[Point]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = []
                for p in points:
                    for f, v in p.fields.items():
                        rows.append((self._series_id(p.measurement, p.tags, f, v), p.time_ns, v))
                self._db.executemany(
                    "INSERT INTO points (series_id, time_ns, value) VALUES (?, ?, ?) "
                    "ON CONFLICT (series_id, time_ns) DO UPDATE SET value = excluded.value",
                    rows,
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                self._series = {k: v for k, v in self._series.items() if v in self._committed_ids()}
                raise

    def _committed_ids(self) -> set[int]:
        return {row[0] for row in self._db.execute("SELECT id FROM series")}

    def _matching(
        self, measurement: str, tags: Mapping[str, str], fields: Sequence[str] | None
    ) -> list[int]:
        out = []
        for sid, (m, stags, f, _) in self._meta.items():
            if m != measurement or (fields is not None and f not in fields):
                continue
            if all(stags.get(k) == v for k, v in tags.items()):
                out.append(sid)
        return out

    def query(self, query: SeriesQuery) -> list[Series]:
        sids = self._matching(query.measurement, query.tags, list(query.fields))
        groups: dict[tuple[str, tuple[tuple[str, str], ...]], list[int]] = {}
        for sid in sids:
            _, stags, f, _ = self._meta[sid]
            gkey = tuple((k, stags.get(k, "")) for k in query.group_by)
            groups.setdefault((f, gkey), []).append(sid)
        result = []
        with self._lock:
            for (f, gkey), ids in sorted(groups.items()):
                result.append(Series(f, dict(gkey), self._points(ids, query)))
        return result

    def _points(self, ids: list[int], q: SeriesQuery) -> list[tuple[int, FieldValue]]:
        where = [f"series_id IN ({','.join('?' * len(ids))})"]
        args: list[object] = list(ids)
        if q.start_ns is not None:
            where.append("time_ns >= ?")
            args.append(q.start_ns)
        if q.end_ns is not None:
            where.append("time_ns < ?")
            args.append(q.end_ns)
        cond = " AND ".join(where)
        limit = f" LIMIT {int(q.limit)}" if q.limit else ""
        if not q.every_ns or not q.agg:
            if q.agg and q.agg != "last" and q.agg != "first" and q.agg in _AGG_SQL:
                sql = f"SELECT MIN(time_ns), {_AGG_SQL[q.agg]} FROM points WHERE {cond}"
                rows = self._db.execute(sql, args).fetchall()
                return [(int(t), v) for t, v in rows if t is not None]
            sql = f"SELECT time_ns, value FROM points WHERE {cond} ORDER BY time_ns{limit}"
            return [(int(t), v) for t, v in self._db.execute(sql, args)]
        every = int(q.every_ns)
        bucket = f"(time_ns - (((time_ns % {every}) + {every}) % {every}))"
        if q.agg in ("last", "first"):
            pick = "MAX" if q.agg == "last" else "MIN"
            sql = (
                f"SELECT b, value FROM (SELECT {bucket} AS b, time_ns, value, "
                f"ROW_NUMBER() OVER (PARTITION BY {bucket} ORDER BY time_ns "
                f"{'DESC' if pick == 'MAX' else 'ASC'}) AS rn FROM points WHERE {cond}) "
                f"WHERE rn = 1 ORDER BY b{limit}"
            )
        else:
            sql = f"SELECT {bucket} AS b, {_AGG_SQL[q.agg]} FROM points WHERE {cond} GROUP BY b ORDER BY b{limit}"
        return [(int(t), v) for t, v in self._db.execute(sql, args)]

    def latest(
        self, measurement: str, tags: Mapping[str, str]
    ) -> dict[str, tuple[int, FieldValue]]:
        out: dict[str, tuple[int, FieldValue]] = {}
        with self._lock:
            for sid in self._matching(measurement, tags, None):
                row = self._db.execute(
                    "SELECT time_ns, value FROM points WHERE series_id = ? ORDER BY time_ns DESC LIMIT 1",
                    (sid,),
                ).fetchone()
                if row is None:
                    continue
                f = self._meta[sid][2]
                if f not in out or row[0] > out[f][0]:
                    out[f] = (int(row[0]), row[1])
        return out

    def measurements(self) -> list[str]:
        return sorted({m for m, _, _, _ in self._meta.values()})

    def field_keys(self, measurement: str) -> dict[str, str]:
        return {f: ft for m, _, f, ft in self._meta.values() if m == measurement}

    def tag_keys(self, measurement: str) -> list[str]:
        return sorted(
            {k for m, tags, _, _ in self._meta.values() if m == measurement for k in tags}
        )

    def tag_values(
        self, measurement: str, key: str, tags: Mapping[str, str] | None = None
    ) -> list[str]:
        tags = tags or {}
        return sorted(
            {
                stags[key]
                for m, stags, _, _ in self._meta.values()
                if m == measurement
                and key in stags
                and all(stags.get(k) == v for k, v in tags.items())
            }
        )

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM points").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
