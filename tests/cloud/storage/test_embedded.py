"""What only the embedded store has: its files, crash recovery, threads, retention, rollups."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from millstream_cloud.model import Reading
from millstream_cloud.settings import EmbeddedSettings, load_settings
from millstream_cloud.storage import open_storage
from millstream_cloud.storage.base import TELEMETRY, Point, SeriesQuery
from millstream_cloud.storage.embedded import EmbeddedStorage

S = 1_000_000_000
T0 = 1_767_225_600 * S
DAY = 86400 * S


def batch(
    n: int, device: str = "d1", metric: str = "temp", t0: int = T0, step: int = S
) -> list[Reading]:
    return [Reading(device, "plant1", metric, t0 + i * step, float(i)) for i in range(n)]


def temp(store: EmbeddedStorage, **kw: object) -> list[tuple[int, object]]:
    out = store.query(SeriesQuery(TELEMETRY, ["temp"], {"device": "d1"}, **kw))  # type: ignore[arg-type]
    return out[0].points if out else []


def test_open_storage_uses_the_settings(tmp_path: Path) -> None:
    settings = load_settings(
        overrides={"data_dir": str(tmp_path), "storage": {"embedded": {"chunk_s": 600}}}
    )
    store = open_storage(settings)
    try:
        assert isinstance(store, EmbeddedStorage)
        assert store.dir == tmp_path / "embedded"
        assert store.chunk_ns == 600 * S
    finally:
        store.close()


def test_writes_survive_a_crash_before_compaction(tmp_path: Path) -> None:
    """Nothing compacted, no close(): the wal rows alone bring every point back."""
    store = EmbeddedStorage(tmp_path / "s", start=False)
    store.write_readings(batch(1000))
    store.write_readings(batch(10, t0=T0 + 5 * S))  # rewrites
    store._db.close()  # the process dies here: no compaction, no close, its lock released
    os.close(store._lock_fd)
    again = EmbeddedStorage(tmp_path / "s")
    try:
        pts = temp(again)
        assert len(pts) == 1000
        assert pts[5] == (T0 + 5 * S, 0.0) and pts[14] == (T0 + 14 * S, 9.0)
    finally:
        again.close()


def test_chunks_and_memtable_persist_and_merge(tmp_path: Path) -> None:
    store = EmbeddedStorage(tmp_path / "s")
    store.write_readings(batch(5000))
    store.flush()
    store.write_readings(batch(100, t0=T0 + 4950 * S))  # half overlap with compacted data
    store.close()
    again = EmbeddedStorage(tmp_path / "s")
    try:
        assert again.count() == 5050
        pts = temp(again, start_ns=T0 + 4940 * S)
        assert [t for t, _ in pts] == [T0 + (4940 + i) * S for i in range(110)]
        assert pts[10] == (T0 + 4950 * S, 0.0)
        wal = again._db.execute("SELECT COUNT(*) FROM wal").fetchone()[0]
        assert wal == 0  # close() compacted
    finally:
        again.close()


def test_type_conflict_is_refused_without_side_effects(tmp_path: Path) -> None:
    store = EmbeddedStorage(tmp_path / "s")
    try:
        store.write_points([Point("m", {"a": "1"}, {"f": 1.5}, T0)])
        store.write_points([Point("m", {"a": "1"}, {"f": 2}, T0 + S)])  # int into float: ok
        with pytest.raises(TypeError, match="conflict"):
            store.write_points(
                [Point("m", {"a": "2"}, {"g": 1.0}, T0), Point("m", {"a": "1"}, {"f": "x"}, T0)]
            )
        assert store.field_keys("m") == {"f": "float"}
        assert store.tag_values("m", "a") == ["1"]
        assert store.query(SeriesQuery("m", ["f"]))[0].points == [(T0, 1.5), (T0 + S, 2.0)]
    finally:
        store.close()


def test_one_writer_and_concurrent_readers(tmp_path: Path) -> None:
    store = EmbeddedStorage(
        tmp_path / "s", EmbeddedSettings(memtable_max_points=2000, compact_interval_s=0.05)
    )
    errors: list[BaseException] = []
    done = threading.Event()

    def reader() -> None:
        try:
            while not done.is_set():
                pts = temp(store)
                times = [t for t, _ in pts]
                assert times == sorted(set(times))  # never a duplicate, never out of order
                assert len(pts) == 0 or times[0] == T0
                store.query(
                    SeriesQuery(
                        TELEMETRY, ["temp"], {"device": "d1"}, T0, T0 + 3600 * S, 60 * S, "mean"
                    )
                )
                store.latest(TELEMETRY, {"device": "d1"})
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for i in range(40):
            store.write_readings(batch(500, t0=T0 + i * 400 * S))  # overlapping rewrites
    finally:
        done.set()
        for t in threads:
            t.join()
    try:
        assert not errors, errors[0]
        assert store.compactions > 0
        assert store.count() == 39 * 400 + 500
        assert set(store.stats()) == {"memtable_points", "compactions"}
    finally:
        store.close()


def test_retention_drops_old_chunks(tmp_path: Path) -> None:
    store = EmbeddedStorage(
        tmp_path / "s", EmbeddedSettings(retention_s=10 * 86400, downsample_after_s=0)
    )
    try:
        store.write_readings(batch(3, t0=T0) + batch(3, t0=T0 + 20 * DAY))
        store.flush()
        assert store.maintain(now_ns=T0 + 25 * DAY)["dropped"] == 1
        assert [t for t, _ in temp(store)] == [T0 + 20 * DAY + i * S for i in range(3)]
    finally:
        store.close()


def test_downsampling_keeps_bucket_aggregates(tmp_path: Path) -> None:
    settings = EmbeddedSettings(retention_s=0, downsample_after_s=7 * 86400, downsample_every_s=60)
    store = EmbeddedStorage(tmp_path / "s", settings)
    try:
        old = [Reading("d1", "plant1", "temp", T0 + i * 10 * S, float(i % 7)) for i in range(720)]
        store.write_readings(old)
        store.write_points([Point("anomalies", {"device": "d1"}, {"explanation": "kept"}, T0)])
        store.flush()
        before = {
            agg: temp(store, start_ns=T0, end_ns=T0 + 2 * 3600 * S, every_ns=300 * S, agg=agg)
            for agg in ("mean", "min", "max", "sum", "count")
        }
        result = store.maintain(now_ns=T0 + 30 * DAY)
        assert result["rolled_up"] == 2  # two hourly chunks of temp; strings stay raw
        for agg, expected in before.items():
            got = temp(store, start_ns=T0, end_ns=T0 + 2 * 3600 * S, every_ns=300 * S, agg=agg)
            assert [t for t, _ in got] == [t for t, _ in expected], agg
            assert [v for _, v in got] == pytest.approx([v for _, v in expected]), agg
        raw = temp(store, start_ns=T0, end_ns=T0 + 600 * S)
        assert len(raw) == 10  # one mean per minute
        # a late point into a rolled-up window is folded into its bucket
        store.write_readings([Reading("d1", "plant1", "temp", T0 + 5 * S, 100.0)])
        store.flush()
        cnt = temp(store, start_ns=T0, end_ns=T0 + 60 * S, every_ns=60 * S, agg="count")
        assert cnt == [(T0, 7)]
        assert store.query(SeriesQuery("anomalies", ["explanation"]))[0].points == [(T0, "kept")]
    finally:
        store.close()


def test_summaries_answer_long_ranges(tmp_path: Path) -> None:
    """A day in hourly buckets from 1-hour chunks reads no point blobs at all."""
    store = EmbeddedStorage(tmp_path / "s")
    try:
        store.write_readings(batch(8640, step=10 * S))
        store.flush()
        daily = temp(store, start_ns=T0, end_ns=T0 + DAY, every_ns=DAY, agg="count")
        assert daily == [(T0, 8640)]
        hourly = temp(store, start_ns=T0, end_ns=T0 + DAY, every_ns=3600 * S, agg="sum")
        assert hourly[1] == (T0 + 3600 * S, float(sum(range(360, 720))))
    finally:
        store.close()


def test_two_processes_share_one_store(tmp_path: Path) -> None:
    """Cloud workers on one data_dir: each sees the other's writes before and after
    compaction, series ids never collide, and a crashed worker's writes are taken over."""
    a = EmbeddedStorage(tmp_path / "s", start=False)
    b = EmbeddedStorage(tmp_path / "s", start=False)
    try:
        a.write_readings(batch(100, device="d1"))
        b.write_readings(batch(100, device="d2") + batch(10, device="d1", t0=T0 + 200 * S))
        b.write_points([Point("anomalies", {"device": "d2"}, {"why": "hot"}, T0)])
        for store in (a, b):  # uncompacted, seen from both sides
            assert store.tag_values(TELEMETRY, "device") == ["d1", "d2"]
            assert store.count() == 211
            assert store.latest("anomalies", {"device": "d2"}) == {"why": (T0, "hot")}
        a.compact()
        b.write_readings(batch(5, device="d1", t0=T0 + 300 * S))
        assert a.count() == 216 and b.count() == 216
        b.compact()
        assert a.count() == 216
        assert len(temp(a)) == 115
        # b dies without compacting its last write
        b.write_readings(batch(7, device="d3"))
        b._db.close()
        os.close(b._lock_fd)
        assert a.count() == 223  # still visible: committed in the shared wal
        a._adopt_dead_writers()
        a.compact()
        assert a._db.execute("SELECT COUNT(*) FROM wal").fetchone()[0] == 0
        assert a.count() == 223
        sids = [row[0] for row in a._db.execute("SELECT id FROM series")]
        assert len(sids) == len(set(sids)) == 4
    finally:
        a.close()


def test_two_writers_compacting_concurrently_lose_nothing(tmp_path: Path) -> None:
    settings = EmbeddedSettings(memtable_max_points=1000, compact_interval_s=0.02)
    a = EmbeddedStorage(tmp_path / "s", settings)
    b = EmbeddedStorage(tmp_path / "s", settings)

    def write(store: EmbeddedStorage, device: str) -> None:
        for i in range(30):  # both write the shared device too, overlapping in time
            store.write_readings(batch(300, device=device, t0=T0 + i * 200 * S))
            store.write_readings(batch(50, device="shared", t0=T0 + i * 50 * S))

    threads = [threading.Thread(target=write, args=(a, "da")),
               threading.Thread(target=write, args=(b, "db"))]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        expected = 2 * (29 * 200 + 300) + 30 * 50
        assert a.count() == expected and b.count() == expected
        b.close()
        a.flush()
        assert a.count() == expected
        assert a.compactions > 0
    finally:
        a.close()


def test_memtable_keeps_write_order_across_its_bulk_index(tmp_path: Path) -> None:
    store = EmbeddedStorage(tmp_path / "s", start=False)
    try:
        store.write_readings(batch(10))
        with store._mlock:
            store._active.index()  # first batch sorted by series, second still pending
        store.write_readings([Reading("d1", "plant1", "temp", T0 + 5 * S, 99.0)])
        assert temp(store)[5] == (T0 + 5 * S, 99.0)
        assert store.latest(TELEMETRY, {"device": "d1"}) == {"temp": (T0 + 9 * S, 9.0)}
        with store._mlock:
            store._active.index()
        store.write_readings([Reading("d1", "plant1", "temp", T0 + 5 * S, 7.0)])
        assert temp(store)[5] == (T0 + 5 * S, 7.0)
        store.flush()
        assert temp(store)[5] == (T0 + 5 * S, 7.0) and len(temp(store)) == 10
    finally:
        store.close()
