"""Routes' mute_time_intervals and active_time_intervals (Alertmanager's time_intervals),
read in their time zone, delivered to a real webhook server."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from millstream_cloud.alerts.clock import ManualClock
from millstream_cloud.alerts.settings import AlertSettings
from millstream_cloud.alerts.timeintervals import holding, parse_interval
from millstream_cloud.timeutil import parse_time_ns
from tests.alerts.conftest import T0, reading
from tests.alerts.test_lifecycle import HOT, hook, route, run, statuses

BERLIN_NIGHT = {
    "name": "night",
    "time_intervals": [
        {"times": [{"start_time": "22:00", "end_time": "24:00"}], "location": "Europe/Berlin"},
        {"times": [{"start_time": "00:00", "end_time": "06:00"}], "location": "Europe/Berlin"},
    ],
}


def at(text: str) -> int:
    return parse_time_ns(text)


def test_an_interval_holds_when_every_field_it_gives_matches_in_its_location() -> None:
    weekday_evenings = parse_interval(
        {
            "times": [{"start_time": "18:00", "end_time": "22:00"}],
            "weekdays": ["monday:friday"],
            "location": "Europe/Berlin",
        }
    )
    # 18:00 in Berlin is 16:00 UTC in summer and 17:00 UTC in winter.
    assert weekday_evenings.holds(at("2027-07-07T16:00:00Z"))  # a Wednesday
    assert not weekday_evenings.holds(at("2027-07-07T15:59:00Z"))
    assert not weekday_evenings.holds(at("2027-07-07T20:00:00Z"))  # 22:00: the end excluded
    assert weekday_evenings.holds(at("2027-01-13T17:00:00Z"))
    assert not weekday_evenings.holds(at("2027-01-13T16:30:00Z"))
    assert not weekday_evenings.holds(at("2027-07-10T16:00:00Z"))  # a Saturday

    last_days = parse_interval({"days_of_month": ["-2:-1"], "months": ["february"]})
    assert last_days.holds(at("2028-02-29T12:00:00Z"))  # a leap year's last day
    assert last_days.holds(at("2028-02-28T12:00:00Z"))
    assert not last_days.holds(at("2028-02-27T12:00:00Z"))
    assert not last_days.holds(at("2028-03-31T12:00:00Z"))
    whole_month = parse_interval({"days_of_month": ["1:-1"], "years": ["2027:2028"]})
    assert whole_month.holds(at("2027-01-01T00:00:00Z"))
    assert not whole_month.holds(at("2029-01-01T00:00:00Z"))
    assert parse_interval({}).holds(at("2027-01-01T00:00:00Z"))  # no field: always

    nights = {"night": [parse_interval(i) for i in BERLIN_NIGHT["time_intervals"]]}
    assert holding(["night"], nights, at("2027-07-07T21:00:00Z")) == "night"  # 23:00
    assert holding(["night"], nights, at("2027-07-08T03:59:00Z")) == "night"  # 05:59
    assert holding(["night"], nights, at("2027-07-08T04:00:00Z")) is None


@pytest.mark.parametrize(
    ("interval", "says"),
    [
        ({"weekdays": ["funday"]}, "weekdays: 'funday' is not one of monday .. sunday"),
        ({"months": ["13"]}, "months: '13' is not one of january .. december or 1 .. 12"),
        ({"days_of_month": ["0"]}, "days_of_month: '0' is not one of 1 .. 31 or -31 .. -1"),
        ({"years": ["2027:2026"]}, "years: '2027:2026' ends before it begins"),
        ({"times": [{"start_time": "9:00", "end_time": "10:00"}]}, "not a time of day HH:MM"),
        ({"times": [{"start_time": "22:00", "end_time": "06:00"}]}, "split a span over midnight"),
        ({"location": "Mars/Olympus"}, "location: 'Mars/Olympus' is not a time zone"),
    ],
)
def test_a_bad_interval_is_refused_naming_the_field(interval: dict, says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        AlertSettings.model_validate(
            {"time_intervals": [{"name": "x", "time_intervals": [interval]}]}
        )


def test_routes_name_known_intervals_and_the_top_level_route_none() -> None:
    def refused(**settings: object) -> str:
        with pytest.raises(ValidationError) as exc:
            AlertSettings.model_validate(settings)
        return str(exc.value)

    unknown = route(routes=[{"receiver": "log", "mute_time_intervals": ["weekend"]}])
    unknown["receiver"] = "log"
    assert (
        "route.routes[0].mute_time_intervals: no time interval named 'weekend' "
        "(time_intervals: night)" in refused(route=unknown, time_intervals=[BERLIN_NIGHT])
    )
    top = {"receiver": "log", "active_time_intervals": ["night"]}
    assert "the top-level route cannot have" in refused(route=top, time_intervals=[BERLIN_NIGHT])
    assert "duplicate name 'night'" in refused(time_intervals=[BERLIN_NIGHT, BERLIN_NIGHT])


def test_a_muted_route_holds_its_notifications_until_the_interval_ends(
    make_service, webhook, webhook2
) -> None:
    """Plant A's route is muted at night in Berlin: an alert announced before 22:00 and
    resolved at night has its resolution sent at 06:00, one raised at night is sent then;
    plant B's route, not muted, is told at once."""
    clock = ManualClock(at("2026-05-28T19:50:00Z"))  # 21:50 in Berlin (summer time)
    svc = make_service(
        [{**HOT, "for": "0s"}],
        route(
            receiver="other",
            group_wait="0s",
            routes=[
                {
                    "matchers": ['site="plant-a"'],
                    "receiver": "hook",
                    "mute_time_intervals": ["night"],
                },
            ],
        ),
        hook(webhook) + hook(webhook2, "other"),
        clock,
        time_intervals=[BERLIN_NIGHT],
    )
    run(svc, clock, 30, 3, lambda i: 90.0)  # press-1 on plant A, before 22:00
    assert statuses(webhook) == ["firing"]
    clock.set(at("2026-05-28T20:05:00Z"))  # 22:05 in Berlin
    run(svc, clock, 120, 3, lambda i: 60.0)  # resolved at night
    svc.observe_readings([reading("press-2", "temp", 95, clock)])
    svc.observe_readings([reading("press-9", "temp", 95, clock, site="plant-b")])
    run(svc, clock, 300, 3, None)
    assert statuses(webhook) == ["firing"]  # nothing at night
    assert [b["alerts"][0]["labels"]["device"] for b in webhook2.bodies()] == ["press-9"]
    muted = svc.metrics.time_muted.labels("hook", "night")._value.get()
    assert muted >= 5  # a flush a minute (group_interval), each held back

    clock.set(at("2026-05-29T04:00:00Z"))  # 06:00 in Berlin
    run(svc, clock, 120, 3, None)
    bodies = webhook.bodies()[1:]
    told = sorted((a["labels"]["device"], a["status"]) for b in bodies for a in b["alerts"])
    assert told == [("press-1", "resolved"), ("press-2", "firing")]


def test_an_active_route_sends_only_within_its_intervals(make_service, webhook) -> None:
    """The pager's route is active on weekdays from 06:00 to 22:00 in Berlin: an alert at
    22:26 on a Thursday waits for Friday 06:00."""
    clock = ManualClock(T0)  # 2026-05-28 22:26:40 in Berlin, a Thursday
    day_shift = {
        "name": "day-shift",
        "time_intervals": [
            {"times": [{"start_time": "06:00", "end_time": "22:00"}],
             "weekdays": ["monday:friday"], "location": "Europe/Berlin"},
        ],
    }  # fmt: skip
    svc = make_service(
        [{**HOT, "for": "0s"}],
        route(
            receiver="hook",
            group_wait="0s",
            routes=[{"matchers": ['severity="critical"'], "active_time_intervals": ["day-shift"]}],
        ),
        hook(webhook),
        clock,
        time_intervals=[day_shift],
    )
    run(svc, clock, 300, 3, lambda i: 90.0)
    assert webhook.bodies() == []
    assert svc.metrics.time_muted.labels("hook", "outside day-shift")._value.get() > 0
    (alert,) = svc.list_alerts(state="firing")
    assert alert["status"]["mutedBy"] == ["outside day-shift"]
    clock.set(at("2026-05-29T04:00:00Z"))
    run(svc, clock, 90, 3, lambda i: 90.0)
    assert statuses(webhook) == ["firing"]
    (alert,) = svc.list_alerts(state="firing")
    assert alert["status"]["mutedBy"] == []
