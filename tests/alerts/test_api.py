"""The HTTP API (/api/v1/alerts, /rules, /silences) on the real app, and the wiring into
Services: readings through the real ingest pipeline, device status from the registry,
delivery metrics on /metrics."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from millstream_cloud.alerts.service import AlertService
from millstream_cloud.alerts.settings import AlertSettings
from millstream_cloud.api import ROUTERS
from millstream_cloud.api import alerts as alerts_api
from millstream_cloud.app import create_app
from millstream_cloud.ingest.pipeline import Message
from millstream_cloud.model import Anomaly
from millstream_cloud.protocol import format_ts
from millstream_cloud.services import Services
from millstream_cloud.settings import Settings
from millstream_cloud.storage.base import ALERTS, SeriesQuery
from tests.alerts.conftest import WebhookServer, write_rules

RULE = {
    "name": "HotSpindle",
    "type": "threshold",
    "metric": "temp",
    "threshold": 80,
    "clear": 70,
    "labels": {"severity": "critical"},
}


def wire(
    settings_kwargs: dict[str, Any], alert_settings: dict[str, Any]
) -> tuple[Services, AlertService]:
    """Services with an AlertService, whether or not Services already builds one."""
    if "alerts" in Settings.model_fields:  # wired into the service settings
        settings = Settings(**settings_kwargs, alerts=alert_settings)
        services = Services.build(settings, with_subscriber=False)
        svc = getattr(services, "alerts", None) or services.extras["alerts"]
        assert isinstance(svc, AlertService)
        return services, svc
    settings = Settings(**settings_kwargs)
    services = Services.build(settings, with_subscriber=False)
    return services, AlertService.for_services(
        services, AlertSettings.model_validate(alert_settings)
    )


def make_app(services: Services) -> Any:
    app = create_app(services.settings, services, start=False)
    if alerts_api.router not in ROUTERS:
        app.include_router(alerts_api.router)
    return app


@pytest.fixture
def app(
    tmp_path: Path, webhook: WebhookServer
) -> Iterator[tuple[TestClient, Services, AlertService]]:
    services, svc = wire(
        {"data_dir": str(tmp_path / "data")},
        {
            "rule_files": [write_rules(tmp_path / "rules.yaml", [RULE])],
            "route": {"receiver": "hook", "group_wait": "0s", "group_by": ["alertname"]},
            "receivers": [{"name": "hook", "webhook_configs": [{"url": webhook.url}]}],
        },
    )
    with TestClient(make_app(services)) as client:
        yield client, services, svc
    svc.stop()


def telemetry(device: str, seq: int, value: float, metric: str = "temp") -> Message:
    now = time.time_ns()
    body = {
        "v": 1,
        "device": device,
        "seq": seq,
        "readings": [{"ts": format_ts(now), "metric": metric, "value": value}],
    }
    return Message(f"millstream/v1/plant-a/{device}/telemetry", json.dumps(body).encode(), now)


def test_reading_through_pipeline_raises_alert_listed_and_notified(app, webhook):
    client, services, svc = app
    seen: list[dict[str, Any]] = []
    svc.listeners.append(seen.append)  # e.g. Grafana annotations
    services.pipeline.process([telemetry("press-1", 1, 95.0)])
    (alert,) = client.get("/api/v1/alerts").json()["alerts"]
    assert alert["state"] == "firing" and alert["labels"]["device"] == "press-1"
    assert alert["receivers"] == ["hook"]
    assert webhook.wait_for(1)[0]["alerts"][0]["fingerprint"] == alert["fingerprint"]
    assert client.get("/api/v1/alerts", params={"state": "pending"}).json()["alerts"] == []
    assert (
        len(client.get("/api/v1/alerts", params={"filter": 'device="press-1"'}).json()["alerts"])
        == 1
    )
    assert client.get("/api/v1/alerts", params={"filter": 'device="other"'}).json()["alerts"] == []
    assert (
        client.get("/api/v1/alerts", params={"state": "burning"}).json()["detail"][0]["field"]
        == "state"
    )
    fp = alert["fingerprint"]
    assert client.get(f"/api/v1/alerts/{fp}").json()["fingerprint"] == fp
    assert client.get("/api/v1/alerts/0000").status_code == 404
    # acknowledge
    assert client.post(f"/api/v1/alerts/{fp}/ack", json={}).json()["detail"][0]["field"] == "by"
    acked = client.post(f"/api/v1/alerts/{fp}/ack", json={"by": "maria", "comment": "on it"}).json()
    assert acked["status"]["acknowledged"] and acked["acknowledgement"]["by"] == "maria"
    assert (
        client.get("/api/v1/alerts", params={"acknowledged": "true"}).json()["alerts"][0][
            "fingerprint"
        ]
        == fp
    )
    # resolve, then history
    services.pipeline.process([telemetry("press-1", 2, 60.0)])
    assert client.get(f"/api/v1/alerts/{fp}").json()["state"] == "resolved"
    events = client.get("/api/v1/alerts/history", params={"fingerprint": fp}).json()["events"]
    assert [e["event"] for e in events][::-1][:4] == [
        "pending",
        "firing",
        "notified",
        "acknowledged",
    ]
    assert events[0]["event"] in ("resolved", "notified")
    # A span that ends before it starts is refused, not answered "nothing happened".
    res = client.get(
        "/api/v1/alerts/history",
        params={"since": "2026-03-01T09:00:00Z", "until": "2026-03-01T08:00:00Z"},
    )
    assert res.status_code == 422 and res.json()["detail"]["field"] == "until"
    svc.tick(time.time_ns() + 300 * 10**9)  # the group's next flush sends the resolution
    assert [b["status"] for b in webhook.wait_for(2)] == ["firing", "resolved"]
    assert svc.wait_idle(5)
    # Transitions are in the `alerts` measurement the dashboards query.
    series = services.storage.query(
        SeriesQuery(
            ALERTS, ["value", "summary"], {"device": "press-1"}, 0, 2**62, group_by=["state"]
        )
    )
    by_state = {(s.tags or {}).get("state"): s for s in series if s.field == "value"}
    assert set(by_state) == {"firing", "resolved"}
    assert [v for _, v in by_state["firing"].points] == [95.0]
    assert [(e["state"], e["fingerprint"]) for e in seen] == [("firing", fp), ("resolved", fp)]
    metrics = client.get("/metrics").text
    assert (
        'millstream_alert_notifications_total{integration="webhook[0]",outcome="success",receiver="hook"} 2.0'
        in metrics
    )
    assert "millstream_alert_transitions_total" in metrics


def test_device_offline_from_last_will(tmp_path, app, webhook):
    client, services, svc = app
    svc.put_rule({"name": "DeviceOffline", "type": "offline"}, create=True)
    services.pipeline.process([telemetry("press-2", 1, 20.0)])
    status = {"v": 1, "device": "press-2", "state": "offline", "reason": "connection-lost"}
    services.pipeline.process(
        [
            Message(
                "millstream/v1/plant-a/press-2/status", json.dumps(status).encode(), time.time_ns()
            )
        ]
    )
    svc.tick()
    (alert,) = client.get("/api/v1/alerts", params={"filter": 'alertname="DeviceOffline"'}).json()[
        "alerts"
    ]
    assert alert["labels"] == {"alertname": "DeviceOffline", "device": "press-2", "site": "plant-a"}
    assert alert["annotations"]["summary"] == "press-2 is offline"


def test_rules_crud_with_errors_naming_the_field(app):
    client, _, svc = app
    rules = client.get("/api/v1/rules").json()["rules"]
    assert [r["name"] for r in rules] == ["HotSpindle"] and rules[0]["source"].startswith("file:")
    bad = client.post("/api/v1/rules", json={"name": "Vib", "type": "threshold", "metric": "vib"})
    assert bad.status_code == 422
    assert bad.json()["detail"] == [{"field": "threshold", "message": "field required"}]
    bad = client.post(
        "/api/v1/rules",
        json={"name": "Vib", "type": "threshold", "metric": "vib", "threshold": 7, "for": "soon"},
    )
    assert bad.json()["detail"][0]["field"] == "for"
    rule = {
        "name": "Vib",
        "type": "threshold",
        "metric": "vib",
        "threshold": 7.1,
        "clear": 4.5,
        "for": "1m",
    }
    created = client.post("/api/v1/rules", json=rule)
    assert created.status_code == 201 and created.json()["source"] == "api"
    assert client.post("/api/v1/rules", json=rule).status_code == 409
    assert client.get("/api/v1/rules/Vib").json()["threshold"] == 7.1
    replaced = client.put("/api/v1/rules/Vib", json={**rule, "threshold": 9})
    assert replaced.status_code == 200 and replaced.json()["threshold"] == 9
    assert (
        client.put("/api/v1/rules/Vib", json={**rule, "name": "Other"}).json()["detail"][0]["field"]
        == "name"
    )
    assert client.put("/api/v1/rules/Nope", json={**rule, "name": "Nope"}).status_code == 404
    assert client.put("/api/v1/rules/HotSpindle", json={**RULE}).status_code == 409
    assert client.delete("/api/v1/rules/HotSpindle").status_code == 409
    # API rules persist across a restart of the alert service.
    again = AlertService(svc.settings, tmp_path_of(svc))
    try:
        assert "Vib" in {r["name"] for r in again.rules()}
    finally:
        again.stop()
    assert client.delete("/api/v1/rules/Vib").status_code == 204
    assert client.get("/api/v1/rules/Vib").status_code == 404


def tmp_path_of(svc: AlertService) -> Path:
    return svc.data_dir


def test_silences_create_list_expire(app, webhook):
    client, services, svc = app
    bad = client.post(
        "/api/v1/silences",
        json={"matchers": ['device="press-1"'], "duration": "1h", "createdBy": "maria"},
    )
    assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "comment"
    bad = client.post(
        "/api/v1/silences",
        json={
            "matchers": ["device press-1"],
            "duration": "1h",
            "createdBy": "maria",
            "comment": "x",
        },
    )
    assert bad.json()["detail"][0]["field"] == "matchers"
    bad = client.post(
        "/api/v1/silences",
        json={"matchers": ['device=~".*"'], "duration": "1h", "createdBy": "maria", "comment": "x"},
    )
    assert bad.json()["detail"][0]["field"] == "matchers"
    created = client.post(
        "/api/v1/silences",
        json={
            "matchers": [{"name": "device", "value": "press-1", "isRegex": False}],
            "duration": "2h",
            "createdBy": "maria",
            "comment": "bearing swap",
        },
    )
    assert created.status_code == 201
    sid = created.json()["id"]
    assert created.json()["status"]["state"] == "active"
    assert created.json()["matchersText"] == ['device="press-1"']
    services.pipeline.process([telemetry("press-1", 1, 95.0)])
    (alert,) = client.get("/api/v1/alerts").json()["alerts"]
    assert alert["status"]["silencedBy"] == [sid]
    assert svc.wait_idle(5) and webhook.bodies() == []
    assert [
        s["id"]
        for s in client.get("/api/v1/silences", params={"state": "active"}).json()["silences"]
    ] == [sid]
    expired = client.delete(f"/api/v1/silences/{sid}")
    assert expired.json()["status"]["state"] == "expired"
    assert client.get(f"/api/v1/silences/{sid}").json()["status"]["state"] == "expired"
    assert client.delete("/api/v1/silences/nope").status_code == 404
    svc.tick(time.time_ns() + 300 * 10**9)  # the group's next flush (group_interval)
    assert webhook.wait_for(1)[0]["alerts"][0]["labels"]["device"] == "press-1"


def test_no_alert_service_is_503(tmp_path):
    services, svc = wire({"data_dir": str(tmp_path / "d")}, {})
    svc.stop()
    services.extras.pop("alerts")
    if hasattr(services, "alerts"):
        services.alerts = None
    with TestClient(make_app(services)) as client:
        assert client.get("/api/v1/alerts").status_code == 503


class SpikeDetector:
    """Stands in for the detection engine: anything above 1000 is an anomaly."""

    def observe(self, readings: list[Any]) -> list[Anomaly]:
        return [
            Anomaly(
                r.device,
                r.site,
                r.time_ns,
                "spike",
                9.0,
                0.999,
                metric=r.metric,
                explanation=f"{r.metric} jumped to {r.value:g}",
            )
            for r in readings
            if r.value > 1000
        ]


def test_anomaly_from_detector_raises_alert(app, webhook):
    client, services, svc = app
    svc.put_rule(
        {
            "name": "Anomaly",
            "type": "anomaly",
            "min_likelihood": 0.99,
            "annotations": {"summary": "{device}: {explanation}"},
        },
        create=True,
    )
    services.anomalies.detector = SpikeDetector()
    services.pipeline.process([telemetry("press-3", 1, 5000.0, metric="vib")])
    (alert,) = client.get("/api/v1/alerts", params={"filter": 'alertname="Anomaly"'}).json()[
        "alerts"
    ]
    assert alert["labels"] == {
        "alertname": "Anomaly",
        "device": "press-3",
        "site": "plant-a",
        "metric": "vib",
    }
    assert alert["annotations"]["summary"] == "press-3: vib jumped to 5000"
    assert alert["state"] == "firing"
    svc.tick()
    assert "millstream_alerts_firing 1.0" in client.get("/metrics").text
