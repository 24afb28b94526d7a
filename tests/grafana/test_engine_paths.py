"""Which statements the storage aggregates (pushdown) and which the engine evaluates.

The answers are the same either way (test_influxql_compat.py compares both with InfluxDB);
this pins down that the dashboards' heavy queries do not read every point.
"""

from __future__ import annotations

import pytest

from millstream_cloud.grafana.engine import QueryEngine
from millstream_cloud.storage.embedded import EmbeddedStorage
from tests.grafana.data import FROM_MS, TO_MS
from tests.grafana.support import dashboard_queries, substitute

TF = f"time >= {FROM_MS}ms AND time <= {TO_MS}ms"


def _path(store: EmbeddedStorage, query: str) -> str:
    engine = QueryEngine(store)
    used: list[str] = []
    raw, agg_raw = engine._raw, engine._aggregate_raw
    engine._raw = lambda plan: used.append("raw") or raw(plan)  # type: ignore[method-assign]
    engine._aggregate_raw = lambda plan: used.append("raw") or agg_raw(plan)  # type: ignore[method-assign]
    body = engine.execute(query, db="millstream")
    assert all("error" not in r for r in body["results"]), body
    return "raw" if used else "pushdown"


@pytest.mark.parametrize(
    ("query", "path"),
    [
        (f"SELECT last(*) FROM telemetry WHERE {TF} GROUP BY site, device", "pushdown"),
        (f"SELECT mean(temperature), max(temperature) FROM telemetry WHERE {TF}", "pushdown"),
        (
            f"SELECT mean(temperature) FROM telemetry WHERE site =~ /^(plant-a|plant-b)$/ AND {TF} GROUP BY time(1m), site",
            "pushdown",
        ),
        # first/last over several series of one group: InfluxDB's tie-break needs points
        (f"SELECT first(vibration), last(vibration) FROM telemetry WHERE {TF}", "raw"),
        # a single selector answers with the selected point's time
        (f"SELECT last(temperature) FROM telemetry WHERE {TF} GROUP BY device", "raw"),
        (
            f"SELECT mean(temperature) FROM telemetry WHERE device =~ /press/ AND {TF} GROUP BY time(1m)",
            "raw",
        ),
        (f"SELECT temperature FROM telemetry WHERE {TF}", "raw"),
    ],
)
def test_path(embedded: EmbeddedStorage, query: str, path: str) -> None:
    assert _path(embedded, query) == path


def test_dashboard_telemetry_panels_are_pushed_down(embedded: EmbeddedStorage) -> None:
    variables = {
        "site": "plant-a",
        "device": "press-01",
        "metric": "temperature",
        "detector": "zscore",
    }
    for dash, where, query in dashboard_queries():
        if '"telemetry"' in query and query.startswith("SELECT") and "GROUP BY" in query:
            q = substitute(query, variables, FROM_MS, TO_MS, "1m")
            assert _path(embedded, q) == "pushdown", (dash, where)
