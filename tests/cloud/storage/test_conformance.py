"""One set of assertions, every backend: what the API and Grafana rely on."""

from __future__ import annotations

import statistics

import pytest

from millstream_cloud.model import Reading
from millstream_cloud.storage.base import ANOMALIES, TELEMETRY, Point, SeriesQuery
from tests.cloud.storage.conftest import Backend

S = 1_000_000_000
T0 = 1_767_225_600 * S  # 2026-01-01T00:00:00Z, on an hour boundary


def readings(
    device: str, metric: str, n: int, step_s: int = 10, base: float = 0.0
) -> list[Reading]:
    return [
        Reading(device, "plant1", metric, T0 + i * step_s * S, base + float(i)) for i in range(n)
    ]


def q(**kw: object) -> SeriesQuery:
    kw.setdefault("measurement", TELEMETRY)
    return SeriesQuery(**kw)  # type: ignore[arg-type]


def test_write_and_read_a_range(backend: Backend) -> None:
    s = backend.store
    s.write_readings(readings("press-1", "temp", 30), {"press-1": "press"})
    s.write_readings(readings("press-1", "rpm", 30, base=1000.0), {"press-1": "press"})
    backend.settle()
    out = s.query(q(fields=["temp"], tags={"device": "press-1"}))
    assert len(out) == 1
    assert out[0].field == "temp"
    assert out[0].points == [(T0 + i * 10 * S, float(i)) for i in range(30)]
    both = s.query(q(fields=["temp", "rpm"], tags={"device": "press-1", "kind": "press"}))
    assert sorted(x.field for x in both) == ["rpm", "temp"]
    rpm = next(x for x in both if x.field == "rpm")
    assert rpm.points[0] == (T0, 1000.0)


def test_rewrite_is_idempotent_and_last_write_wins(backend: Backend) -> None:
    s = backend.store
    batch = readings("d1", "temp", 50)
    s.write_readings(batch)
    backend.settle()
    s.write_readings(batch)  # the redelivered message
    s.write_readings(batch[10:20])
    backend.settle()
    changed = [Reading(r.device, r.site, r.metric, r.time_ns, -r.value) for r in batch[40:]]
    s.write_readings(changed)
    backend.settle()
    pts = s.query(q(fields=["temp"], tags={"device": "d1"}))[0].points
    assert len(pts) == 50
    assert [t for t, _ in pts] == [T0 + i * 10 * S for i in range(50)]
    assert pts[39][1] == 39.0 and pts[40][1] == -40.0 and pts[49][1] == -49.0
    count = s.query(q(fields=["temp"], tags={"device": "d1"}, agg="count"))[0].points
    assert count[0][1] == 50


def test_range_start_inclusive_end_exclusive(backend: Backend) -> None:
    s = backend.store
    s.write_readings(readings("d1", "temp", 100))
    backend.settle()
    pts = s.query(
        q(fields=["temp"], tags={"device": "d1"}, start_ns=T0 + 100 * S, end_ns=T0 + 200 * S)
    )[0].points
    assert [v for _, v in pts] == [float(i) for i in range(10, 20)]
    assert s.query(q(fields=["temp"], tags={"device": "d1"}, start_ns=T0 + 5000 * S)) == []
    assert s.query(q(fields=["nope"], tags={"device": "d1"})) == []


@pytest.mark.parametrize("agg", ["mean", "min", "max", "sum", "count", "first", "last"])
def test_buckets_with_an_aggregate(backend: Backend, agg: str) -> None:
    s = backend.store
    # 10 s steps, 3 hours: spans several chunks; values not monotonic so min/max matter
    data = [
        Reading("d1", "plant1", "temp", T0 + i * 10 * S, float((i * 37) % 101)) for i in range(1080)
    ]
    s.write_readings(data[:700])
    backend.settle()
    s.write_readings(data[700:])
    start, end = T0 + 1800 * S, T0 + 9000 * S + 5 * S  # not bucket-aligned at the end
    out = s.query(
        q(
            fields=["temp"],
            tags={"device": "d1"},
            start_ns=start,
            end_ns=end,
            every_ns=60 * S,
            agg=agg,
        )
    )
    buckets: dict[int, list[float]] = {}
    for r in data:
        if start <= r.time_ns < end:
            buckets.setdefault(r.time_ns - r.time_ns % (60 * S), []).append(r.value)
    fn = {
        "mean": statistics.fmean,
        "min": min,
        "max": max,
        "sum": sum,
        "count": len,
        "first": lambda v: v[0],
        "last": lambda v: v[-1],
    }[agg]
    expected = [(b, fn(v)) for b, v in sorted(buckets.items())]
    assert len(out) == 1
    got = out[0].points
    assert [t for t, _ in got] == [t for t, _ in expected]
    for (_, g), (_, e) in zip(got, expected, strict=True):
        assert g == pytest.approx(e)
    # and an hourly rollup over the whole range, where chunk summaries can be used
    hourly = s.query(q(fields=["temp"], tags={"device": "d1"}, start_ns=T0, end_ns=T0 + 3 * 3600 * S,
                       every_ns=3600 * S, agg=agg))[0].points  # fmt: skip
    hb: dict[int, list[float]] = {}
    for r in data:
        hb.setdefault(r.time_ns - r.time_ns % (3600 * S), []).append(r.value)
    assert [t for t, _ in hourly] == sorted(hb)
    for (_, g), (_, v) in zip(hourly, sorted(hb.items()), strict=True):
        assert g == pytest.approx(fn(v))


def test_aggregate_without_buckets(backend: Backend) -> None:
    s = backend.store
    s.write_readings(readings("d1", "temp", 60))
    backend.settle()
    start, end = T0, T0 + 600 * S
    mean = s.query(
        q(fields=["temp"], tags={"device": "d1"}, start_ns=start, end_ns=end, agg="mean")
    )
    assert mean[0].points == [(start, pytest.approx(statistics.fmean(range(60))))]
    last = s.query(
        q(fields=["temp"], tags={"device": "d1"}, start_ns=start, end_ns=end, agg="last")
    )
    assert last[0].points == [(T0 + 590 * S, 59.0)]


def test_limit(backend: Backend) -> None:
    s = backend.store
    s.write_readings(readings("d1", "temp", 100))
    backend.settle()
    raw = s.query(q(fields=["temp"], tags={"device": "d1"}, limit=7))[0].points
    assert [v for _, v in raw] == [float(i) for i in range(7)]
    agg = s.query(q(fields=["temp"], tags={"device": "d1"}, start_ns=T0, end_ns=T0 + 1000 * S,
                    every_ns=60 * S, agg="count", limit=3))[0].points  # fmt: skip
    assert agg == [(T0, 6), (T0 + 60 * S, 6), (T0 + 120 * S, 6)]


def test_latest(backend: Backend) -> None:
    s = backend.store
    s.write_readings(readings("d1", "temp", 20) + readings("d1", "rpm", 5, base=100.0))
    backend.settle()
    s.write_readings(readings("d2", "temp", 40))
    s.write_readings([Reading("d1", "plant1", "temp", T0 + 1000 * S, 7.5)])
    s.write_readings([Reading("d1", "plant1", "temp", T0 + 50 * S, 99.0)])  # late, older
    latest = s.latest(TELEMETRY, {"device": "d1"})
    assert latest == {"temp": (T0 + 1000 * S, 7.5), "rpm": (T0 + 40 * S, 104.0)}
    assert s.latest(TELEMETRY, {"device": "nobody"}) == {}


def test_metadata_types_and_tag_values(backend: Backend) -> None:
    s = backend.store
    s.write_readings(readings("d1", "temp", 3), {"d1": "press"})
    s.write_readings(readings("d2", "temp", 3) + readings("d2", "rpm", 3))
    s.write_points(
        [
            Point(
                ANOMALIES,
                {"site": "plant1", "device": "d1", "metric": "temp", "detector": "z"},
                {
                    "score": 4.5,
                    "likelihood": 0.99,
                    "explanation": 'temp "high", 4.5 sigma',
                    "n": 3,
                    "confirmed": True,
                },
                T0,
            ),
        ]
    )
    backend.settle()
    assert set(s.measurements()) >= {TELEMETRY, ANOMALIES}
    assert s.field_keys(TELEMETRY) == {"temp": "float", "rpm": "float"}
    assert s.field_keys(ANOMALIES) == {
        "score": "float",
        "likelihood": "float",
        "explanation": "string",
        "n": "integer",
        "confirmed": "boolean",
    }
    assert s.tag_keys(TELEMETRY) == ["device", "kind", "site"]
    assert s.tag_values(TELEMETRY, "device") == ["d1", "d2"]
    assert s.tag_values(TELEMETRY, "kind") == ["press"]
    assert s.tag_values(TELEMETRY, "device", {"kind": "press"}) == ["d1"]
    assert s.tag_values(TELEMETRY, "site", {"device": "d2"}) == ["plant1"]


def test_group_by_a_tag(backend: Backend) -> None:
    s = backend.store
    s.write_readings(readings("d1", "temp", 12) + readings("d2", "temp", 12, base=100.0))
    backend.settle()
    out = s.query(q(fields=["temp"], tags={"site": "plant1"}, start_ns=T0, end_ns=T0 + 120 * S,
                    every_ns=60 * S, agg="max", group_by=["device"]))  # fmt: skip
    assert [(x.field, x.tags) for x in out] == [
        ("temp", {"device": "d1"}),
        ("temp", {"device": "d2"}),
    ]
    assert out[0].points == [(T0, 5.0), (T0 + 60 * S, 11.0)]
    assert out[1].points == [(T0, 105.0), (T0 + 60 * S, 111.0)]
    merged = s.query(q(fields=["temp"], tags={"site": "plant1"}, start_ns=T0, end_ns=T0 + 120 * S,
                       every_ns=60 * S, agg="count"))  # fmt: skip
    assert merged[0].tags == {}
    assert merged[0].points == [(T0, 12), (T0 + 60 * S, 12)]


def test_string_integer_and_boolean_fields(backend: Backend) -> None:
    s = backend.store
    tags = {"site": "plant1", "device": "d1", "metric": "temp", "detector": "z"}
    texts = ["plain", 'with "quotes"', "back\\slash", "comma, space=equals", "ünï 🚀", "new\nline"]
    s.write_points(
        [
            Point(ANOMALIES, tags, {"explanation": text, "n": i, "ok": i % 2 == 0}, T0 + i * S)
            for i, text in enumerate(texts)
        ]
    )
    backend.settle()
    out = s.query(SeriesQuery(ANOMALIES, ["explanation"], {"device": "d1"}))
    assert out[0].points == [(T0 + i * S, t) for i, t in enumerate(texts)]
    ints = s.query(SeriesQuery(ANOMALIES, ["n"], {"device": "d1"}))[0].points
    assert ints == [(T0 + i * S, i) for i in range(len(texts))]
    assert all(type(v) is int for _, v in ints)
    bools = s.query(SeriesQuery(ANOMALIES, ["ok"], {"device": "d1"}))[0].points
    assert [v for _, v in bools] == [i % 2 == 0 for i in range(len(texts))]
    last = s.query(SeriesQuery(ANOMALIES, ["explanation"], {"device": "d1"}, agg="last"))
    assert last[0].points[0][1] == "new\nline"
    assert s.latest(ANOMALIES, {"device": "d1"})["explanation"] == (T0 + 5 * S, "new\nline")


def test_odd_tag_values_round_trip(backend: Backend) -> None:
    s = backend.store
    device = "line 2,press=A\\b"
    s.write_points([Point(TELEMETRY, {"site": "plant 1", "device": device}, {"temp c": 1.5}, T0)])
    backend.settle()
    assert s.tag_values(TELEMETRY, "device") == [device]
    out = s.query(q(fields=["temp c"], tags={"device": device}))
    assert out[0].points == [(T0, 1.5)]


def test_ping(backend: Backend) -> None:
    assert backend.store.ping() is True


def test_anomaly_verdicts_join_their_anomalies(backend: Backend) -> None:
    """The verdict is a point with the anomaly's tags and time: every backend joins the two,
    and judging again replaces the verdict rather than adding one."""
    from millstream_cloud.anomalies import anomaly_point, list_anomalies
    from millstream_cloud.feedback import (
        MissedFault,
        Verdict,
        list_missed,
        record_feedback,
        record_missed,
    )
    from millstream_cloud.model import Anomaly

    s = backend.store
    found = [
        Anomaly("d1", "plant1", T0 + 7, "ensemble", 0.9, 0.99, "temp", "temp high"),
        Anomaly("d1", "plant1", T0 + 7, "device_model", 5.0, 0.99, None, "d1 off its model"),
        Anomaly("d1", "plant1", T0 + S, "ensemble", 0.8, 0.99, "rpm", "rpm low"),
    ]
    s.write_points([anomaly_point(a) for a in found])
    backend.settle()
    record_feedback(s, Verdict("d1", T0 + 7, "false_alarm", detector="device_model", author="ana"))
    record_feedback(s, Verdict("d1", T0 + S, "confirmed"))
    backend.settle()
    record_feedback(s, Verdict("d1", T0 + S, "expected", comment="planned stop"))
    backend.settle()
    items = list_anomalies(s, "d1")
    got = {(a["metric"], a["detector"]): a["feedback"] for a in items}
    assert got == {
        ("rpm", "ensemble"): {"verdict": "expected", "comment": "planned stop", "author": None},
        (None, "device_model"): {"verdict": "false_alarm", "comment": None, "author": "ana"},
        ("temp", "ensemble"): None,
    }
    assert [a["metric"] for a in list_anomalies(s, "d1", verdict="unjudged")] == ["temp"]
    record_missed(s, MissedFault("d1", "plant1", T0 + 60 * S, T0 + 120 * S, "temp", "seal leak"))
    backend.settle()
    [missed] = list_missed(s, "d1")
    assert (missed["start"], missed["end"]) == ("2026-01-01T00:01:00Z", "2026-01-01T00:02:00Z")
    assert (missed["metric"], missed["comment"], missed["author"]) == ("temp", "seal leak", None)


def test_backtest_reads_a_device_history_in_time_order(backend: Backend) -> None:
    """The backtest's read: every numeric reading of the device in the span, in time order,
    counted first (an aggregate) so an over-large span is refused before it is loaded."""
    from millstream_cloud.detection.backtest import TooManyReadings, stored_readings

    s = backend.store
    s.write_readings(readings("d1", "temp", 20) + readings("d1", "rpm", 20, base=1000.0))
    s.write_readings(readings("d2", "temp", 20))
    s.write_points([Point(TELEMETRY, {"device": "d1", "site": "plant1"}, {"mode": "auto"}, T0)])
    backend.settle()
    got = stored_readings(s, "d1", "plant1", T0 + 10 * S, T0 + 100 * S, limit=100)
    assert [(r.time_ns, r.metric) for r in got] == [
        (T0 + i * 10 * S, m) for i in range(1, 10) for m in ("rpm", "temp")
    ]
    assert got[0].value == 1001.0 and got[1].value == 1.0
    with pytest.raises(TooManyReadings, match="more than max_readings 17"):
        stored_readings(s, "d1", "plant1", T0 + 10 * S, T0 + 100 * S, limit=17)
