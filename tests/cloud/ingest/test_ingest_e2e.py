"""Through a real Mosquitto into a real ``millstream-cloud serve``: duplicates, gaps, bad inputs."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx

from tests.cloud.ingest.conftest import (
    NS,
    batch,
    stored_count,
    telemetry_topic,
    ts,
    wait_until,
)


def test_duplicate_stored_once_and_gap_reported(make_cloud, publisher):
    cloud = make_cloud()
    t0 = time.time_ns() - 60 * NS
    for seq in (0, 1, 1, 2, 5, 6):  # 1 twice (duplicate); 3 and 4 skipped (gap)
        publisher.publish(telemetry_topic("dev-a"), batch("dev-a", seq, t0 + seq * NS))
    publisher.flush()
    wait_until(lambda: stored_count(cloud, ["dev-a"]) == 5 * 40, what="5 messages stored")
    dev = cloud.get("/api/v1/devices/dev-a")
    assert dev["sequence"]["duplicates"] == 1
    assert dev["sequence"]["gaps"] == 2
    assert dev["sequence"]["missing_seqs"] == [3, 4]
    assert cloud.metric("millstream_ingest_duplicate_messages_total") == 1
    assert cloud.metric("millstream_ingest_sequence_gaps_total") == 2
    # a late message filling the gap is not a duplicate, and closes it
    publisher.publish(telemetry_topic("dev-a"), batch("dev-a", 3, t0 + 3 * NS))
    publisher.flush()
    wait_until(lambda: stored_count(cloud, ["dev-a"]) == 6 * 40, what="late message stored")
    dev = cloud.get("/api/v1/devices/dev-a")
    assert dev["sequence"]["gaps"] == 1 and dev["sequence"]["missing_seqs"] == [4]
    assert stored_count(cloud, ["dev-a"]) == 6 * 40


def test_bad_inputs_dead_lettered_stream_unharmed(make_cloud, publisher, broker_url, tmp_path):
    cloud = make_cloud()
    now = time.time_ns()
    good_seq = 0

    def good() -> None:
        nonlocal good_seq
        publisher.publish(
            telemetry_topic("good"), batch("good", good_seq, now - 300 * NS + good_seq * NS)
        )
        good_seq += 1

    def reading(value: object = 1.0, when: int | None = None, metric: str = "m0") -> dict:
        return {"ts": ts(when or now), "metric": metric, "value": value}

    def msg(device: str, seq: int, readings: list) -> bytes:
        return json.dumps({"v": 1, "device": device, "seq": seq, "readings": readings}).encode()

    bad = {
        "not_json": (telemetry_topic("bad1"), b"{this is not json"),
        "schema": (
            telemetry_topic("bad2"),
            json.dumps({"v": 1, "device": "bad2", "seq": "x"}).encode(),
        ),
        "oversize": (telemetry_topic("bad3"), b'{"v":1,"pad":"' + b"x" * 300_000 + b'"}'),
        "non_finite": (
            telemetry_topic("bad4"),
            b'{"v":1,"device":"bad4","seq":0,"readings":[{"ts":"%s","metric":"m0","value":NaN}]}'
            % ts(now).encode(),
        ),
        "non_finite_inf": (
            telemetry_topic("bad5"),
            b'{"v":1,"device":"bad5","seq":0,"readings":[{"ts":"%s","metric":"m0","value":Infinity}]}'
            % ts(now).encode(),
        ),
        "non_finite_big": (
            telemetry_topic("bad6"),
            b'{"v":1,"device":"bad6","seq":0,"readings":[{"ts":"%s","metric":"m0","value":1e999}]}'
            % ts(now).encode(),
        ),
        "timestamp_out_of_range": (
            telemetry_topic("bad7"),
            msg("bad7", 0, [reading(when=now + 10 * 365 * 86400 * NS)]),
        ),
        "topic_mismatch": (telemetry_topic("bad8"), msg("someone-else", 0, [reading()])),
        "unknown_channel": ("millstream/v1/plant1/bad9/gossip", msg("bad9", 0, [reading()])),
    }
    for i, (_, (topic, payload)) in enumerate(bad.items()):
        good()
        publisher.publish(topic, payload)
        if i == 3:
            good()
    # cardinality: a device with the limit (set below) of metrics, then one more
    card = [reading(metric=f"c{i}") for i in range(1000)]
    publisher.publish(telemetry_topic("card"), msg("card", 0, card))
    good()
    publisher.publish(telemetry_topic("card"), msg("card", 1, [reading(metric="one_too_many")]))
    good()
    publisher.publish(
        telemetry_topic("card"), msg("card", 2, [reading(metric="c5", when=now + NS)])
    )
    good()
    publisher.flush()

    wait_until(lambda: stored_count(cloud, ["good"]) == good_seq * 40, what="good stream stored")
    wait_until(
        lambda: len(cloud.get("/api/v1/dead-letters")["dead_letters"]) >= len(bad) + 1,
        what="dead letters",
    )
    letters = cloud.get("/api/v1/dead-letters")["dead_letters"]
    reasons = {d["topic"].split("/")[3]: d["reason"] for d in letters}
    assert reasons == {
        "bad1": "not_json",
        "bad2": "schema",
        "bad3": "oversize",
        "bad4": "non_finite",
        "bad5": "non_finite",
        "bad6": "non_finite",
        "bad7": "timestamp_out_of_range",
        "bad8": "topic_mismatch",
        "bad9": "unknown_channel",
        "card": "cardinality",
    }
    for d in letters:
        assert d["time"] and d["error"] and ("payload" in d or "payload_base64" in d)
    oversize = next(d for d in letters if d["reason"] == "oversize")
    assert oversize["size"] > 300_000
    # the cardinality-rejected message consumed its sequence number: no false gap,
    # and the device's next message with a known metric is stored
    dev = cloud.get("/api/v1/devices/card")
    assert dev["sequence"]["gaps"] == 0 and dev["rejected_messages"] == 1
    assert len(dev["metrics"]) == 1000
    assert stored_count(cloud, ["good"]) == good_seq * 40
    text = cloud.metrics_text()
    assert 'millstream_ingest_rejected_messages_total{reason="non_finite"} 3.0' in text
    assert 'millstream_ingest_rejected_messages_total{reason="cardinality"} 1.0' in text
    assert cloud.get("/readyz")["status"] == "ready"
    by_reason = cloud.get("/api/v1/dead-letters", reason="oversize")["dead_letters"]
    assert [d["reason"] for d in by_reason] == ["oversize"]


def test_birth_and_last_will_set_online_state_and_metadata(make_cloud, broker_url):
    import paho.mqtt.client as mqtt

    cloud = make_cloud()
    topic = "millstream/v1/plant1/lwt-1/status"
    dev = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="lwt-1", protocol=mqtt.MQTTv5)
    will = {"v": 1, "device": "lwt-1", "state": "offline", "reason": "connection-lost"}
    dev.will_set(topic, json.dumps(will), qos=1, retain=True)
    dev.connect("127.0.0.1", int(broker_url.rsplit(":", 1)[1]), keepalive=5)
    dev.loop_start()
    birth = {
        "v": 1, "device": "lwt-1", "state": "online", "reason": "connected",
        "agent_version": "0.1.0", "kind": "pump", "metadata": {"hall": "2"},
    }  # fmt: skip
    dev.publish(topic, json.dumps(birth), qos=1, retain=True).wait_for_publish(5)

    def state() -> dict:
        r = httpx.get(cloud.url + "/api/v1/devices/lwt-1")
        return r.json() if r.status_code == 200 else {}

    wait_until(lambda: state().get("online") is True, what="birth")
    d = state()
    assert d["agent_version"] == "0.1.0" and d["kind"] == "pump"
    assert d["metadata"] == {"hall": "2"} and d["last_seen"]
    dev.loop_stop()
    dev.socket().close()  # the link dies without DISCONNECT: the broker sends the will
    wait_until(lambda: state().get("online") is False, 20, 0.2, "last will")
    listed = cloud.get("/api/v1/devices", online="false")["devices"]
    assert [x["id"] for x in listed] == ["lwt-1"]


def test_detection_in_several_processes_scores_every_device_and_saves_one_state(
    make_cloud, publisher, tmp_path
):
    # detection.processes: 2 in a real `serve`: the devices are split between two scoring
    # processes; every stored reading is scored once, the API answers from the device's
    # process, and a clean stop leaves one state directory with every device in it.
    from millstream_cloud.detection.engine import DEVICE_DIR, STATE_FILE, device_partition

    cloud = make_cloud(env={"MILLSTREAM_DETECTION__PROCESSES": "2"})
    devices = ["dev-a", "dev-b", "dev-c", "dev-d"]
    assert {device_partition(d, 2) for d in devices} == {0, 1}
    t0 = time.time_ns() - 600 * NS
    for seq in range(5):
        for d in devices:
            publisher.publish(telemetry_topic(d), batch(d, seq, t0 + seq * NS))
    publisher.flush()
    total = 5 * 40 * len(devices)
    wait_until(lambda: stored_count(cloud, devices) == total, what="all stored")
    wait_until(
        lambda: cloud.metric("millstream_detection_scored_readings_total") == total,
        what="all scored",
    )
    for d in devices:
        body = cloud.get(f"/api/v1/devices/{d}/detection")
        assert body["process"] == {"partition": device_partition(d, 2), "processes": 2}
        assert {m: v["readings_learned"] for m, v in body["metrics"].items()} == {
            f"m{i}": 50 for i in range(4)
        }
    assert cloud.metric("millstream_detection_failed_readings_total") == 0
    # Stopped as systemd stops a unit (and Ctrl-C a terminal): the whole process group is
    # signalled; the scoring processes wait for the service to save their state.
    pid = cloud.proc.pid
    os.killpg(pid, signal.SIGTERM)
    cloud.proc.wait(30)
    state = tmp_path / "data" / "detection"
    assert json.loads((state / STATE_FILE).read_text())["readings_seen"] == total, cloud.log()
    assert sorted(p.name for p in (state / DEVICE_DIR).glob("*.json")) == [
        f"{d}.json" for d in devices
    ]
