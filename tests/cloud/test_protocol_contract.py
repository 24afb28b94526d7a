"""The cloud's decoder agrees with the wire contract: schemas and golden messages."""

from __future__ import annotations

import time

import msgspec
import pytest

from millstream_cloud.ingest.decode import DecodeError, decode_status, decode_telemetry
from millstream_cloud.protocol import (
    WireCommand,
    WireCommandResult,
    WireConfigDesired,
    WireConfigReported,
    parse_ts_ns,
)
from tests.protocol_cases import Case, is_schema_valid, load_cases

CASES = load_cases()
DECODERS = {
    "config/desired": msgspec.json.Decoder(WireConfigDesired),
    "config/reported": msgspec.json.Decoder(WireConfigReported),
    "cmd": msgspec.json.Decoder(WireCommand),
    "cmd/result": msgspec.json.Decoder(WireCommandResult),
}


def cloud_verdict(case: Case) -> tuple[str, str | None]:
    arrival = parse_ts_ns("2026-03-01T08:00:02Z")
    try:
        if case.channel == "telemetry":
            decode_telemetry(case.topic, case.payload, arrival)
        elif case.channel == "status":
            decode_status(case.topic, case.payload)
        else:
            try:
                DECODERS[case.channel].decode(case.payload)
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                raise DecodeError("schema", str(exc)) from None
    except DecodeError as exc:
        return "reject", exc.reason
    return "accept", None


@pytest.mark.parametrize("case", CASES, ids=str)
def test_golden_message_verdict(case: Case) -> None:
    verdict, reason = cloud_verdict(case)
    assert verdict == case.expect, f"{case.file}: {case.note}"
    assert reason == case.reason


@pytest.mark.parametrize("case", CASES, ids=str)
def test_schema_agrees_with_manifest(case: Case) -> None:
    assert is_schema_valid(case.channel, case.payload) == case.schema_valid


def test_every_channel_has_good_and_bad_examples() -> None:
    by_channel: dict[str, set[str]] = {}
    for c in CASES:
        by_channel.setdefault(c.channel.split("/")[0], set()).add(c.expect)
    for channel, verdicts in by_channel.items():
        assert verdicts == {"accept", "reject"}, channel


def test_unsynced_clock_is_restamped_and_original_kept() -> None:
    case = next(c for c in CASES if c.file == "telemetry-unsynced-clock.json")
    arrival = time.time_ns()
    batch = decode_telemetry(case.topic, case.payload, arrival)
    (reading,) = batch.readings
    assert reading.time_ns == arrival
    assert reading.source_time_ns == parse_ts_ns("1970-01-01T00:02:11.000Z")
    assert batch.restamped == 1


def test_source_timestamp_kept_to_the_nanosecond() -> None:
    case = next(c for c in CASES if c.file == "telemetry-nanoseconds.json")
    batch = decode_telemetry(case.topic, case.payload, parse_ts_ns("2026-03-01T08:00:01Z"))
    assert batch.readings[0].time_ns == 1772352000123456789
    assert batch.readings[0].source_time_ns is None


def test_boolean_values_are_stored_as_numbers() -> None:
    case = next(c for c in CASES if c.file == "telemetry-full.json")
    batch = decode_telemetry(case.topic, case.payload, parse_ts_ns("2026-03-01T08:00:02Z"))
    assert [r.value for r in batch.readings] == [2.31, 65.2, 1.0]
    assert batch.readings[2].quality == "uncertain"


def test_far_future_timestamp_is_rejected_with_where() -> None:
    payload = b'{"v":1,"device":"d1","seq":1,"readings":[{"ts":"2036-03-01T08:00:00Z","metric":"t","value":1}]}'
    with pytest.raises(DecodeError) as info:
        decode_telemetry(
            "millstream/v1/s/d1/telemetry", payload, parse_ts_ns("2026-03-01T08:00:00Z")
        )
    assert info.value.reason == "timestamp_out_of_range"
    assert "readings[0].ts" in str(info.value)


def test_oversize_payload_is_rejected_before_parsing() -> None:
    from millstream_cloud.ingest.decode import Limits

    with pytest.raises(DecodeError) as info:
        decode_telemetry(
            "millstream/v1/s/d1/telemetry", b"x" * 2048, 0, Limits(max_payload_bytes=1024)
        )
    assert info.value.reason == "oversize"
