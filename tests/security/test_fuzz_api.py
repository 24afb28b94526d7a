"""Property-based fuzzing of the HTTP API, driven by its own OpenAPI document.

Every operation the app publishes is called with path ids that exist and ones that do
not, query values drawn from each parameter's schema or arbitrary text, and bodies drawn
from the request schema (so they reach the handlers' own checks) or arbitrary JSON. The
property: never a 500 (an unhandled exception), a refusal says why, and the service
still answers afterwards. The service holds a device with an hour of telemetry, so the
device routes run their real work. ``MILLSTREAM_FUZZ_SCALE`` multiplies the 800
examples; runs are derandomized, so a failure reproduces on the next run.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from millstream_cloud.app import create_app
from millstream_cloud.services import Services
from millstream_cloud.settings import Settings
from tests.cloud.test_anomalies import birth, telemetry

SCALE = float(os.environ.get("MILLSTREAM_FUZZ_SCALE", "1"))
IDS = ["press-01", "plant-a", "nobody", "..", "a b", "0", "x" * 300]

_texts = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["now-1h", "now-20000w", "2026-01-01T00:00:00Z", "1e400", "nan", "-1", ""]),
)
_json = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(10**30), 10**30),
        st.floats(allow_nan=False, allow_infinity=False),
        _texts,
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=20,
)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, dict[str, Any]]]:
    settings_ = Settings(data_dir=str(tmp_path_factory.mktemp("api-fuzz")))
    services = Services.build(settings_, with_subscriber=False)
    now = time.time_ns()
    start = now - 3600 * 10**9
    messages = [birth("press-01", "motor", start)]
    for i in range(360):
        t = start + i * 10 * 10**9
        messages.append(
            telemetry("press-01", i, [(t, "temp", 20.0 + i % 7), (t, "vib", 1.0 + i % 3)], t)
        )
    services.pipeline.process(messages)
    app_ = create_app(settings_, services, start=False)
    with TestClient(app_) as client:
        yield client, app_.openapi()
    services.stop()


def _schema_values(
    schema: dict[str, Any], spec: dict[str, Any], depth: int = 0
) -> st.SearchStrategy[Any]:
    """Values of ``schema`` (OpenAPI's JSON Schema: its types, enums, bounds, required
    properties; references resolved in ``spec``), so a body gets past the shape checks
    to the handler's own; arbitrary JSON where the schema says nothing or nests deep."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = spec["components"]["schemas"][name]
    if depth > 4:
        return _json
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return st.one_of([_schema_values(s, spec, depth + 1) for s in schema[key]])
    kind = schema.get("type")
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        return st.integers(schema.get("minimum"), schema.get("maximum"))
    if kind == "number":
        low, high = schema.get("minimum"), schema.get("maximum")
        return st.floats(low, high, allow_nan=False, allow_infinity=False)
    if kind == "string":
        return st.one_of(
            st.text(min_size=schema.get("minLength", 0), max_size=schema.get("maxLength", 30)),
            _texts,
        )
    if kind == "array":
        items = _schema_values(schema.get("items", {}), spec, depth + 1)
        return st.lists(items, max_size=4)
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        required = set(schema.get("required", ()))
        return st.fixed_dictionaries(
            {k: _schema_values(v, spec, depth + 1) for k, v in props.items() if k in required},
            optional={
                k: _schema_values(v, spec, depth + 1) for k, v in props.items() if k not in required
            },
        )
    return _json


@st.composite
def requests(draw: st.DrawFn, spec: dict[str, Any]) -> tuple[str, str, dict[str, Any], Any]:
    operations = [
        (path, method, op)
        for path, item in spec["paths"].items()
        for method, op in item.items()
        if method in ("get", "post", "put", "patch", "delete")
    ]
    path, method, op = draw(st.sampled_from(operations))
    url = re.sub(r"\{\w+\}", lambda _: draw(st.sampled_from(IDS)), path)
    params: dict[str, Any] = {}
    for p in op.get("parameters", []):
        if p["in"] == "query" and draw(st.booleans()):
            value = draw(st.one_of(_schema_values(p.get("schema", {}), spec), _texts))
            params[p["name"]] = value if isinstance(value, str) else json.dumps(value)
    body = None
    if "requestBody" in op:
        schema = next(iter(op["requestBody"]["content"].values())).get("schema", {})
        body = draw(st.one_of(_schema_values(schema, spec), _json))
    return method, url, params, body


def test_no_request_makes_the_api_fail(app: tuple[TestClient, dict[str, Any]]) -> None:
    client, spec = app

    @settings(
        max_examples=max(1, int(800 * SCALE)),
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(requests(spec))
    def call(request: tuple[str, str, dict[str, Any], Any]) -> None:
        method, url, params, body = request
        kwargs: dict[str, Any] = {"params": params}
        if body is not None:
            kwargs["content"] = json.dumps(body).encode()
            kwargs["headers"] = {"content-type": "application/json"}
        res = client.request(method.upper(), url, **kwargs)
        assert res.status_code != 500, (method, url, params, body, res.text[:400])
        if 400 <= res.status_code < 500:
            # Why: FastAPI's "detail", or InfluxDB's "error" on its /query.
            why = res.json()
            assert why.get("detail") or why.get("error"), (method, url, res.text[:400])

    call()
    assert client.get("/healthz").status_code == 200
    assert client.get("/api/v1/devices/press-01").status_code == 200


def test_the_fuzzer_reaches_every_operation(app: tuple[TestClient, dict[str, Any]]) -> None:
    # A guard on the test itself: an operation the app publishes without a method the
    # fuzzer calls would go unexercised.
    _, spec = app
    methods = {m for item in spec["paths"].values() for m in item}
    assert methods <= {"get", "post", "put", "patch", "delete", "head"}, methods
    assert len(spec["paths"]) >= 25
    assert Path(__file__).exists()
