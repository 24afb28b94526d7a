"""What the InfluxDB backend sends, checked against InfluxData's published API specs.

The backend talks to a loopback recording server; every request it receives is validated
with openapi-core against ``../shared/contracts/influxdb/*.yaml`` (patched in memory as
``contracts/README.md`` says). Answers of the real InfluxDB 1.x are validated against the
1.x spec. A contract check shows the shape matches; the conformance tests against a real
server and the opt-in live tests show a server accepts it.
"""

from __future__ import annotations

import gzip
import json
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from millstream_cloud.model import Reading
from millstream_cloud.settings import InfluxDBSettings
from millstream_cloud.storage.base import ANOMALIES, TELEMETRY, Point, SeriesQuery
from millstream_cloud.storage.influxdb import InfluxDBStorage
from tests.cloud.storage.conftest import influx_settings
from tests.support.influxdb import InfluxDBServer

openapi_core = pytest.importorskip("openapi_core")
from openapi_core import Config, OpenAPI  # noqa: E402
from openapi_core.testing import MockRequest, MockResponse  # noqa: E402

CONTRACTS = Path(__file__).resolve().parents[3] / ".." / "shared" / "contracts" / "influxdb"
V2 = "oss-v2.openapi.yaml"
V1 = "oss-v1.openapi.yaml"
V1COMPAT = "oss-v2-v1compat.openapi.yml"
CORE3 = "influxdb3-core.openapi.yaml"

S = 1_000_000_000
T0 = 1_767_225_600 * S

pytestmark = pytest.mark.skipif(not CONTRACTS.is_dir(), reason=f"no contracts at {CONTRACTS}")


@cache
def spec(name: str) -> OpenAPI:
    """A spec with the in-memory patches from contracts/README.md (files never edited)."""
    doc = yaml.safe_load((CONTRACTS / name).read_text())
    doc["servers"] = [{"url": "/"}]
    extra: dict[str, Any] = {}
    if name == V2:
        body = doc["paths"]["/api/v2/write"]["post"]["requestBody"]["content"]["text/plain"]
        body["schema"].pop("format", None)  # line protocol is not base64
        doc["components"]["schemas"]["InfluxqlJsonResponse"]["properties"]["results"].pop(
            "oneOf", None
        )
    if name == V1:
        # The 1.x spec models its Token scheme as HTTP bearer, although its own description
        # (and 1.8, and every client) sends "Authorization: Token user:password"; openapi-core
        # then demands "Bearer". Described as what it is: an Authorization header (as in 2.x).
        doc["components"]["securitySchemes"]["TokenAuth"] = {
            "type": "apiKey",
            "in": "header",
            "name": "Authorization",
        }
    if name == CORE3:
        extra["extra_format_validators"] = {"InfluxQL": lambda v: True}
    return OpenAPI.from_dict(doc, config=Config(spec_validator_cls=None, **extra))


@dataclass
class Captured:
    method: str
    path: str
    args: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def text_body(self) -> bytes:
        if self.headers.get("Content-Encoding") == "gzip":
            return gzip.decompress(self.body)  # validated as text, as the README says
        return self.body

    def mock(self) -> MockRequest:
        return MockRequest(
            "http://127.0.0.1",
            self.method,
            self.path,
            args=self.args,
            headers={k: v for k, v in self.headers.items() if k != "Content-Encoding"},
            data=self.text_body(),
            content_type=self.headers.get("Content-Type", "").split(";")[0],
        )


class Recorder(ThreadingHTTPServer):
    captured: list[Captured]


class Handler(BaseHTTPRequestHandler):
    server: Recorder

    def _capture(self) -> Captured:
        url = urllib.parse.urlsplit(self.path)
        n = int(self.headers.get("Content-Length") or 0)
        c = Captured(
            self.command,
            url.path,
            dict(urllib.parse.parse_qsl(url.query)),
            dict(self.headers.items()),
            self.rfile.read(n) if n else b"",
        )
        self.server.captured.append(c)
        return c

    def _reply(self, status: int, body: dict[str, Any] | None = None) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        c = self._capture()
        if c.path in ("/write", "/api/v2/write"):
            self._reply(204)
        else:
            self._reply(200, {"results": [{"statement_id": 0}]})

    def do_GET(self) -> None:
        c = self._capture()
        if c.path == "/ping":
            self._reply(204)
            return
        q = c.args.get("q", "")
        self._reply(200, {"results": [{"statement_id": i} for i in range(q.count(";") + 1)]})

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    server = Recorder(("127.0.0.1", 0), Handler)
    server.captured = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def exercise(store: InfluxDBStorage) -> None:
    """Writes of every field type and odd names, then every kind of read."""
    store.write_readings(
        [Reading("press 1", "plant,1", "temp", T0 + i * S, 20.0 + i) for i in range(10)]
    )
    store.write_points(
        [
            Point(
                ANOMALIES,
                {"device": "d=1", "detector": "z"},
                {"score": 4.5, "explanation": 'hot "really"\nvery', "n": 3, "ok": True},
                T0,
            ),
        ]
    )
    store.query(SeriesQuery(TELEMETRY, ["temp"], {"device": "press 1"}, T0, T0 + 3600 * S,
                            60 * S, "mean", ["site"], 10))  # fmt: skip
    store.query(SeriesQuery(TELEMETRY, ["temp"], {"device": "it's"}))
    store.latest(TELEMETRY, {"device": "press 1"})
    store.tag_values(TELEMETRY, "device", {"site": "plant,1"})
    store.measurements()
    store.tag_keys(TELEMETRY)


def validate(captured: list[Captured], path: str, specs: list[str]) -> int:
    n = 0
    for c in captured:
        if c.path != path:
            continue
        for name in specs:
            result = spec(name).unmarshal_request(c.mock())
            assert not result.errors, f"{name} {c.method} {c.path}: {result.errors}"
        n += 1
    assert n, f"no {path} request was sent"
    return n


@pytest.mark.parametrize("gzip_on", [False, True], ids=["plain", "gzip"])
def test_v2_write_and_query_requests_match_the_specs(
    recorder: Recorder, tmp_path: Path, gzip_on: bool
) -> None:
    settings = InfluxDBSettings(
        url=f"http://127.0.0.1:{recorder.server_address[1]}",
        api="v2",
        token="secret-token",
        org="factory",
        bucket="millstream",
        gzip=gzip_on,
        spool_dir=str(tmp_path / "spool"),
    )
    store = InfluxDBStorage(settings)
    try:
        exercise(store)
        assert store.ping()
    finally:
        store.close()
    writes = [c for c in recorder.captured if c.path == "/api/v2/write"]
    assert writes and all(c.args["bucket"] == "millstream" for c in writes)
    assert all(c.headers.get("Authorization") == "Token secret-token" for c in writes)
    if gzip_on:
        assert all(c.headers.get("Content-Encoding") == "gzip" for c in writes)
    # 2.x, InfluxDB 1.8's forward-compatible endpoint, and 3 Core's v2-compatible endpoint
    validate(recorder.captured, "/api/v2/write", [V2, V1, CORE3])
    # reads: InfluxQL over GET /query (2.x full spec and 3 Core; 1.x checked below)
    validate(recorder.captured, "/query", [V2, CORE3])


def test_v1_write_and_query_requests_match_the_specs(recorder: Recorder, tmp_path: Path) -> None:
    settings = InfluxDBSettings(
        url=f"http://127.0.0.1:{recorder.server_address[1]}",
        api="v1",
        username="millstream",
        password="pw",
        database="plant",
        retention_policy="autogen",
        spool_dir=str(tmp_path / "spool"),
    )
    store = InfluxDBStorage(settings)
    try:
        exercise(store)
    finally:
        store.close()
    writes = [c for c in recorder.captured if c.path == "/write"]
    assert all(c.args == {"db": "plant", "rp": "autogen"} for c in writes)
    assert all(c.headers["Authorization"].startswith("Basic ") for c in writes)
    # 1.x itself, 2.x's v1-compatible endpoint, 3 Core's v1-compatible endpoint
    validate(recorder.captured, "/write", [V1, V1COMPAT, CORE3])
    gets = [c for c in recorder.captured if c.path == "/query" and c.method == "GET"]
    posts = [c for c in recorder.captured if c.path == "/query" and c.method == "POST"]
    assert posts and posts[0].args == {} and b"CREATE+DATABASE" in posts[0].body
    for c in gets:
        for name in (V1, CORE3):
            result = spec(name).unmarshal_request(c.mock())
            assert not result.errors, f"{name} GET /query: {result.errors}"
    for c in posts:  # CREATE DATABASE: a form body on 1.x
        result = spec(V1).unmarshal_request(c.mock())
        assert not result.errors, result.errors


def test_real_influxdb_1x_answers_match_the_1x_spec(
    influxdb: InfluxDBServer, tmp_path: Path
) -> None:
    """Our parser reads what the 1.x spec promises; InfluxDB 1.6 keeps that promise."""
    store = InfluxDBStorage(influx_settings(influxdb, tmp_path))
    try:
        exercise(store)
        db = store.settings.database
    finally:
        store.close()
    statements = [
        f'SELECT mean("temp") FROM "telemetry" WHERE time >= {T0} AND time < {T0 + 3600 * S} '
        'GROUP BY time(60000000000ns), "site" fill(none)',
        'SELECT last("explanation") FROM "anomalies"',
        'SHOW TAG VALUES FROM "telemetry" WITH KEY = "device"',
        'SHOW FIELD KEYS FROM "anomalies"',
        "SHOW MEASUREMENTS",
        'SELECT "nope" FROM "nothing"',
    ]
    for stmt in statements:
        args = {"db": db, "q": stmt, "epoch": "ns"}
        body = influxdb.influxql(stmt, db=db)
        request = MockRequest(
            influxdb.url, "get", "/query", args=args, headers={"Authorization": "Basic eDp5"}
        )
        response = MockResponse(json.dumps(body).encode(), status_code=200,
                                content_type="application/json")  # fmt: skip
        for name in (V1, V2):
            result = spec(name).unmarshal_response(request, response)
            assert not result.errors, f"{name}: {stmt}: {result.errors}"


def test_the_contract_check_catches_a_broken_request() -> None:
    """The checks above are not vacuous: a write without its bucket fails them."""
    bad = MockRequest("http://127.0.0.1", "post", "/api/v2/write", args={"org": "x"},
                      headers={"Authorization": "Token t"}, data=b"m f=1 1",
                      content_type="text/plain")  # fmt: skip
    assert spec(V2).unmarshal_request(bad).errors
    anon = MockRequest("http://127.0.0.1", "post", "/write", args={"db": "x"}, data=b"m f=1 1",
                       content_type="text/plain")  # fmt: skip
    assert spec(V1COMPAT).unmarshal_request(anon).errors  # 2.x always wants credentials
