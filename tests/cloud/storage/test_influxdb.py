"""The InfluxDB backend against a real InfluxDB 1.x: outages, spool, refusals, escaping."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from millstream_cloud.model import Reading
from millstream_cloud.settings import load_settings
from millstream_cloud.storage import open_storage
from millstream_cloud.storage.base import TELEMETRY, Point, SeriesQuery, readings_to_points
from millstream_cloud.storage.influxdb import InfluxDBStorage, SpoolFull, line, reading_lines
from tests.cloud.storage.conftest import influx_settings
from tests.support.influxdb import InfluxDBServer, influxdb_available, influxdb_server

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not influxdb_available(), reason="influxd not installed"),
]

S = 1_000_000_000
T0 = 1_767_225_600 * S


def test_line_protocol_escaping() -> None:
    p = Point(
        "tele metry,x",
        {"device": "a b,c=d", "site": "s", "empty": ""},
        {"f k=1": 1.5, "n": 3, "ok": True, "txt": 'say "hi" \\ bye', "nan": float("nan")},
        T0,
    )
    assert line(p) == (
        "tele\\ metry\\,x,device=a\\ b\\,c\\=d,site=s "
        'f\\ k\\=1=1.5,n=3i,ok=true,txt="say \\"hi\\" \\\\ bye" ' + str(T0)
    )
    assert line(Point("m", {}, {"nan": float("inf")}, T0)) is None


def test_fast_reading_lines_equal_the_general_encoder() -> None:
    rs = [
        Reading("press 1", "plant,a", "temp=c", T0, 1.0),
        Reading("d2", "p", "rpm", T0 + 1, 3),  # an int value stays a float field
        Reading("d2", "p", "rpm", T0 + 2, float("nan")),
        Reading("d3", "p", "x", T0 + 3, -2.5e-7),
    ]
    kinds = {"press 1": "hydraulic press"}
    prefixes: dict = {}
    fast = reading_lines(rs, kinds, prefixes)
    slow = [line(p) for p in readings_to_points(rs, kinds)]
    slow[1] = slow[1].replace("rpm=3i", "rpm=3.0")  # type: ignore[union-attr]
    assert fast == [ln for ln in slow if ln is not None and "nan" not in ln]
    assert reading_lines(rs, kinds, prefixes) == fast  # cached prefixes give the same lines


def test_open_storage_builds_the_backend(influxdb: InfluxDBServer, tmp_path: Path) -> None:
    settings = load_settings(
        overrides={
            "data_dir": str(tmp_path),
            "storage": {"backend": "influxdb", "influxdb": {"url": influxdb.url, "api": "v1"}},
        }
    )
    store = open_storage(settings)
    try:
        assert isinstance(store, InfluxDBStorage)
        assert (
            store.spool.db.execute("PRAGMA database_list")
            .fetchone()[2]
            .startswith(str(tmp_path / "influx-spool"))
        )
        store.write_readings([Reading("d1", "p", "temp", T0, 1.0)])
        assert store.latest(TELEMETRY, {"device": "d1"}) == {"temp": (T0, 1.0)}
    finally:
        store.close()


def test_writes_while_influxdb_is_down_are_spooled_then_drained(tmp_path: Path) -> None:
    server = influxdb_server(tmp_path / "influx")
    store = InfluxDBStorage(influx_settings(server, tmp_path))
    try:
        assert store.ping() is False
        store.write_readings([Reading("d1", "p", "temp", T0 + i * S, float(i)) for i in range(100)])
        assert store.spooled_points == 100  # safe on disk, nothing lost, call returned
        store.write_readings([Reading("d1", "p", "temp", T0 + 5 * S, -5.0)])  # queued behind
        server.start()
        assert store.wait_drained(30)
        pts = store.query(SeriesQuery(TELEMETRY, ["temp"], {"device": "d1"}))[0].points
        assert len(pts) == 100
        assert pts[5] == (T0 + 5 * S, -5.0)  # drained in order: the later write won
    finally:
        store.close()
        server.stop()


def test_spool_survives_a_restart_of_the_service(tmp_path: Path) -> None:
    server = influxdb_server(tmp_path / "influx")
    settings = influx_settings(server, tmp_path)
    store = InfluxDBStorage(settings)
    store.write_readings([Reading("d1", "p", "temp", T0 + i * S, float(i)) for i in range(10)])
    store.close()  # the service stops with InfluxDB still down
    server.start()
    again = InfluxDBStorage(settings)
    try:
        assert again.wait_drained(30)
        assert again.query(SeriesQuery(TELEMETRY, ["temp"], {}, agg="count"))[0].points[0][1] == 10
    finally:
        again.close()
        server.stop()


def test_refused_batches_are_counted_not_retried(influxdb: InfluxDBServer, tmp_path: Path) -> None:
    store = InfluxDBStorage(influx_settings(influxdb, tmp_path))
    try:
        store.write_points([Point("m", {"d": "1"}, {"f": 1.5}, T0)])
        store.write_points([Point("m", {"d": "1"}, {"f": "text"}, T0 + S)])  # type conflict
        assert store.rejected_points == 1
        assert store.spooled_points == 0
        assert store.stats()["rejected_points"] == 1 and store.stats()["written_points"] == 1
        store.write_points([Point("m", {"d": "1"}, {"f": 2.5}, T0 + 2 * S)])
        assert store.query(SeriesQuery("m", ["f"]))[0].points == [(T0, 1.5), (T0 + 2 * S, 2.5)]
        assert store.spool.db.execute("SELECT COUNT(*) FROM rejected").fetchone()[0] == 1
    finally:
        store.close()


def test_a_full_spool_refuses_writes(tmp_path: Path) -> None:
    server = influxdb_server(tmp_path / "influx")  # never started
    store = InfluxDBStorage(influx_settings(server, tmp_path, spool_max_bytes=1024 * 1024))
    try:
        big = [Reading("d1", "p", "temp", T0 + i, float(i)) for i in range(10_000)]
        store.write_readings(big)
        with pytest.raises(SpoolFull):
            store.write_readings(big)
    finally:
        store.close()


@pytest.mark.slow
def test_influxdb_down_for_30s_mid_stream_loses_nothing(tmp_path: Path) -> None:
    """The issue's scenario: a steady stream, InfluxDB stopped for 30 s, then back."""
    server = influxdb_server(tmp_path / "influx").start()
    store = InfluxDBStorage(influx_settings(server, tmp_path))
    written: list[int] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def stream() -> None:
        i = 0
        try:
            while not stop.is_set():
                t = T0 + i * S
                batch = [Reading(f"d{d}", "p", "temp", t, float(i)) for d in range(20)]
                # every batch also rewrites one fixed point: only in-order delivery ends with
                # the value of the last batch
                batch.append(Reading("marker", "p", "seq", T0, float(i)))
                store.write_readings(batch)
                written.append(i)
                i += 1
                time.sleep(0.05)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    writer = threading.Thread(target=stream)
    writer.start()
    try:
        time.sleep(2)
        server.stop()
        during_start = len(written)
        time.sleep(30)
        spooled = store.spooled_points
        server.start()
        time.sleep(2)
        stop.set()
        writer.join()
        assert not errors, errors[0]
        assert len(written) - during_start > 100  # writes kept returning during the outage
        assert spooled > 0
        assert store.wait_drained(60)
        n = len(written)
        counts = store.query(SeriesQuery(TELEMETRY, ["temp"], {"site": "p"}, agg="count",
                                         group_by=["device"]))  # fmt: skip
        assert len(counts) == 20
        assert all(c.points[0][1] == n for c in counts)
        pts = store.query(SeriesQuery(TELEMETRY, ["temp"], {"device": "d7"}))[0].points
        assert pts == [(T0 + i * S, float(i)) for i in range(n)]
        assert store.latest(TELEMETRY, {"device": "marker"}) == {"seq": (T0, float(n - 1))}
    finally:
        stop.set()
        writer.join()
        store.close()
        server.stop()


def test_api_v2_against_an_old_1x_says_what_to_do(
    influxdb: InfluxDBServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = InfluxDBStorage(influx_settings(influxdb, tmp_path, api="v2"))
    try:
        assert "api: v1" in caplog.text
        store.write_readings([Reading("d1", "p", "temp", T0, 1.0)])
        assert store.spooled_points == 1  # 1.6 answers 404 on /api/v2/write: kept, not lost
    finally:
        store.close()
