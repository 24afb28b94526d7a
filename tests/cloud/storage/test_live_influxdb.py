"""Opt-in: the InfluxDB backend against a real 2.x or 3.x server.

Set ``MILLSTREAM_TEST_INFLUXDB_URL`` and ``..._TOKEN``, ``..._ORG``, ``..._BUCKET`` (and
``..._DBRP=1`` on 2.x to let the backend create the database mapping InfluxQL needs;
3.x needs none). Each run writes to a measurement of its own.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest

from millstream_cloud.settings import InfluxDBSettings
from millstream_cloud.storage.base import Point, SeriesQuery
from millstream_cloud.storage.influxdb import InfluxDBStorage

URL = os.environ.get("MILLSTREAM_TEST_INFLUXDB_URL")

pytestmark = [
    pytest.mark.live,
    pytest.mark.skipif(not URL, reason="MILLSTREAM_TEST_INFLUXDB_URL not set"),
]

S = 1_000_000_000


@pytest.fixture
def store(tmp_path: Path) -> InfluxDBStorage:
    bucket = os.environ.get("MILLSTREAM_TEST_INFLUXDB_BUCKET", "millstream")
    settings = InfluxDBSettings(
        url=URL or "",
        api="v2",
        token=os.environ.get("MILLSTREAM_TEST_INFLUXDB_TOKEN"),
        org=os.environ.get("MILLSTREAM_TEST_INFLUXDB_ORG", "-"),
        bucket=bucket,
        database=bucket,
        create_dbrp=os.environ.get("MILLSTREAM_TEST_INFLUXDB_DBRP", "") == "1",
        spool_dir=str(tmp_path / "spool"),
    )
    return InfluxDBStorage(settings)


def test_write_then_read_back_live(store: InfluxDBStorage) -> None:
    measurement = f"millstream_test_{uuid.uuid4().hex[:8]}"
    t0 = (time.time_ns() // (60 * S) - 10) * 60 * S
    try:
        assert store.ping()
        points = [
            Point(measurement, {"device": "d1", "site": "s 1"},
                  {"temp": float(i), "n": i, "ok": i % 2 == 0, "why": f'say "{i}"'}, t0 + i * 10 * S)
            for i in range(30)
        ]  # fmt: skip
        store.write_points(points)
        store.write_points(points[:5])  # idempotent rewrite
        assert store.spooled_points == 0, "the live server refused or could not take the write"
        deadline = time.monotonic() + 20
        out: list = []
        while time.monotonic() < deadline and not out:  # 3.x makes writes queryable shortly after
            out = store.query(SeriesQuery(measurement, ["temp"], {"device": "d1"}))
            time.sleep(0.5)
        assert out and out[0].points == [(t0 + i * 10 * S, float(i)) for i in range(30)]
        agg = store.query(SeriesQuery(measurement, ["temp"], {"device": "d1"}, t0, t0 + 300 * S,
                                      60 * S, "count"))  # fmt: skip
        assert [v for _, v in agg[0].points] == [6, 6, 6, 6, 6]
        latest = store.latest(measurement, {"device": "d1"})
        assert latest["why"] == (t0 + 290 * S, 'say "29"')
        assert latest["n"] == (t0 + 290 * S, 29)
        assert store.tag_values(measurement, "site") == ["s 1"]
    finally:
        store.close()
