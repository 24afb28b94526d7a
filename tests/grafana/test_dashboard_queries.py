"""Every dashboard query, variables substituted, against real InfluxDB 1.x and Millstream.

1. It runs without error on InfluxDB 1.x holding the fleet history and returns rows.
2. Millstream's ``/query`` over the embedded store returns the same series, value by
   value (floats within tolerance), with and without pushdown to the storage.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.grafana.conftest import Influx
from tests.grafana.data import FROM_MS, TO_MS
from tests.grafana.support import dashboard_queries, substitute

SINGLE = {"site": "plant-a", "device": "press-01", "detector": "zscore"}
MULTI = {"site": "(plant-a|plant-b)", "device": "press-02", "detector": "(zscore|isoforest)"}
METRICS = ("temperature", "pressure")
INTERVAL = "1m"


def cases() -> list[Any]:
    out = []
    for dash, where, query in dashboard_queries():
        variants = [("single", SINGLE), ("multi", MULTI)]
        for vname, variables in variants:
            if vname == "multi" and "=~" not in query:
                continue
            metrics = METRICS if "$metric" in query else (METRICS[0],)
            for metric in metrics:
                q = substitute(query, {**variables, "metric": metric}, FROM_MS, TO_MS, INTERVAL)
                out.append(pytest.param(q, id=f"{dash}:{where}:{vname}:{metric}"))
    return out


CASES = cases()


def assert_same(expected: Any, actual: Any, path: str = "") -> None:
    """Equal JSON, except that numbers compare within float tolerance."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{path}: {actual!r} is not an object"
        assert sorted(expected) == sorted(actual), (
            f"{path}: keys {sorted(actual)} != {sorted(expected)}"
        )
        for k in expected:
            assert_same(expected[k], actual[k], f"{path}/{k}")
    elif isinstance(expected, list):
        assert isinstance(actual, list), f"{path}: {actual!r} is not a list"
        assert len(expected) == len(actual), (
            f"{path}: {len(actual)} items, InfluxDB has {len(expected)}"
        )
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            assert_same(e, a, f"{path}/{i}")
    elif isinstance(expected, bool) or expected is None or isinstance(expected, str):
        assert expected == actual, f"{path}: {actual!r} != InfluxDB's {expected!r}"
    elif isinstance(expected, int | float):
        assert isinstance(actual, int | float) and not isinstance(actual, bool), (
            f"{path}: {actual!r}"
        )
        assert math.isclose(expected, actual, rel_tol=1e-9, abs_tol=1e-9), (
            f"{path}: {actual!r} != InfluxDB's {expected!r}"
        )
    else:
        raise AssertionError(f"{path}: unexpected {expected!r}")


@pytest.mark.integration
@pytest.mark.parametrize("query", CASES)
def test_query_returns_rows_on_influxdb(influx: Influx, query: str) -> None:
    status, body = influx.query(query, epoch="ms")
    assert status == 200, body
    for result in body["results"]:
        assert "error" not in result, result["error"]
        assert result.get("series"), f"no rows for {query}"
        assert any(s["values"] for s in result["series"])


@pytest.mark.integration
@pytest.mark.parametrize("epoch", ["ms", None])
@pytest.mark.parametrize("query", CASES)
def test_millstream_answers_like_influxdb(
    influx: Influx, millstream: TestClient, query: str, epoch: str | None
) -> None:
    _, expected = influx.query(query, epoch=epoch)
    params = {"db": "millstream", "q": query, **({"epoch": epoch} if epoch else {})}
    resp = millstream.get("/query", params=params)
    assert resp.status_code == 200, resp.text
    assert_same(expected, resp.json())
