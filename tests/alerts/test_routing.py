"""Routing, grouping, silences, inhibition, acknowledgement and delivery failures, with
real receivers (HTTP webhook servers and an SMTP server)."""

from __future__ import annotations

import pytest

from millstream_cloud.alerts.clock import ManualClock
from millstream_cloud.alerts.labels import Matcher
from millstream_cloud.alerts.routing import Route
from millstream_cloud.alerts.settings import RouteConfig
from tests.alerts.conftest import T0, FakeDevice, reading
from tests.alerts.test_lifecycle import HOT, hook, route, run, statuses

FIRE_NOW = {**HOT, "for": "0s"}


def test_matchers_parse_and_match():
    labels = {"alertname": "X", "site": "plant-a", "device": "press-12"}
    assert Matcher.parse('site="plant-a"').matches(labels)
    assert Matcher.parse('site!="plant-b"').matches(labels)
    assert Matcher.parse('device=~"press-[0-9]+"').matches(labels)
    assert not Matcher.parse('device=~"press"').matches(labels)  # anchored, as Alertmanager
    assert Matcher.parse('device!~"lathe-.*"').matches(labels)
    assert Matcher.parse("severity=critical").matches({"severity": "critical"})
    with pytest.raises(ValueError):
        Matcher.parse("site plant-a")


def test_route_tree_first_match_and_continue():
    cfg = RouteConfig.model_validate(
        {
            "receiver": "default",
            "group_by": ["alertname"],
            "routes": [
                {"matchers": ['severity="critical"'], "receiver": "pager", "continue": True},
                {"matchers": ['site=~"plant-.*"'], "receiver": "plant", "group_by": ["site"]},
                {"matchers": ['site="plant-a"'], "receiver": "never"},
            ],
        }
    )
    root = Route.build(cfg)
    got = root.match({"alertname": "A", "severity": "critical", "site": "plant-a"})
    assert [r.receiver for r in got] == ["pager", "plant"]
    assert got[1].group_by == ["site"] and got[0].group_by == ["alertname"]
    assert [r.receiver for r in root.match({"alertname": "A", "site": "depot"})] == ["default"]


def test_routes_by_label_to_receivers_and_groups(make_service, webhook, webhook2):
    clock = ManualClock(T0)
    receivers = hook(webhook, "ops") + hook(webhook2, "plant-b-team")
    svc = make_service(
        [FIRE_NOW],
        route(
            receiver="ops",
            group_wait="0s",
            routes=[{"matchers": ['site="plant-b"'], "receiver": "plant-b-team"}],
        ),
        receivers,
        clock,
    )
    clock.advance(1)
    svc.observe_readings(
        [
            reading("press-1", "temp", 90, clock, site="plant-a"),
            reading("press-2", "temp", 91, clock, site="plant-a"),
            reading("press-9", "temp", 92, clock, site="plant-b"),
        ]
    )
    svc.tick()
    assert svc.wait_idle(5)
    # Alerts raised by one evaluation go out together in their group's first notification.
    run(svc, clock, 60, 3, None)
    a_bodies, b_bodies = webhook.bodies(), webhook2.bodies()
    assert [len(b["alerts"]) for b in a_bodies] == [2]
    # A new alert joining a group that already notified waits for group_interval.
    svc.observe_readings([reading("press-3", "temp", 93, clock, site="plant-a")])
    run(svc, clock, 30, 3, None)
    assert len(webhook.bodies()) == 1
    run(svc, clock, 30, 3, None)
    a_bodies = webhook.bodies()
    assert [len(b["alerts"]) for b in a_bodies] == [2, 3]
    assert a_bodies[1]["groupLabels"] == {"alertname": "HotSpindle", "site": "plant-a"}
    assert a_bodies[1]["commonLabels"]["site"] == "plant-a"
    assert "device" not in a_bodies[1]["commonLabels"]
    assert [b["alerts"][0]["labels"]["device"] for b in b_bodies] == ["press-9"]
    assert b_bodies[0]["receiver"] == "plant-b-team"
    body = a_bodies[0]
    for key in (
        "version",
        "groupKey",
        "status",
        "receiver",
        "groupLabels",
        "commonLabels",
        "commonAnnotations",
        "externalURL",
        "alerts",
    ):
        assert key in body
    assert body["version"] == "4"
    assert set(body["alerts"][0]) >= {
        "status",
        "labels",
        "annotations",
        "startsAt",
        "endsAt",
        "fingerprint",
    }


def test_silence_suppresses_and_expiry_restores(make_service, webhook):
    clock = ManualClock(T0)
    svc = make_service(
        [FIRE_NOW], route(group_wait="0s", group_interval="30s"), hook(webhook), clock
    )
    silence = svc.create_silence(
        ['device="press-1"'], created_by="maria", comment="bearing swap", duration="2h"
    )
    run(svc, clock, 600, 3, lambda i: 90.0)
    assert webhook.bodies() == []
    (alert,) = svc.list_alerts(state="firing")
    assert alert["status"]["silencedBy"] == [silence.id]
    # Another device is not silenced.
    svc.observe_readings([reading("press-2", "temp", 90, clock)])
    run(svc, clock, 30, 3, None)
    assert [b["alerts"][0]["labels"]["device"] for b in webhook.bodies()] == ["press-2"]
    svc.expire_silence(silence.id)
    run(svc, clock, 30, 3, lambda i: 90.0)
    last = webhook.bodies()[-1]
    assert sorted(a["labels"]["device"] for a in last["alerts"]) == ["press-1", "press-2"]
    assert svc.silence_json(svc.silences.get(silence.id))["status"]["state"] == "expired"


def test_inhibition_mutes_devices_of_offline_site(make_service, webhook):
    clock = ManualClock(T0)
    devices = [
        FakeDevice("press-1", "plant-a"),
        FakeDevice("press-2", "plant-a"),
        FakeDevice("press-9", "plant-b"),
        FakeDevice("press-8", "plant-b"),
    ]
    rules = [
        FIRE_NOW,
        {
            "name": "SiteOffline",
            "type": "offline",
            "scope": "site",
            "labels": {"severity": "critical"},
        },
        {"name": "DeviceOffline", "type": "offline", "scope": "device"},
    ]
    svc = make_service(
        rules,
        route(group_by=["alertname", "site"], group_wait="0s", group_interval="30s"),
        hook(webhook),
        clock,
        devices=lambda: devices,
        inhibit_rules=[
            {
                "source_matchers": ['alertname="SiteOffline"'],
                "target_matchers": ['alertname!="SiteOffline"'],
                "equal": ["site"],
            },
        ],
    )
    for d in devices:
        d.last_seen_ns = clock.now_ns()
    # plant-a goes down: both of its devices, while press-1 also runs hot.
    svc.observe_readings([reading("press-1", "temp", 95, clock)])
    devices[0].online = devices[1].online = False
    run(svc, clock, 120, 3, None)
    names = sorted({a["labels"]["alertname"] for b in webhook.bodies() for a in b["alerts"]})
    # The HotSpindle alert was sent before the site went down (same tick); every alert of
    # plant-a that comes after SiteOffline fires is muted.
    assert "SiteOffline" in names and "DeviceOffline" not in names
    inhibited = svc.list_alerts(inhibited=True)
    assert {a["labels"]["alertname"] for a in inhibited} >= {"DeviceOffline"}
    site_fp = next(
        a["fingerprint"] for a in svc.list_alerts() if a["labels"]["alertname"] == "SiteOffline"
    )
    assert all(a["status"]["inhibitedBy"] == [site_fp] for a in inhibited)
    # One of plant-b's devices goes down, the site stays up: not inhibited.
    devices[2].online = False
    run(svc, clock, 60, 3, None)
    devs = [
        a["labels"].get("device")
        for b in webhook.bodies()
        for a in b["alerts"]
        if a["labels"]["alertname"] == "DeviceOffline"
    ]
    assert devs == ["press-9"]


def test_acknowledged_alert_gets_no_reminders_but_resolution(make_service, webhook):
    clock = ManualClock(T0)
    svc = make_service(
        [FIRE_NOW],
        route(group_wait="0s", group_interval="30s", repeat_interval="2m"),
        hook(webhook),
        clock,
    )
    run(svc, clock, 30, 3, lambda i: 90.0)
    (alert,) = svc.list_alerts()
    svc.acknowledge(alert["fingerprint"], by="maria", comment="on it")
    run(svc, clock, 600, 3, lambda i: 90.0)
    assert statuses(webhook) == ["firing"]
    run(svc, clock, 60, 3, lambda i: 50.0)
    assert statuses(webhook) == ["firing", "resolved"]
    events = [h["event"] for h in svc.history(fingerprint=alert["fingerprint"])]
    assert "acknowledged" in events


def test_receiver_down_gets_retries_others_deliver(make_service, webhook, webhook2, smtp):
    clock = ManualClock(T0)
    webhook.status = 503  # down
    receivers = [
        {
            "name": "all",
            "webhook_configs": [{"url": webhook.url}, {"url": webhook2.url}],
            "email_configs": [
                {
                    "to": ["ops@example.org"],
                    "from": "millstream@example.org",
                    "smarthost": f"127.0.0.1:{smtp.port}",
                }
            ],
        }
    ]
    svc = make_service([FIRE_NOW], route(receiver="all", group_wait="0s"), receivers, clock)
    clock.advance(1)
    svc.observe_readings([reading("press-1", "temp", 90, clock)])
    # The healthy receivers deliver while the broken one is still being retried.
    assert len(webhook2.wait_for(1, timeout=5)) == 1
    assert len(smtp.wait_for(1, timeout=5)) == 1
    assert svc.wait_idle(10)
    assert webhook.attempts == 4  # max_attempts in the test settings
    msg = smtp.messages[0]
    assert "HotSpindle" in msg["Subject"] and "press-1" in msg.get_payload()
    from prometheus_client import generate_latest

    text = generate_latest(svc.metrics.registry).decode()
    assert (
        'millstream_alert_notifications_total{integration="webhook[0]",outcome="failed_attempt",receiver="all"} 4.0'
        in text
    )
    assert (
        'millstream_alert_notifications_total{integration="webhook[0]",outcome="dropped",receiver="all"} 1.0'
        in text
    )
    assert (
        'millstream_alert_notifications_total{integration="webhook[1]",outcome="success",receiver="all"} 1.0'
        in text
    )
    # The receiver comes back: the group's next flush delivers to it, not again to others.
    webhook.status = 200
    run(svc, clock, 300, 3, None)
    assert len(webhook.bodies()) == 1
    assert len(webhook2.bodies()) == 1 and len(smtp.messages) == 1


def test_receiver_recovers_within_retries(make_service, webhook):
    clock = ManualClock(T0)
    webhook.status = 500
    svc = make_service([FIRE_NOW], route(group_wait="0s"), hook(webhook), clock)
    clock.advance(1)
    svc.observe_readings([reading("press-1", "temp", 90, clock)])
    import time

    time.sleep(0.08)
    webhook.status = 200
    assert svc.wait_idle(10)
    assert statuses(webhook) == ["firing"] and webhook.attempts >= 2


def test_resolution_survives_a_receiver_down_past_all_retries(make_service, webhook):
    clock = ManualClock(T0)
    svc = make_service(
        [FIRE_NOW], route(group_wait="0s", group_interval="30s"), hook(webhook), clock
    )
    run(svc, clock, 3, 3, lambda i: 90.0)
    webhook.status = 503
    run(svc, clock, 30, 3, lambda i: 50.0)  # resolves; every attempt to tell fails
    assert webhook.attempts == 1 + 4
    webhook.status = 200
    run(svc, clock, 60, 3, None)
    assert statuses(webhook) == ["firing", "resolved"]


def test_site_outage_is_one_notification_per_site_not_a_storm(make_service, webhook):
    clock = ManualClock(T0)
    devices = [FakeDevice(f"m-{i:03d}", f"site-{i % 5}", True, T0) for i in range(500)]
    rules = [
        FIRE_NOW,
        {"name": "SiteOffline", "type": "offline", "scope": "site", "for": "30s"},
        {"name": "DeviceOffline", "type": "offline", "scope": "device", "for": "30s"},
        {"name": "NoData", "type": "no_data", "metric": "temp", "after": "1m"},
    ]
    svc = make_service(
        rules,
        route(group_by=["alertname", "site"], group_wait="30s", group_interval="5m"),
        hook(webhook),
        clock,
        devices=lambda: devices,
        inhibit_rules=[
            {
                "source_matchers": ['alertname="SiteOffline"'],
                "target_matchers": ['alertname!="SiteOffline"'],
                "equal": ["site"],
            }
        ],
    )
    svc.observe_readings([reading(d.id, "temp", 20.0, clock, site=d.site) for d in devices])
    for d in devices:
        d.online = False  # the broker delivered every last will: all five sites are down
    run(svc, clock, 600, 5, None)
    bodies = webhook.bodies()
    assert sorted(b["groupLabels"]["site"] for b in bodies) == [f"site-{i}" for i in range(5)]
    assert all(b["groupLabels"]["alertname"] == "SiteOffline" for b in bodies)
    assert len(svc.list_alerts(state="firing")) == 5 + 500 + 500
    assert len(svc.list_alerts(inhibited=True)) == 1000


@pytest.mark.parametrize(
    ("api", "alerts", "url"),
    [
        ({}, {}, "http://127.0.0.1:8000"),
        ({"port": 8765}, {}, "http://127.0.0.1:8765"),
        ({"host": "::1", "port": 9000}, {}, "http://[::1]:9000"),
        ({"port": 8765}, {"external_url": "https://ops.example/ms"}, "https://ops.example/ms"),
    ],
)
def test_notifications_link_to_the_api_where_it_listens_unless_told(api, alerts, url):
    from millstream_cloud.settings import load_settings

    settings = load_settings(overrides={"api": api, "alerts": alerts}, environ={})
    assert settings.alerts.external_url == url


def test_a_wildcard_bind_is_linked_by_host_name():
    import socket

    from millstream_cloud.settings import api_url

    assert api_url("0.0.0.0", 8000) == f"http://{socket.gethostname()}:8000"
