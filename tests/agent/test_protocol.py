"""The agent's encoder against the shared JSON Schemas (docs/schemas/)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from millstream_agent import protocol
from millstream_agent.collectors.base import Sample

jsonschema = pytest.importorskip("jsonschema")
SCHEMAS = Path(__file__).resolve().parents[2] / "docs" / "schemas"


def schema(name: str) -> dict:
    return json.loads((SCHEMAS / f"{name}.schema.json").read_text())


def test_raw_telemetry_matches_schema_and_dict_encoder() -> None:
    samples = [
        Sample(1_764_000_000.123, "temperature", 21.5, "degC"),
        Sample(1_764_000_000.123, "running", True),
        Sample(1_764_000_000.123, "count", 3, quality="uncertain"),
        Sample(1_764_000_000.123, "broken", float("nan")),
    ]
    texts = protocol.readings_json(samples)
    assert len(texts) == 3  # NaN is not JSON
    raw = protocol.encode_telemetry_raw(
        "press-01", 42, "[" + ",".join(texts) + "]", sent_at=1_764_000_001.0, clock_synced=False
    )
    message = json.loads(raw)
    jsonschema.validate(message, schema("telemetry"))
    assert message["clock"] == "unsynced"
    same = json.loads(
        protocol.encode_telemetry(
            "press-01",
            42,
            [json.loads(t) for t in texts],
            sent_at=1_764_000_001.0,
            clock_synced=False,
        )
    )
    assert message == same


def test_status_config_and_command_messages_match_schemas() -> None:
    jsonschema.validate(
        json.loads(
            protocol.encode_status(
                "d", "online", "connected", ts=1.0, agent_version="0.1", kind="motor"
            )
        ),
        schema("status"),
    )
    jsonschema.validate(
        json.loads(protocol.encode_config_reported(3, "rejected", "bad", ts=1.0)), schema("config")
    )
    jsonschema.validate(
        json.loads(protocol.encode_command_result("c1", True, {"pong": True})), schema("command")
    )


def test_readings_the_contract_rejects_are_dropped_not_sent() -> None:
    samples = [
        Sample(1_764_000_000.0, 'bad"name', 1.0),
        Sample(1_764_000_000.0, "9starts_with_digit", 1.0),
        Sample(1_764_000_000.0, "ok", 1.0, "u" * 40),
        Sample(1_764_000_000.0, "odd_quality", 1.0, quality="meh"),
        Sample(1_764_000_000.0, "text", "high"),  # type: ignore[arg-type]
        Sample(1_764_000_000.0, "inf", float("inf")),
    ]
    texts = protocol.readings_json(samples)
    assert [json.loads(t) for t in texts] == [
        {"ts": "2025-11-24T16:00:00.000Z", "metric": "ok", "value": 1.0}
    ]
