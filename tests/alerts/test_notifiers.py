"""Notifiers against real servers: Prometheus Alertmanager (Debian's binary), Mosquitto,
apprise (its json:// service, to a local HTTP server) and the log file."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from millstream_cloud.alerts.clock import ManualClock, SystemClock
from millstream_cloud.alerts.notifiers.base import AlertSnapshot, Notification
from tests.alerts.conftest import T0, WebhookServer, reading
from tests.alerts.test_lifecycle import HOT, route, run
from tests.support.servers import ServerProcess, find_binary, free_port

FIRE_NOW = {**HOT, "for": "0s"}

AM_CONFIG = """\
route:
  receiver: blackhole
  group_wait: 1h
receivers:
  - name: blackhole
"""


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[ServerProcess]:
    binary = find_binary("prometheus-alertmanager") or find_binary("alertmanager")
    if binary is None:
        pytest.skip(
            "prometheus-alertmanager is not installed (apt-get install prometheus-alertmanager)"
        )
    work = tmp_path / "alertmanager"
    (work / "data").mkdir(parents=True)
    (work / "alertmanager.yml").write_text(AM_CONFIG)
    port = free_port()
    server = ServerProcess(
        [
            binary,
            f"--config.file={work / 'alertmanager.yml'}",
            f"--storage.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
            "--log.level=warn",
        ],
        port,
        work,
        work / "alertmanager.log",
    ).start()
    try:
        yield server
    finally:
        server.stop()


def am_alerts(port: int, active: bool = True) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v2/alerts?active={'true' if active else 'false'}&silenced=true&inhibited=true&unprocessed=true"
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def wait_until(predicate: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.05)
    return predicate()


@pytest.mark.integration
def test_forwarding_to_real_alertmanager(make_service, alertmanager):
    clock = SystemClock()
    receivers = [
        {
            "name": "am",
            "alertmanager_configs": [
                {"url": f"http://127.0.0.1:{alertmanager.port}", "resend_interval": "1s"}
            ],
        }
    ]
    svc = make_service(
        [FIRE_NOW], route(receiver="am", group_wait="0s", group_interval="1s"), receivers, clock
    )  # type: ignore[arg-type]
    svc.observe_readings(
        [reading("press-1", "temp", 90.0, clock), reading("press-2", "temp", 91.0, clock)]
    )  # type: ignore[arg-type]
    assert svc.wait_idle(5)
    got = wait_until(
        lambda: [
            a for a in am_alerts(alertmanager.port) if a["labels"].get("alertname") == "HotSpindle"
        ]
    )
    assert sorted(a["labels"]["device"] for a in got) == ["press-1", "press-2"]
    ours = {a["fingerprint"]: a for a in svc.list_alerts()}
    for a in got:
        # Same labels, same fingerprint: Alertmanager computes it as we do.
        assert a["fingerprint"] in ours
        assert a["labels"] == ours[a["fingerprint"]]["labels"]
        assert a["labels"]["severity"] == "critical"
        assert a["annotations"]["summary"].startswith(a["labels"]["device"])
        assert a["status"]["state"] == "active"
    # Re-sent while firing: still active well past the first post.
    time.sleep(1.5)
    assert (
        len(
            [
                a
                for a in am_alerts(alertmanager.port)
                if a["labels"].get("alertname") == "HotSpindle"
            ]
        )
        == 2
    )
    # press-1 cools down: resolved in Alertmanager too (endsAt in the past).
    svc.observe_readings([reading("press-1", "temp", 50.0, clock)])  # type: ignore[arg-type]
    time.sleep(1.1)
    svc.tick()
    assert svc.wait_idle(5)
    # Alertmanager lists only unresolved alerts: press-1 leaves the list, press-2 stays.
    assert wait_until(
        lambda: (
            not [a for a in am_alerts(alertmanager.port) if a["labels"].get("device") == "press-1"]
        )
    )
    remaining = [
        a["labels"]["device"]
        for a in am_alerts(alertmanager.port)
        if a["labels"].get("alertname") == "HotSpindle"
    ]
    assert remaining == ["press-2"]


@pytest.mark.integration
def test_mqtt_notifier_publishes_payload(make_service, mosquitto):
    import paho.mqtt.client as mqtt

    got: list[Any] = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    sub.on_message = lambda c, u, m: got.append((m.topic, json.loads(m.payload)))
    sub.connect("127.0.0.1", mosquitto.port)
    sub.subscribe("millstream/alerts/#", qos=1)
    sub.loop_start()
    try:
        time.sleep(0.2)
        clock = ManualClock(T0)
        receivers = [
            {
                "name": "ops",
                "mqtt_configs": [
                    {
                        "broker": f"mqtt://127.0.0.1:{mosquitto.port}",
                        "topic": "millstream/alerts/{receiver}/{site}",
                    }
                ],
            }
        ]
        svc = make_service([FIRE_NOW], route(receiver="ops", group_wait="0s"), receivers, clock)
        run(svc, clock, 3, 3, lambda i: 90.0)
        assert wait_until(lambda: got, 5)
        topic, payload = got[0]
        assert topic == "millstream/alerts/ops/plant-a"
        assert (
            payload["status"] == "firing" and payload["alerts"][0]["labels"]["device"] == "press-1"
        )
    finally:
        sub.loop_stop()
        sub.disconnect()


def test_apprise_notifier(make_service, webhook: WebhookServer):
    pytest.importorskip("apprise")
    clock = ManualClock(T0)
    receivers = [
        {"name": "chat", "apprise_configs": [{"urls": [f"json://127.0.0.1:{webhook.port}/chat"]}]}
    ]
    svc = make_service([FIRE_NOW], route(receiver="chat", group_wait="0s"), receivers, clock)
    run(svc, clock, 3, 3, lambda i: 90.0)
    (body,) = webhook.wait_for(1)
    assert "HotSpindle" in body["title"] and "press-1" in body["message"]


def test_logfile_notifier(make_service, tmp_path):
    clock = ManualClock(T0)
    receivers = [{"name": "log", "logfile_configs": [{"path": "alerts.log"}]}]
    svc = make_service(
        [FIRE_NOW], route(receiver="log", group_wait="0s", group_interval="30s"), receivers, clock
    )
    run(svc, clock, 30, 3, lambda i: 90.0)
    run(svc, clock, 30, 3, lambda i: 50.0)
    lines = [json.loads(x) for x in (tmp_path / "data" / "alerts.log").read_text().splitlines()]
    assert [x["status"] for x in lines] == ["firing", "resolved"]
    assert lines[0]["version"] == "4" and lines[0]["receiver"] == "log"


def test_bad_receiver_config_names_the_key():
    from millstream_cloud.alerts.settings import AlertSettings

    with pytest.raises(ValueError) as info:
        AlertSettings.model_validate(
            {"receivers": [{"name": "log", "webhook_configs": [{"ur": "x"}]}]}
        )
    assert "webhook_configs[0].url" in str(
        info.value
    ) and "webhook_configs[0].ur: unknown key" in str(info.value)
    with pytest.raises(ValueError) as info:
        AlertSettings.model_validate({"receivers": [{"name": "log", "pager_configs": []}]})
    assert "pager_configs: unknown key" in str(info.value)
    with pytest.raises(ValueError) as info:
        AlertSettings.model_validate({"route": {"receiver": "nobody"}})
    assert "route.receiver: no receiver named 'nobody'" in str(info.value)


def test_webhook_shortcut_setting_adds_a_receiver(make_service, webhook, tmp_path):
    clock = ManualClock(T0)
    receivers = [{"name": "log", "logfile_configs": [{"path": "alerts.log"}]}]
    svc = make_service(
        [FIRE_NOW], route(receiver="log", group_wait="0s"), receivers, clock, webhook=webhook.url
    )
    run(svc, clock, 3, 3, lambda i: 90.0)
    assert webhook.wait_for(1)[0]["receiver"] == "log"
    assert (tmp_path / "data" / "alerts.log").read_text().count("\n") == 1


def test_rule_files_from_the_environment_are_comma_separated():
    from millstream_cloud.alerts.settings import AlertSettings

    s = AlertSettings.model_validate({"rule_files": "default, /etc/millstream/plant.yaml"})
    assert s.rule_files == ["default", "/etc/millstream/plant.yaml"]


def test_a_resolved_alert_says_how_long_it_lasted() -> None:
    snap = AlertSnapshot(
        fingerprint="f",
        status="resolved",
        labels={"alertname": "HotSpindle", "device": "press-1"},
        annotations={"summary": "press-1 at 90.0"},
        starts_at=T0,
        ends_at=T0 + (14 * 60 + 3) * 10**9 + 400_000_000,
    )
    note = Notification(receiver="mail", group_key="k", group_labels={}, alerts=[snap])
    assert note.text().splitlines()[-1].endswith(", after 14m3s")
