"""Times given to the API: RFC 3339 to the nanosecond, within what storage can hold."""

from __future__ import annotations

import time

import pytest

from millstream_cloud.timeutil import parse_duration_ns, parse_time_ns, rfc3339


def test_a_listed_time_names_the_same_nanosecond_when_sent_back() -> None:
    t = parse_time_ns("2026-03-01T08:00:00.123456789Z")
    assert t == 1_772_352_000_123_456_789
    assert parse_time_ns(rfc3339(t)) == t
    assert parse_time_ns("2026-03-01T09:00:00+01:00") == parse_time_ns("2026-03-01T08:00:00Z")


@pytest.mark.parametrize("text", ["0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z"])
def test_times_a_64_bit_nanosecond_cannot_hold_are_refused(text: str) -> None:
    # They reached the store before and failed there (a 500 from the missed-fault report).
    with pytest.raises(ValueError, match="out of range: times from 1677-09-22 to 2262-04-11"):
        parse_time_ns(text)
    assert parse_time_ns("2262-04-11T00:00:00Z") > parse_time_ns("1677-09-22T00:00:00Z")


@pytest.mark.parametrize("text", ["soon", "2026-13-01T00:00:00Z", ""])
def test_a_bad_time_is_named(text: str) -> None:
    with pytest.raises(ValueError, match="is not an RFC 3339 time"):
        parse_time_ns(text)


def test_durations() -> None:
    assert parse_duration_ns("1h30m") == 5400 * 10**9
    for bad in ("0s", "-5s", "5", "1x"):
        with pytest.raises(ValueError, match="is not a duration"):
            parse_duration_ns(bad)


def test_a_time_relative_to_now_as_grafana_writes_it() -> None:
    now = parse_time_ns("2026-03-01T08:00:00Z")
    assert parse_time_ns("now", now) == now
    assert parse_time_ns("now-1h", now) == parse_time_ns("2026-03-01T07:00:00Z")
    assert parse_time_ns(" now + 1h30m ", now) == parse_time_ns("2026-03-01T09:30:00Z")
    # Without the caller's now, the system's.
    assert abs(parse_time_ns("now-1d") - (time.time_ns() - 86400 * 10**9)) < 5 * 10**9
    with pytest.raises(ValueError, match="'now-1y': '1y' is not a duration"):
        parse_time_ns("now-1y", now)
    with pytest.raises(ValueError, match="'now-20000w' is out of range"):
        parse_time_ns("now-20000w", now)  # as far as an absolute time may go, no further
    with pytest.raises(ValueError, match="nor one relative to now like now-1h"):
        parse_time_ns("yesterday", now)
