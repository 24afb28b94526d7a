"""The InfluxQL subset beyond the dashboards, compared statement by statement with InfluxDB 1.x.

Each query runs on real InfluxDB 1.x and on Millstream's /query over the embedded store
(with and without pushdown); answers must match, including bucket alignment, the
bounds of the time range, fill modes, column names and error messages.
"""

from __future__ import annotations

import json
import urllib.parse
import urllib.request

import pytest
from fastapi.testclient import TestClient

from tests.grafana.conftest import Influx
from tests.grafana.data import FROM_MS, T0_NS, TO_MS
from tests.grafana.test_dashboard_queries import assert_same

TF = f"time >= {FROM_MS}ms AND time <= {TO_MS}ms"
T0S = T0_NS // 10**9
NARROW = f"time > {T0S + 2390}s AND time < {T0S + 2460}s"  # around press-02's drop-out

QUERIES = [
    # aggregates, aliases, several per statement, wildcard
    f'SELECT mean("temperature"), max("temperature") AS "hi", min(temperature) FROM telemetry WHERE {TF}',
    f"SELECT count(temperature), sum(pressure), first(vibration), last(vibration) FROM telemetry WHERE {TF}",
    f"SELECT mean(*) FROM telemetry WHERE {TF} AND device = 'lathe-01'",
    f"SELECT max(*) FROM telemetry WHERE {TF} GROUP BY site",
    f"SELECT last(temperature) FROM telemetry WHERE {TF} GROUP BY device",
    f"SELECT first(temperature) FROM telemetry WHERE {TF} GROUP BY *",
    f"SELECT max(score) FROM anomalies WHERE {TF}",
    f"SELECT mean(temperature), mean(pressure) FROM telemetry WHERE {TF} GROUP BY time(7m)",
    # GROUP BY time: alignment, fill modes, offsets, tags, order, limits
    f"SELECT mean(temperature) FROM telemetry WHERE device = 'press-02' AND {NARROW} GROUP BY time(10s)",
    f"SELECT mean(temperature) FROM telemetry WHERE device = 'press-02' AND {NARROW} GROUP BY time(10s) fill(none)",
    f"SELECT mean(temperature) FROM telemetry WHERE device = 'press-02' AND {TF} GROUP BY time(5m) fill(previous)",
    f"SELECT mean(temperature) FROM telemetry WHERE device = 'press-02' AND {TF} GROUP BY time(5m) fill(linear)",
    f"SELECT mean(temperature) FROM telemetry WHERE device = 'press-02' AND {TF} GROUP BY time(5m) fill(-1)",
    f"SELECT count(temperature) FROM telemetry WHERE device = 'press-02' AND {TF} GROUP BY time(5m)",
    f"SELECT count(temperature) FROM telemetry WHERE device = 'press-02' AND {TF} GROUP BY time(5m) fill(none)",
    f"SELECT mean(temperature) FROM telemetry WHERE {TF} GROUP BY time(13m, 2m), site",
    f"SELECT max(temperature) FROM telemetry WHERE {TF} GROUP BY time(10m), * ORDER BY time DESC LIMIT 3",
    f"SELECT sum(readings) FROM ingest WHERE {TF} GROUP BY time(30m), instance LIMIT 2 OFFSET 1",
    f"SELECT mean(temperature) FROM telemetry WHERE {TF} GROUP BY time(30m), device SLIMIT 2",
    f"SELECT count(*) FROM telemetry WHERE {TF} GROUP BY time(20m)",
    # WHERE: regex, !=, !~, OR, parentheses, fields, strings, RFC 3339, now()
    f"SELECT mean(temperature) FROM telemetry WHERE device =~ /^press/ AND {TF} GROUP BY time(15m), device",
    f"SELECT mean(temperature) FROM telemetry WHERE device !~ /01$/ AND {TF} GROUP BY time(15m)",
    f"SELECT mean(temperature) FROM telemetry WHERE (device = 'press-01' OR site = 'plant-b') AND {TF} GROUP BY time(15m)",
    f"SELECT mean(temperature) FROM telemetry WHERE site != 'plant-a' AND {TF} GROUP BY time(15m)",
    f"SELECT score, likelihood FROM anomalies WHERE score > 4 AND {TF}",
    f"SELECT score, metric FROM anomalies WHERE metric = '' AND {TF}",
    f"SELECT count(score) FROM anomalies WHERE likelihood >= 0.95 AND detector = 'zscore' AND {TF} GROUP BY time(30m)",
    "SELECT temperature FROM telemetry WHERE device = 'lathe-01' AND time >= '2024-03-01T00:10:00Z' AND time < '2024-03-01T00:12:00Z'",
    "SELECT temperature FROM telemetry WHERE device = 'lathe-01' AND time > '2024-03-01T00:10:00Z' AND time <= '2024-03-01 00:12:00'",
    "SELECT temperature FROM telemetry WHERE time > now() - 1h",
    f"SELECT temperature FROM telemetry WHERE device = 'press-01' AND time >= {T0_NS} AND time < {T0_NS + 60 * 10**9}",
    # time ranges open on one side, empty groups, fills on integers
    f"SELECT mean(temperature) FROM telemetry WHERE time <= {TO_MS}ms GROUP BY time(30m)",
    f"SELECT count(temperature) FROM telemetry WHERE time >= {FROM_MS}ms GROUP BY device",
    f"SELECT last(temperature) FROM telemetry WHERE device = 'press-02' AND {TF} GROUP BY time(10m) fill(previous)",
    f"SELECT max(online) FROM devices WHERE device = 'press-02' AND {TF} GROUP BY time(5m) fill(linear)",
    f"SELECT max(online), min(offline) FROM devices WHERE {TF} GROUP BY time(5m), device fill(none)",
    f"SELECT mean(temperature) FROM telemetry WHERE device = 'press-02' AND time >= {T0S + 2500}s AND time < {T0S + 3500}s GROUP BY time(5m)",
    f"SELECT temperature FROM telemetry WHERE device = 'press-02' AND time >= {T0S + 2500}s AND time < {T0S + 3500}s",
    f"SELECT sum(readings), mean(rate) FROM ingest WHERE {TF} GROUP BY time(25m) fill(none) ORDER BY time DESC",
    # Grafana's multi-value variables: pushed down per value and merged, or evaluated here
    f"SELECT mean(temperature) FROM telemetry WHERE site =~ /^(plant-a|plant-b)$/ AND {TF} GROUP BY time(15m)",
    f"SELECT min(temperature), max(temperature), count(temperature), sum(temperature) FROM telemetry WHERE device =~ /^(press-01|lathe-01)$/ AND {TF} GROUP BY time(15m)",
    f"SELECT mean(temperature) FROM telemetry WHERE device =~ /^(press\\-01|lathe\\-01)$/ AND site =~ /^plant\\-a$/ AND {TF} GROUP BY time(15m), device",
    f"SELECT sum(online) FROM devices WHERE device =~ /^(press-01|press-02)$/ AND {TF} GROUP BY time(30s) fill(none) LIMIT 5",
    # what Grafana's visual query editor writes: type casts, quoted everything
    f'SELECT mean("temperature"::field) FROM "telemetry" WHERE ("device"::tag = \'press-01\') AND {TF} GROUP BY time(10m) fill(null)',
    f'SELECT "score"::field, "metric"::tag FROM "anomalies" WHERE ("site"::tag =~ /^plant\\-a$/) AND "score"::field > 4 AND {TF}',
    # raw selects: tags as columns, wildcard, order, limits, quoted and qualified names
    f"SELECT * FROM anomalies WHERE {TF} ORDER BY time DESC LIMIT 5",
    f"SELECT * FROM alerts WHERE {TF} GROUP BY alertname",
    f'SELECT "explanation", "device" FROM "millstream"."autogen"."anomalies" WHERE {TF}',
    f"SELECT explanation FROM millstream..anomalies WHERE {TF} LIMIT 3",
    f"SELECT temperature, pressure FROM telemetry WHERE {NARROW} AND site = 'plant-a'",
    f"SELECT temperature FROM telemetry WHERE {NARROW} GROUP BY device, site",
    # meta queries
    "SHOW MEASUREMENTS",
    "SHOW MEASUREMENTS WITH MEASUREMENT =~ /^a/ LIMIT 1",
    "SHOW TAG KEYS",
    "SHOW TAG KEYS FROM anomalies",
    "SHOW FIELD KEYS",
    'SHOW FIELD KEYS FROM "ingest"',
    'SHOW TAG VALUES WITH KEY = "site"',
    'SHOW TAG VALUES FROM telemetry WITH KEY IN ("device", "kind")',
    "SHOW TAG VALUES FROM telemetry WITH KEY = device WHERE site =~ /b$/ OR kind = 'press'",
    "SHOW TAG VALUES FROM anomalies WITH KEY =~ /^(metric|detector)$/ WHERE device != 'press-01'",
    "SHOW TAG VALUES FROM telemetry WITH KEY = \"device\" WHERE site = 'plant-a' AND device !~ /01/",
    "SHOW DATABASES",
    "SHOW RETENTION POLICIES ON millstream",
    "SHOW RETENTION POLICIES",
    # several statements, empty answers, statement errors
    f"SELECT mean(temperature) FROM telemetry WHERE {TF}; SHOW MEASUREMENTS; SELECT x FROM nothing",
    f"SELECT mean(temperature) FROM telemetry WHERE {TF} AND device = 'nobody'",
    f"SELECT mean(temperature) FROM telemetry WHERE {TF}; SELECT mean(temperature), temperature FROM telemetry",
    f"SELECT temperature FROM telemetry WHERE {TF} GROUP BY time(1m)",
    "SELECT mean(temperature) FROM autogen.nothing; SELECT foo(temperature) FROM telemetry",
]


@pytest.mark.integration
@pytest.mark.parametrize("epoch", ["ms", None])
@pytest.mark.parametrize("query", QUERIES)
def test_same_answer_as_influxdb(
    influx: Influx, millstream: TestClient, query: str, epoch: str | None
) -> None:
    status, expected = influx.query(query, epoch=epoch)
    resp = millstream.post(
        "/query", data={"db": "millstream", "q": query, **({"epoch": epoch} if epoch else {})}
    )
    assert resp.status_code == status, resp.text
    assert_same(expected, resp.json())


@pytest.mark.integration
@pytest.mark.parametrize("epoch", ["ns", "u", "ms", "s", "m", "h"])
def test_epochs(influx: Influx, millstream: TestClient, epoch: str) -> None:
    q = f"SELECT last(temperature) FROM telemetry WHERE {TF} GROUP BY device"
    _, expected = influx.query(q, epoch=epoch)
    resp = millstream.get("/query", params={"db": "millstream", "q": q, "epoch": epoch})
    assert_same(expected, resp.json())


@pytest.mark.integration
@pytest.mark.parametrize(
    ("db", "query"),
    [
        ("other", "SELECT mean(temperature) FROM telemetry"),
        (None, "SELECT mean(temperature) FROM telemetry"),
        (None, "SHOW MEASUREMENTS"),
        ("millstream", "SELECT mean(temperature) FROM other.autogen.telemetry"),
        ("millstream", "SELECT mean(temperature) FROM millstream.weekly.telemetry"),
    ],
)
def test_database_errors(
    influx: Influx, millstream: TestClient, db: str | None, query: str
) -> None:
    status, expected = influx.query(query, db=db)
    resp = millstream.get("/query", params={"q": query, **({"db": db} if db else {})})
    assert resp.status_code == status
    assert_same(expected, resp.json())


@pytest.mark.integration
@pytest.mark.parametrize("rp", ["autogen", "weekly"])
def test_retention_policy_parameter(influx: Influx, millstream: TestClient, rp: str) -> None:
    params = {"db": "millstream", "q": f"SELECT count(score) FROM anomalies WHERE {TF}", "rp": rp}
    with urllib.request.urlopen(f"{influx.url}/query?{urllib.parse.urlencode(params)}") as resp:
        expected = json.loads(resp.read())
    assert_same(expected, millstream.get("/query", params=params).json())
