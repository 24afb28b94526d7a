"""The /query router: GET and POST, credentials and the authorization hook, errors."""

from __future__ import annotations

import base64

import pytest
from fastapi.testclient import TestClient

from millstream_cloud.grafana.influxql import ParseError, parse
from millstream_cloud.grafana.query_api import InfluxCredentials
from millstream_cloud.storage.embedded import EmbeddedStorage
from tests.grafana.conftest import Influx, query_app


def test_get_and_post_form_give_the_same_answer(millstream: TestClient) -> None:
    q = "SHOW TAG VALUES FROM telemetry WITH KEY = device"
    get = millstream.get("/query", params={"db": "millstream", "q": q})
    post = millstream.post("/query", data={"db": "millstream", "q": q})
    post_mixed = millstream.post("/query?db=millstream", data={"q": q})
    assert get.status_code == post.status_code == post_mixed.status_code == 200
    assert get.json() == post.json() == post_mixed.json()
    assert get.headers["x-influxdb-version"].startswith("1.")


@pytest.mark.integration
def test_parse_error_is_400_like_influxdb(influx: Influx, millstream: TestClient) -> None:
    for q in ("SELEC mean(x) FROM telemetry", "SELECT mean(x) FROM", "SELECT mean(x) FROM t WHERE"):
        status, expected = influx.query(q)
        resp = millstream.get("/query", params={"db": "millstream", "q": q})
        assert resp.status_code == status == 400
        assert set(resp.json()) == set(expected) == {"error"}
        assert resp.json()["error"].startswith("error parsing query")
    assert millstream.get("/query", params={"db": "millstream"}).status_code == 400


def test_unsupported_influxql_gets_a_clear_error(millstream: TestClient) -> None:
    cases = {
        "SELECT derivative(mean(temperature)) FROM telemetry": "not supported",
        "SELECT temperature * 2 FROM telemetry": "math",
        "DROP MEASUREMENT telemetry": "read-only",
        "SHOW SERIES": "SHOW SERIES is not supported",
        "SELECT mean(temperature) FROM telemetry GROUP BY time(1m) tz('Europe/Paris')": "tz()",
    }
    for q, fragment in cases.items():
        body = millstream.get("/query", params={"db": "millstream", "q": q}).json()
        assert fragment in body["results"][0]["error"], (q, body)


def test_credentials_reach_the_authorization_hook(tmp_path) -> None:  # type: ignore[no-untyped-def]
    seen: list[InfluxCredentials] = []

    def authorizer(creds: InfluxCredentials) -> bool:
        seen.append(creds)
        return creds.token == "good" or creds.password == "good"

    store = EmbeddedStorage(tmp_path / "t.db")
    client = TestClient(query_app(store, authorizer=authorizer))
    q = {"db": "millstream", "q": "SHOW DATABASES"}
    assert (
        client.get("/query", params=q, headers={"Authorization": "Token good"}).status_code == 200
    )
    basic = base64.b64encode(b"grafana:good").decode()
    assert (
        client.get("/query", params=q, headers={"Authorization": f"Basic {basic}"}).status_code
        == 200
    )
    assert client.get("/query", params={**q, "u": "grafana", "p": "good"}).status_code == 200
    denied = client.get("/query", params={**q, "u": "grafana", "p": "bad"})
    assert denied.status_code == 401 and denied.json() == {"error": "authorization failed"}
    assert client.get("/query", params=q).status_code == 401
    assert [c.scheme for c in seen] == ["token", "basic", "params", "params", "none"]
    assert seen[1].username == "grafana"
    store.close()


def test_no_hook_lets_everyone_in(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = EmbeddedStorage(tmp_path / "t.db")
    client = TestClient(query_app(store))
    resp = client.get("/query", params={"db": "millstream", "q": "SHOW MEASUREMENTS"})
    assert resp.status_code == 200 and resp.json() == {"results": [{"statement_id": 0}]}
    assert client.get("/ping").status_code == 204
    store.close()


@pytest.mark.parametrize(
    "text",
    [
        'SELECT mean("temperature") AS "t" FROM "millstream"."autogen"."telemetry" WHERE ("device" =~ /^press\\-01$/) AND time >= now() - 6h GROUP BY time(1m), "device" fill(null)',
        "select MEAN(x) from t where a = 'it\\'s' or b <> 'x' group by time(1h, -15m) fill(0) order by time desc limit 10 offset 2 slimit 1",
        'SHOW TAG VALUES ON millstream FROM t WITH KEY IN (a, "b") WHERE c =~ /x\\/y/ LIMIT 5',
        "SHOW FIELD KEYS; SHOW TAG KEYS FROM t; SHOW MEASUREMENTS WITH MEASUREMENT = t; SHOW RETENTION POLICIES ON millstream;",
    ],
)
def test_parser_accepts(text: str) -> None:
    assert parse(text)


def test_parser_details() -> None:
    (stmt,) = parse(
        "SELECT mean(x) FROM db..m WHERE time > '2024-03-01T00:00:00.5Z' GROUP BY time(1h, -15m) fill(-2.5)"
    )
    assert stmt.source.database == "db" and stmt.source.retention_policy is None  # type: ignore[union-attr]
    assert stmt.time_dimension.offset_ns == -15 * 60 * 10**9  # type: ignore[union-attr]
    assert stmt.fill == "value" and stmt.fill_value == -2.5  # type: ignore[union-attr]
    (re_stmt,) = parse("SELECT x FROM m WHERE d =~ /a\\/b/")
    assert re_stmt.condition.rhs.pattern == "a/b"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("SELEC x FROM m", "found SELEC, expected SELECT, SHOW at line 1, char 1"),
        ("SELECT x FROM m WHERE d = 'open", "closing quote"),
        ("SELECT x FROM m WHERE d = '$device'x", "expected ;"),
        ("SELECT x FROM m WHERE d = $device", "variable was not substituted"),
        ("SELECT x FROM m GROUP BY time(x)", "expected duration"),
        ("", "found EOF"),
    ],
)
def test_parser_errors(text: str, fragment: str) -> None:
    with pytest.raises(ParseError, match=None) as exc:
        parse(text)
    assert fragment in str(exc.value)


def test_regex_literals() -> None:
    from millstream_cloud.grafana.engine import pushdown_filters, regex_literals

    assert regex_literals("^plant\\-a$") == ["plant-a"]
    assert regex_literals("^(a|b\\.c)$") == ["a", "b.c"]
    for not_literal in ("^a.*$", "^\\d$", "plant", "^(a|)$", "^(a|b)c$", "^(a)|(b)$"):
        assert regex_literals(not_literal) is None, not_literal
    (stmt,) = parse("SELECT x FROM m WHERE a =~ /^(1|2)$/ AND b = 'x' AND a =~ /^(2|3)$/")
    assert pushdown_filters(stmt.condition, ["a", "b"]) == [{"a": "2", "b": "x"}]  # type: ignore[union-attr]
