"""Lifecycle against a real webhook receiver: flapping, ``for``, resolution, restart."""

from __future__ import annotations

import itertools
from collections.abc import Callable

from millstream_cloud.alerts.clock import ManualClock
from millstream_cloud.alerts.labels import fingerprint
from millstream_cloud.alerts.service import AlertService
from tests.alerts.conftest import T0, WebhookServer, reading

HOT = {
    "name": "HotSpindle",
    "type": "threshold",
    "metric": "temp",
    "op": ">",
    "threshold": 80,
    "clear": 70,
    "for": "30s",
    "labels": {"severity": "critical"},
    "annotations": {"summary": "{device} at {value:.1f} (limit {threshold:g})"},
}


def route(**over: object) -> dict[str, object]:
    return {
        "receiver": "hook",
        "group_by": ["alertname", "site"],
        "group_wait": "10s",
        "group_interval": "1m",
        "repeat_interval": "4h",
        **over,
    }


def hook(server: WebhookServer, name: str = "hook") -> list[dict[str, object]]:
    return [{"name": name, "webhook_configs": [{"url": server.url}]}]


def run(
    svc: AlertService,
    clock: ManualClock,
    seconds: float,
    step: float,
    value: Callable[[int], float] | None,
    device: str = "press-1",
) -> None:
    """Advance alert time in ``step`` s, feeding one reading (if any) and a tick each step."""
    for i in range(round(seconds / step)):
        clock.advance(step)
        if value is not None:
            svc.observe_readings([reading(device, "temp", value(i), clock)])
        svc.tick()
    assert svc.wait_idle(10)


def statuses(server: WebhookServer) -> list[str]:
    return [b["status"] for b in server.bodies()]


def test_flapping_around_threshold_notifies_once_per_repeat_interval(make_service, webhook):
    clock = ManualClock(T0)
    svc = make_service([HOT], route(), hook(webhook), clock)
    # 200 readings 3 s apart: 100 times above the threshold, 100 times below it, 10 minutes.
    run(svc, clock, 600, 3, lambda i: 81.0 if i % 2 == 0 else 79.0)
    assert statuses(webhook) == ["firing"]
    body = webhook.bodies()[0]
    assert len(body["alerts"]) == 1
    alert = body["alerts"][0]
    assert alert["labels"] == {
        "alertname": "HotSpindle",
        "device": "press-1",
        "site": "plant-a",
        "metric": "temp",
        "severity": "critical",
    }
    assert alert["fingerprint"] == fingerprint(alert["labels"])
    # Falls below the clear level: one resolved notification, then silence.
    run(svc, clock, 600, 3, lambda i: 60.0)
    assert statuses(webhook) == ["firing", "resolved"]


def test_flapping_across_both_levels_held_by_keep_firing_for(make_service, webhook):
    clock = ManualClock(T0)
    rule = {**HOT, "for": "0s", "keep_firing_for": "2m"}
    svc = make_service([rule], route(), hook(webhook), clock)
    run(svc, clock, 600, 3, lambda i: 95.0 if i % 2 == 0 else 50.0)
    assert statuses(webhook) == ["firing"]
    run(svc, clock, 300, 3, lambda i: 50.0)
    assert statuses(webhook) == ["firing", "resolved"]


def test_repeat_interval_spaces_reminders(make_service, webhook):
    clock = ManualClock(T0)
    svc = make_service(
        [HOT], route(group_interval="30s", repeat_interval="2m"), hook(webhook), clock
    )
    times: list[int] = []
    for _ in range(200):  # 10 minutes, always above
        clock.advance(3)
        svc.observe_readings([reading("press-1", "temp", 90.0, clock)])
        before = len(webhook.received)
        svc.tick()
        svc.wait_idle(5)
        if len(webhook.received) > before:
            times.append(clock.now_ns())
    assert statuses(webhook) == ["firing"] * len(times)
    gaps = [(b - a) / 1e9 for a, b in itertools.pairwise(times)]
    assert all(g >= 120 for g in gaps), gaps
    assert len(times) <= 600 / 120 + 1


def test_for_is_respected(make_service, webhook):
    clock = ManualClock(T0)
    svc = make_service([{**HOT, "clear": None}], route(group_wait="0s"), hook(webhook), clock)
    # Above the threshold for 27 s, then below: pending ends, nothing is sent.
    run(svc, clock, 27, 3, lambda i: 85.0)
    assert svc.list_alerts(state="pending")
    run(svc, clock, 3, 3, lambda i: 75.0)
    assert not svc.list_alerts() and webhook.bodies() == []
    # Above again: fires exactly when 30 s have passed since it began to hold.
    run(svc, clock, 3, 3, lambda i: 85.0)
    began = clock.now_ns()
    run(svc, clock, 27, 3, lambda i: 85.0)
    assert webhook.bodies() == []
    run(svc, clock, 3, 3, lambda i: 85.0)
    assert statuses(webhook) == ["firing"]
    (firing,) = svc.list_alerts(state="firing")
    assert (clock.now_ns() - began) / 1e9 == 30
    assert firing["annotations"]["summary"] == "press-1 at 85.0 (limit 80)"


def test_resolved_notification_sent_once(make_service, webhook):
    clock = ManualClock(T0)
    svc = make_service([{**HOT, "for": "0s"}], route(group_wait="0s"), hook(webhook), clock)
    run(svc, clock, 30, 3, lambda i: 90.0)
    run(svc, clock, 600, 3, lambda i: 50.0)
    assert statuses(webhook) == ["firing", "resolved"]
    resolved = webhook.bodies()[1]["alerts"][0]
    assert resolved["status"] == "resolved" and resolved["endsAt"] > resolved["startsAt"]
    history = [h["event"] for h in svc.history(alertname="HotSpindle")]
    assert history[::-1][:3] == ["pending", "firing", "notified"]
    assert "resolved" in history


def test_restart_mid_firing_no_duplicate_no_lost_resolution(make_service, webhook):
    clock = ManualClock(T0)
    svc = make_service([HOT], route(), hook(webhook), clock)
    run(svc, clock, 120, 3, lambda i: 90.0)
    assert statuses(webhook) == ["firing"]
    svc.stop()
    # A new process on the same data directory: the alert is still firing, and the
    # notification log says the receiver knows.
    svc2 = make_service([HOT], route(), hook(webhook), clock)
    assert [a["state"] for a in svc2.list_alerts()] == ["firing"]
    run(svc2, clock, 600, 3, lambda i: 90.0)
    assert statuses(webhook) == ["firing"]
    run(svc2, clock, 300, 3, lambda i: 50.0)
    assert statuses(webhook) == ["firing", "resolved"]


def test_restart_before_resolution_was_delivered(make_service, webhook):
    clock = ManualClock(T0)
    svc = make_service([HOT], route(group_interval="5m"), hook(webhook), clock)
    run(svc, clock, 120, 3, lambda i: 90.0)
    assert statuses(webhook) == ["firing"]
    # Resolves, but the group's next flush is minutes away when the service stops.
    run(svc, clock, 6, 3, lambda i: 50.0)
    assert [a["state"] for a in svc.list_alerts()] == ["resolved"]
    svc.stop()
    assert statuses(webhook) == ["firing"]
    svc2 = make_service([HOT], route(group_interval="5m"), hook(webhook), clock)
    run(svc2, clock, 900, 3, None)
    assert statuses(webhook) == ["firing", "resolved"]


def test_restart_with_group_wait_zero_sends_pending_resolution_at_start(make_service, webhook):
    clock = ManualClock(T0)
    svc = make_service([HOT], route(group_wait="0s", group_interval="5m"), hook(webhook), clock)
    run(svc, clock, 60, 3, lambda i: 90.0)
    run(svc, clock, 6, 3, lambda i: 50.0)
    svc.stop()
    assert statuses(webhook) == ["firing"]
    svc2 = make_service([HOT], route(group_wait="0s", group_interval="5m"), hook(webhook), clock)
    assert svc2.wait_idle(5)
    assert statuses(webhook) == ["firing", "resolved"]
    run(svc2, clock, 900, 3, None)
    assert statuses(webhook) == ["firing", "resolved"]
