"""An alert links the Grafana dashboard its reader opens first, around the alert's time."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from millstream_cloud.alerts.clock import ManualClock
from millstream_cloud.alerts.notifiers.base import AlertSnapshot, Notification
from millstream_cloud.alerts.rules import RuleError, parse_rule
from millstream_cloud.alerts.settings import AlertSettings
from millstream_cloud.model import Anomaly, Contribution
from tests.alerts.conftest import T0, FakeDevice, WebhookServer
from tests.alerts.test_lifecycle import HOT, hook, route, run

DASHBOARDS = Path(__file__).resolve().parents[2] / "dashboards"
GRAFANA = "https://grafana.plant-a.example:3000/"


def link(url: str) -> tuple[str, dict[str, str]]:
    """The dashboard uid a link opens and its query parameters."""
    parts = urlsplit(url)
    assert url.startswith("https://grafana.plant-a.example:3000/d/")
    return parts.path.removeprefix("/d/"), {k: v[0] for k, v in parse_qs(parts.query).items()}


def dashboard_variables(uid: str) -> set[str]:
    """The template variables of the committed dashboard with this uid."""
    for path in DASHBOARDS.glob("*.json"):
        board = json.loads(path.read_text())
        if board["uid"] == uid:
            return {v["name"] for v in board["templating"]["list"]}
    raise AssertionError(f"no dashboard with uid {uid!r} in {DASHBOARDS}")


def test_a_device_alert_links_its_device_dashboard_from_before_it_began(
    make_service, webhook: WebhookServer
) -> None:
    clock = ManualClock(T0)
    svc = make_service([HOT], route(group_wait="0s"), hook(webhook), clock, grafana_url=GRAFANA)
    run(svc, clock, 60, 3, lambda i: 90.0)  # pending from the first reading, firing at 30 s
    (alert,) = svc.list_alerts(state="firing")
    uid, params = link(alert["annotations"]["dashboard_url"])
    # The committed dashboard it names, with the variables it sets: a link that opens.
    assert {k.removeprefix("var-") for k in params if k.startswith("var-")} <= (
        dashboard_variables(uid)
    )
    assert uid == "millstream-device"
    assert params["var-device"] == "press-1" and params["var-site"] == "plant-a"
    assert params["var-metric"] == "temp"
    began_ms = (T0 + 3 * 10**9) // 10**6  # the first reading over the threshold
    assert int(params["from"]) == began_ms - 3_600_000 and params["to"] == "now"
    # The webhook receives it as an annotation, the e-mail's text as a line.
    (body,) = webhook.bodies()
    assert (
        body["alerts"][0]["annotations"]["dashboard_url"] == alert["annotations"]["dashboard_url"]
    )
    run(svc, clock, 60, 3, lambda i: 60.0)
    (resolved,) = svc.list_alerts(state="resolved")
    _, params = link(resolved["annotations"]["dashboard_url"])
    # A resolved alert's link ends a quarter of an hour after it did.
    ended = datetime.fromisoformat(resolved["endsAt"].replace("Z", "+00:00"))
    assert int(params["to"]) == round(ended.timestamp() * 1000) + 900_000


def test_a_replayed_anomaly_links_from_before_its_own_time(make_service, webhook) -> None:
    # A judgement on a replay reports a fault hours after it began: the link starts an hour
    # before the anomaly, not before the alert.
    clock = ManualClock(T0)
    rule = {"name": "AnomalyDetected", "type": "anomaly", "min_likelihood": 0.9}
    svc = make_service([rule], route(group_wait="0s"), hook(webhook), clock, grafana_url=GRAFANA)
    three_hours_ago = clock.now_ns() - 3 * 3600 * 10**9
    svc.observe_anomalies(
        [
            Anomaly(
                "pump-2",
                "plant-a",
                three_hours_ago,
                "device_model",
                9.0,
                0.999,
                metric="fluid_temp_c",
                contributions=[Contribution("fluid_temp_c", 60, 55, 7.1)],
            )
        ]
    )
    (alert,) = svc.list_alerts(state="firing")
    uid, params = link(alert["annotations"]["dashboard_url"])
    assert uid == "millstream-device" and params["var-metric"] == "fluid_temp_c"
    assert int(params["from"]) == three_hours_ago // 10**6 - 3_600_000


def test_a_site_alert_links_the_fleet_dashboard(make_service, webhook) -> None:
    clock = ManualClock(T0)
    devices = [FakeDevice("press-1", "plant-a", online=False, last_seen_ns=T0)]
    rule = {"name": "SiteOffline", "type": "offline", "scope": "site"}
    svc = make_service(
        [rule], route(group_wait="0s"), hook(webhook), clock, lambda: devices, grafana_url=GRAFANA
    )
    run(svc, clock, 10, 1, None)
    (alert,) = svc.list_alerts(state="firing")
    uid, params = link(alert["annotations"]["dashboard_url"])
    assert uid == "millstream-fleet" and params["var-site"] == "plant-a"
    assert {k.removeprefix("var-") for k in params if k.startswith("var-")} <= (
        dashboard_variables(uid)
    )


def test_without_grafana_url_nothing_is_linked(make_service, webhook) -> None:
    plain_clock = ManualClock(T0)
    plain = make_service([HOT], route(), hook(webhook), plain_clock)
    run(plain, plain_clock, 60, 3, lambda i: 90.0)
    assert all("dashboard_url" not in a["annotations"] for a in plain.list_alerts())


def test_the_link_is_a_template_variable_of_annotations_and_not_of_labels() -> None:
    rule = parse_rule({**HOT, "annotations": {"graph": "see {dashboard_url}"}})
    assert rule.annotations["graph"] == "see {dashboard_url}"
    with pytest.raises(RuleError, match="identity"):
        parse_rule({**HOT, "labels": {"where": "{dashboard_url}"}})
    with pytest.raises(ValueError, match="grafana_url"):
        AlertSettings.model_validate({"grafana_url": "grafana:3000"})


def test_the_notification_text_carries_the_link() -> None:
    snap = AlertSnapshot(
        fingerprint="f",
        status="firing",
        labels={"alertname": "HotSpindle", "device": "press-1"},
        annotations={"summary": "press-1 at 90.0", "dashboard_url": GRAFANA + "d/x"},
        starts_at=T0,
        ends_at=None,
    )
    note = Notification(receiver="mail", group_key="k", group_labels={}, alerts=[snap])
    assert f"  dashboard: {GRAFANA}d/x" in note.text().splitlines()
