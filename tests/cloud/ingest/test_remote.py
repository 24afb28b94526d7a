"""Remote config (desired retained, reported recorded) and commands with results or 504."""

from __future__ import annotations

import json
import time

import httpx
import paho.mqtt.client as mqtt

from tests.cloud.ingest.conftest import NS, batch, telemetry_topic, wait_until

PREFIX = "millstream/v1/plant1/dev-r/"


class FakeAgent:
    """Applies desired config (rejecting unknown keys) and answers the ``ping`` command."""

    def __init__(self, broker_url: str) -> None:
        self.desired: list[dict] = []
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id="dev-r", protocol=mqtt.MQTTv5
        )
        self.client.on_message = self.on_message
        self.client.connect("127.0.0.1", int(broker_url.rsplit(":", 1)[1]))
        self.client.subscribe([(PREFIX + "config/desired", 1), (PREFIX + "cmd/+", 1)])
        self.client.loop_start()

    def on_message(self, client, userdata, msg) -> None:  # type: ignore[no-untyped-def]
        body = json.loads(msg.payload)
        if msg.topic.endswith("config/desired"):
            self.desired.append({"retain": msg.retain, **body})
            ok = set(body["config"]) <= {"interval_s"}
            rep = {"v": 1, "revision": body["revision"], "status": "accepted" if ok else "rejected"}
            if not ok:
                rep["reason"] = "unknown key"
            client.publish(PREFIX + "config/reported", json.dumps(rep), qos=1, retain=True)
        elif msg.topic.endswith("cmd/ping"):
            res = {"v": 1, "id": body["id"], "ok": True, "result": {"pong": body["args"]}}
            client.publish(PREFIX + "cmd/ping/result", json.dumps(res), qos=1)
        elif msg.topic.endswith("cmd/fail"):
            res = {"v": 1, "id": body["id"], "ok": False, "error": "not supported"}
            client.publish(PREFIX + "cmd/fail/result", json.dumps(res), qos=1)
        # cmd/slow: never answered

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_config_and_commands(make_cloud, publisher, broker_url):
    cloud = make_cloud()
    publisher.publish(telemetry_topic("dev-r"), batch("dev-r", 0, time.time_ns() - NS))
    publisher.flush()
    wait_until(lambda: httpx.get(cloud.url + "/api/v1/devices/dev-r").status_code == 200)
    assert cloud.get("/api/v1/devices/dev-r/config") == {
        "device": "dev-r", "desired": None, "reported": None,
    }  # fmt: skip
    # desired before the agent is connected: retained, so it gets it when it connects
    r = httpx.put(cloud.url + "/api/v1/devices/dev-r/config", json={"config": {"interval_s": 5}})
    assert r.status_code == 200 and r.json()["desired"]["revision"] == 1
    agent = FakeAgent(broker_url)
    try:
        wait_until(lambda: cloud.get("/api/v1/devices/dev-r/config")["reported"] is not None)
        cfg = cloud.get("/api/v1/devices/dev-r/config")
        assert agent.desired[0] == {
            "retain": True,
            "v": 1,
            "revision": 1,
            "config": {"interval_s": 5},
        }
        assert cfg["reported"]["revision"] == 1 and cfg["reported"]["status"] == "accepted"
        assert cfg["in_sync"] is True
        r = httpx.put(cloud.url + "/api/v1/devices/dev-r/config", json={"colour": "red"})
        assert r.json()["desired"] == {
            **r.json()["desired"],
            "revision": 2,
            "config": {"colour": "red"},
        }
        wait_until(lambda: cloud.get("/api/v1/devices/dev-r/config")["reported"]["revision"] == 2)
        cfg = cloud.get("/api/v1/devices/dev-r/config")
        assert (
            cfg["reported"]["status"] == "rejected" and cfg["reported"]["reason"] == "unknown key"
        )
        assert cfg["in_sync"] is False

        r = httpx.post(
            cloud.url + "/api/v1/devices/dev-r/commands/ping", json={"args": {"n": 1}}, timeout=20
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["ok"] is True and body["result"] == {"pong": {"n": 1}} and body["id"]
        r = httpx.post(cloud.url + "/api/v1/devices/dev-r/commands/fail", timeout=20)
        assert r.status_code == 200 and r.json()["ok"] is False
        assert r.json()["error"] == "not supported"
        t0 = time.monotonic()
        r = httpx.post(
            cloud.url + "/api/v1/devices/dev-r/commands/slow", params={"timeout": 1}, timeout=20
        )
        assert r.status_code == 504 and r.json()["id"]
        assert 0.9 < time.monotonic() - t0 < 5
        assert httpx.post(cloud.url + "/api/v1/devices/nobody/commands/ping").status_code == 404
        bad = httpx.post(cloud.url + "/api/v1/devices/dev-r/commands/bad%20name")
        assert bad.status_code == 422
    finally:
        agent.close()
    # reported messages are not dead letters
    assert cloud.get("/api/v1/dead-letters")["dead_letters"] == []
