"""The agent's encoder produces exactly what wire contract v1 accepts."""

from __future__ import annotations

import json

import pytest

from millstream_agent import protocol
from millstream_agent.collectors.base import Sample
from tests.protocol_cases import is_schema_valid, load_cases, schema_errors


def test_encoded_batch_matches_schema() -> None:
    readings = [
        protocol.reading(Sample(1772352000.25, "bearing_vibration", 2.31, "mm/s")),
        protocol.reading(Sample(1772352000.25, "running", True, None, "uncertain")),
    ]
    payload = protocol.encode_telemetry("press-01", 42, readings, sent_at=1772352001.0)
    message = json.loads(payload)
    assert schema_errors("telemetry", message) == []
    assert message["readings"][0] == {
        "ts": "2026-03-01T08:00:00.250Z",
        "metric": "bearing_vibration",
        "value": 2.31,
        "unit": "mm/s",
    }


def test_unsynced_clock_is_marked() -> None:
    payload = protocol.encode_telemetry(
        "press-01", 1, [protocol.reading(Sample(131.0, "t", 1.0))], clock_synced=False
    )
    message = json.loads(payload)
    assert message["clock"] == "unsynced"
    assert schema_errors("telemetry", message) == []


def test_nan_is_never_sent() -> None:
    with pytest.raises(ValueError):
        protocol.encode_telemetry("press-01", 1, [protocol.reading(Sample(1.0, "t", float("nan")))])


@pytest.mark.parametrize(
    "state,reason",
    [("online", "connected"), ("offline", "connection-lost"), ("offline", "shutdown")],
)
def test_status_messages_match_schema(state: str, reason: str) -> None:
    payload = protocol.encode_status(
        "press-01", state, reason, ts=1772352000.0, agent_version="0.1.0", kind="motor"
    )
    assert schema_errors("status", json.loads(payload)) == []


def test_topics() -> None:
    assert (
        protocol.topic("plant-a", "press-01", "telemetry")
        == "millstream/v1/plant-a/press-01/telemetry"
    )


@pytest.mark.parametrize("case", load_cases("telemetry"), ids=str)
def test_golden_telemetry_ids_and_names_follow_the_agent_patterns(case) -> None:  # type: ignore[no-untyped-def]
    """The agent's own id/metric patterns accept exactly what the schema accepts."""
    if not is_schema_valid("telemetry", case.payload):
        return
    message = json.loads(case.payload)
    assert protocol.ID_PATTERN.match(message["device"])
    for r in message["readings"]:
        assert protocol.METRIC_PATTERN.match(r["metric"])
