"""Anomalies found on stored readings are recorded, listed and handed on."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from millstream_cloud.app import create_app
from millstream_cloud.model import Anomaly, Contribution, Reading
from millstream_cloud.services import Services
from millstream_cloud.settings import Settings
from millstream_cloud.storage.base import SeriesQuery
from millstream_cloud.timeutil import parse_time_ns


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    """The service on default settings in ``tmp_path`` (no MQTT subscriber), stopped after."""
    built = Services.build(Settings(data_dir=str(tmp_path)), with_subscriber=False)
    yield built
    built.stop()


class ThresholdDetector:
    """A stand-in detector with a real rule: values above 100 are anomalous."""

    def observe(self, readings: Sequence[Reading]) -> list[Anomaly]:
        return [
            Anomaly(
                r.device,
                r.site,
                r.time_ns,
                "threshold",
                r.value,
                0.99,
                r.metric,
                f"{r.metric} {r.value} above 100",
                [Contribution(r.metric, r.value, 50.0, 5.0)],
            )
            for r in readings
            if r.value > 100
        ]


def telemetry(device: str, seq: int, readings: Sequence[tuple[int, str, float]], at: int) -> Any:
    """One telemetry message of ``device`` at plant-a as an agent sends it, arriving at
    ``at`` (ns); ``readings`` are (time_ns, metric, value)."""
    from millstream_cloud.ingest.pipeline import Message
    from tests.cloud.ingest.conftest import ts

    rows = [{"ts": ts(t), "metric": m, "value": v} for t, m, v in readings]
    body = {"v": 1, "device": device, "seq": seq, "readings": rows}
    topic = f"millstream/v1/plant-a/{device}/telemetry"
    return Message(topic, json.dumps(body).encode(), at)


def birth(device: str, kind: str, at: int) -> Any:
    """The birth message of ``device`` at plant-a, naming its machine kind."""
    from millstream_cloud.ingest.pipeline import Message

    body = {"v": 1, "device": device, "state": "online", "kind": kind}
    return Message(f"millstream/v1/plant-a/{device}/status", json.dumps(body).encode(), at)


def test_detector_output_is_stored_listed_and_handed_on(services: Services) -> None:
    services.anomalies.detector = ThresholdDetector()
    seen: list[Anomaly] = []
    services.anomalies.hooks.append(seen.extend)
    t0 = 1_772_352_000_000_000_000
    readings = [
        Reading("press-01", "plant-a", "temp", t0 + i * 1_000_000_000, v)
        for i, v in enumerate([50.0, 150.0, 60.0, 120.0])
    ]
    services.storage.write_readings(readings)
    services.pipeline.hooks[0](readings)
    assert [a.score for a in seen] == [150.0, 120.0]

    with TestClient(create_app(services.settings, services, start=False)) as client:
        body = client.get("/api/v1/anomalies", params={"device": "press-01"}).json()
        assert [a["score"] for a in body["anomalies"]] == [120.0, 150.0]
        first = body["anomalies"][0]
        assert first["metric"] == "temp" and first["detector"] == "threshold"
        assert first["contributions"][0]["sigma"] == 5.0
        assert client.get("/api/v1/anomalies", params={"device": "other"}).json()["anomalies"] == []
        metrics = client.get("/metrics").text
        assert 'millstream_anomalies_total{detector="threshold"} 2.0' in metrics


def test_detection_engine_is_wired_and_its_state_survives_a_restart(tmp_path: Path) -> None:
    from millstream_cloud.detection.engine import STATE_FILE, DetectionEngine

    settings = Settings(data_dir=str(tmp_path))
    services = Services.build(settings, with_subscriber=False)
    assert isinstance(services.anomalies.detector, DetectionEngine)
    t0 = 1_772_352_000_000_000_000
    readings = [
        Reading("press-01", "plant-a", "temp", t0 + i * 1_000_000_000, 20.0 + (i % 5) * 0.1)
        for i in range(300)
    ]
    services.anomalies.on_readings(readings)
    before = services.anomalies.detector.state_dict()
    services.stop()
    assert (tmp_path / "detection" / STATE_FILE).exists()

    again = Services.build(settings, with_subscriber=False)
    try:
        assert isinstance(again.anomalies.detector, DetectionEngine)
        assert again.anomalies.detector.state_dict() == before
    finally:
        again.stop()


def test_an_unreadable_detector_state_is_kept_aside_and_the_service_starts_afresh(
    tmp_path: Path,
) -> None:
    from millstream_cloud.detection.engine import DEVICE_DIR, STATE_FILE, DetectionEngine

    settings = Settings(data_dir=str(tmp_path))
    services = Services.build(settings, with_subscriber=False)
    t0 = 1_772_352_000_000_000_000
    services.anomalies.on_readings(
        [Reading("press-01", "plant-a", "temp", t0 + i * 10**9, 20.0) for i in range(300)]
    )
    services.stop()
    path = tmp_path / "detection" / STATE_FILE
    state = json.loads(path.read_text())
    # Damage it past the first keys, so a load gets part of the way before failing.
    state["settings"]["no_such_setting"] = 7
    damaged = json.dumps(state)
    path.write_text(damaged)

    again = Services.build(settings, with_subscriber=False)
    try:
        engine = again.anomalies.detector
        assert isinstance(engine, DetectionEngine)
        assert engine.metrics == {} and engine.readings_seen == 0  # nothing half-restored
        [aside] = path.parent.glob(f"{STATE_FILE}.unreadable-*")
        assert aside.read_text() == damaged
        assert not path.exists()
        # The devices' files went aside with it (kept, and not mixed into a fresh state).
        [devices] = path.parent.glob(f"{DEVICE_DIR}.unreadable-*")
        names = [p.name for p in devices.iterdir()]
        assert [n for n in names if not n.endswith(".rows")] == ["press-01.json"]
        assert len(names) == 1 + 8  # and its calibrations' rows files
    finally:
        again.stop()
    assert path.exists()  # the fresh state is saved where the old one was


def test_unknown_detection_setting_is_refused_with_its_name(tmp_path: Path) -> None:
    from millstream_cloud.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="warmpu"):
        load_settings(overrides={"detection": {"engine": {"warmpu": 10}}}, environ={})


def test_detection_rules_take_the_kind_from_the_registry_and_apply_after_restart(
    tmp_path: Path,
) -> None:
    from millstream_cloud.detection.engine import DetectionEngine, EngineSettings

    rule = {"match": {"kind": "lathe"}, "streaming": {"alert_level": 0.99}}
    services = Services.build(
        Settings(data_dir=str(tmp_path), detection={"rules": [rule]}), with_subscriber=False
    )
    t0 = 1_772_352_000_000_000_000
    services.registry.set_status("lathe-01", "plant-a", True, t0, kind="lathe")
    readings = [
        Reading(device, "plant-a", "temp", t0 + i * 1_000_000_000, 20.0 + (i % 5) * 0.1)
        for i in range(300)
        for device in ("lathe-01", "press-01")
    ]
    services.anomalies.on_readings(readings)
    engine = services.anomalies.detector
    assert isinstance(engine, DetectionEngine)
    assert engine.metrics[("lathe-01", "temp")].alert_level == 0.99
    default = EngineSettings().streaming["alert_level"]
    assert engine.metrics[("press-01", "temp")].alert_level == default
    services.stop()

    # The rule is taken out of the settings: after a restart the lathe follows the defaults.
    again = Services.build(Settings(data_dir=str(tmp_path)), with_subscriber=False)
    try:
        engine = again.anomalies.detector
        assert isinstance(engine, DetectionEngine)
        assert engine.metrics[("lathe-01", "temp")].alert_level == default
        assert engine.restarted == 1 and engine.metrics[("press-01", "temp")].n == 300
    finally:
        again.stop()


def test_the_api_says_what_detection_does_for_a_device(tmp_path: Path) -> None:

    rules = [
        {"match": {"kind": "lathe"}, "streaming": {"alert_level": 0.99}},
        {"match": {"kind": "lathe", "metric": "door*"}, "enabled": False},
    ]
    settings = Settings(data_dir=str(tmp_path), detection={"rules": rules})
    services = Services.build(settings, with_subscriber=False)
    t0 = time.time_ns() - 3600 * 10**9
    msgs = [birth("lathe-01", "lathe", t0)]
    for seq in range(3):
        readings = [
            (t0 + (seq * 100 + i) * 10**9, m, 20.0 + (i % 5) * 0.1)
            for i in range(100)
            for m in ("temp", "door_open")
        ]
        msgs.append(telemetry("lathe-01", seq, readings, t0))
    services.pipeline.process(msgs)
    with TestClient(create_app(settings, services, start=False)) as client:
        body = client.get("/api/v1/devices/lathe-01/detection").json()
        assert (body["kind"], body["enabled"], body["rules"]) == ("lathe", True, [0])
        temp = body["metrics"]["temp"]
        assert (temp["state"], temp["readings_learned"], temp["warmup"]) == ("learning", 300, 720)
        assert temp["streaming"]["alert_level"] == 0.99 and temp["rules"] == []
        # 300 s of readings: the spike check learns, and judges after an hour watched.
        spikes = temp["spikes"]
        assert (spikes["count"], spikes["watching"]) == (3, False)
        assert spikes["usual_per_day"] == pytest.approx(86400 / 299, rel=0.01)
        door = body["metrics"]["door_open"]
        assert (door["state"], door["rules"], door["readings_learned"]) == ("off", [1], 0)
        assert body["device_model"]["metrics"] == ["temp"]
        assert client.get("/api/v1/devices/nope/detection").status_code == 404
        from millstream_cloud.detection.engine import DetectionEngine

        assert services.anomalies.save is not None
        services.anomalies._save()  # the periodic save, with the old baseline
        assert "lathe-01" in DetectionEngine.load(tmp_path / "detection").devices
        res = client.post("/api/v1/devices/lathe-01/detection/relearn")
        assert res.status_code == 200, res.text
        assert res.json() == {
            "device": "lathe-01",
            "relearning": True,
            "forgot": {"metric_detectors": 1, "device_model": 1},
        }
        body = client.get("/api/v1/devices/lathe-01/detection").json()
        assert body["metrics"]["temp"]["readings_learned"] == 0
        assert body["device_model"]["rows"] == 0
        # Saved at once, so a restart does not bring the old baseline back.
        saved = DetectionEngine.load(tmp_path / "detection")
        assert "lathe-01" not in saved.devices and not saved.metrics
        # ... and the moment is kept for the device dashboard's annotation.
        from millstream_cloud.storage.base import DETECTION_EVENTS, SeriesQuery

        tags = {"site": "plant-a", "device": "lathe-01", "event": "relearn"}
        events = services.storage.query(SeriesQuery(DETECTION_EVENTS, ["explanation"], tags))
        assert len(events) == 1 and len(events[0].points) == 1
        assert "re-baselined" in str(events[0].points[0][1])
        assert client.post("/api/v1/devices/nope/detection/relearn").status_code == 404
    services.stop()

    off = Settings(data_dir=str(tmp_path / "off"), detection={"enabled": False})
    services = Services.build(off, with_subscriber=False)
    services.pipeline.process(msgs[:1])
    with TestClient(create_app(off, services, start=False)) as client:
        res = client.get("/api/v1/devices/lathe-01/detection")
        assert res.status_code == 404 and "detection is off" in res.text
        res = client.post("/api/v1/devices/lathe-01/detection/relearn")
        assert res.status_code == 404 and "detection is off" in res.text


def test_operator_verdicts_are_kept_listed_and_give_each_detector_its_precision(
    tmp_path: Path,
) -> None:
    settings = Settings(data_dir=str(tmp_path))
    services = Services.build(settings, with_subscriber=False)
    services.anomalies.detector = ThresholdDetector()
    t0 = 1_772_352_000_000_000_000
    readings = [
        Reading("press-01", "plant-a", "temp", t0, 150.0),
        Reading("press-01", "plant-a", "temp", t0 + 10**9 + 7, 120.0),  # ns precision
        Reading("press-01", "plant-a", "pressure", t0 + 10**9 + 7, 130.0),  # same instant
        Reading("press-01", "plant-a", "temp", t0 + 2 * 10**9, 60.0),  # no anomaly
    ]
    services.storage.write_readings(readings)
    services.anomalies.on_readings(readings)
    url = "/api/v1/anomalies"
    with TestClient(create_app(settings, services, start=False)) as client:
        listed = client.get(url, params={"device": "press-01"}).json()["anomalies"]
        assert [a["feedback"] for a in listed] == [None, None, None]
        first = next(a for a in listed if a["score"] == 150.0)
        both = listed[0]["time"]
        assert both == "2026-03-01T08:00:01.000000007Z"

        def judge(**body: Any) -> Any:
            return client.post(f"{url}/feedback", json={"device": "press-01", **body})

        res = judge(time=first["time"], verdict="false_alarm", author="ana")
        assert res.status_code == 200, res.text
        assert res.json()["metric"] == "temp"
        assert res.json()["feedback"] == {
            "verdict": "false_alarm",
            "comment": None,
            "author": "ana",
        }
        # Two anomalies share the instant: the answer says which to choose from.
        res = judge(time=both, verdict="confirmed")
        assert res.status_code == 409
        candidates = res.json()["detail"]["candidates"]
        assert sorted(c["metric"] for c in candidates) == ["pressure", "temp"]
        res = judge(time=both, metric="temp", verdict="confirmed", comment="bearing replaced")
        assert res.status_code == 200, res.text
        # Bad verdicts get a clear refusal and change nothing.
        res = judge(time="2026-03-01T09:00:00Z", verdict="confirmed")
        assert res.status_code == 404 and "no anomaly of device 'press-01'" in res.text
        assert judge(time=both, verdict="maybe").status_code == 422
        assert judge(time="yesterday", verdict="confirmed").status_code == 422
        assert judge(time=both, verdict="confirmed", metric="temp", extra=1).status_code == 422
        res = client.post(
            f"{url}/feedback", json={"device": "nope", "time": both, "verdict": "confirmed"}
        )
        assert res.status_code == 404

        def verdicts(**params: str) -> list[tuple[str, Any]]:
            items = client.get(url, params={"device": "press-01", **params}).json()["anomalies"]
            return [(a["metric"], a["feedback"] and a["feedback"]["verdict"]) for a in items]

        assert sorted(verdicts(verdict="judged")) == [
            ("temp", "confirmed"),
            ("temp", "false_alarm"),
        ]
        assert verdicts(verdict="unjudged") == [("pressure", None)]
        assert verdicts(verdict="false_alarm") == [("temp", "false_alarm")]
        assert client.get(url, params={"verdict": "perhaps"}).status_code == 422
        # A span that ends before it starts is refused, not answered "no anomalies".
        backwards = {"start": "2026-03-01T09:00:00Z", "end": "2026-03-01T08:00:00Z"}
        res = client.get(url, params=backwards)
        assert res.status_code == 422 and "is before start" in res.text
        assert client.get(f"{url}/precision", params=backwards).status_code == 422

        summary = client.get(f"{url}/precision").json()
        assert (summary["anomalies"], summary["judged"], summary["precision"]) == (3, 2, 0.5)
        assert summary["by_detector"] == [
            {
                "detector": "threshold",
                "anomalies": 3,
                "judged": 2,
                "confirmed": 1,
                "expected": 0,
                "false_alarm": 1,
                "precision": 0.5,
            }
        ]
        by_metric = {m["metric"]: m for m in summary["by_metric"]}
        assert by_metric["pressure"]["precision"] is None  # nobody judged it: no guess
        # Judging again replaces the verdict (one point per anomaly, last write wins).
        assert (
            judge(time=first["time"], verdict="expected", comment="planned stop").status_code == 200
        )
        assert sorted(verdicts(verdict="judged")) == [("temp", "confirmed"), ("temp", "expected")]
        assert client.get(f"{url}/precision").json()["precision"] == 1.0
        metrics = client.get("/metrics").text
        assert 'millstream_anomaly_feedback_total{verdict="false_alarm"} 1.0' in metrics
        assert 'millstream_anomaly_feedback_total{verdict="expected"} 1.0' in metrics
    services.stop()

    # The verdicts are stored with the anomalies, so they outlive a restart.
    services = Services.build(settings, with_subscriber=False)
    with TestClient(create_app(settings, services, start=False)) as client:
        items = client.get(url, params={"verdict": "judged"}).json()["anomalies"]
        assert {a["feedback"]["comment"] for a in items} == {"planned stop", "bearing replaced"}
    services.stop()


def test_missed_faults_are_reported_refused_where_raised_and_give_recall(
    services: Services,
) -> None:
    services.anomalies.detector = ThresholdDetector()
    t0 = 1_772_352_000_000_000_000
    values = [50.0, 150.0, 60.0, 55.0]  # one anomaly, at t0 + 1 s
    readings = [(t0 + i * 10**9, "temp", v) for i, v in enumerate(values)]
    services.pipeline.process([telemetry("press-01", 0, readings, t0)])
    url = "/api/v1/anomalies"
    with TestClient(create_app(services.settings, services, start=False)) as client:
        [raised] = client.get(url).json()["anomalies"]
        ok = {"device": "press-01", "time": raised["time"], "verdict": "confirmed"}
        assert client.post(f"{url}/feedback", json=ok).status_code == 200

        def report(**body: Any) -> Any:
            return client.post(f"{url}/missed", json={"device": "press-01", **body})

        # Where an anomaly was raised, the report is refused: that one gets a verdict.
        res = report(start="2026-03-01T08:00:00Z", end="2026-03-01T08:00:02Z", metric="temp")
        assert res.status_code == 409
        assert "judge it" in res.json()["detail"]["error"]
        assert [a["time"] for a in res.json()["detail"]["anomalies"]] == [raised["time"]]
        res = report(start="2026-03-01T08:00:03Z", metric="temp", author="ana", comment="slow leak")
        assert res.status_code == 200, res.text
        assert res.json() == {
            "start": "2026-03-01T08:00:03Z",
            "end": "2026-03-01T08:00:03Z",
            "site": "plant-a",
            "device": "press-01",
            "metric": "temp",
            "comment": "slow leak",
            "author": "ana",
        }
        assert report(start="2026-03-01T09:00:00Z").status_code == 200  # whole device
        assert report(start="2026-03-01T09:00:00Z", end="2026-03-01T08:00:00Z").status_code == 422
        assert report(start="soon").status_code == 422
        res = report(start="2026-03-01T09:00:00Z", end="9999-12-31T23:59:59Z")
        assert res.status_code == 422 and "out of range" in res.text  # was a 500 from the store
        res = client.post(f"{url}/missed", json={"device": "nope", "start": "2026-03-01T09:00:00Z"})
        assert res.status_code == 404 and "'nope'" in res.text

        listed = client.get(f"{url}/missed", params={"device": "press-01"}).json()["missed"]
        assert [(m["start"], m["metric"]) for m in listed] == [
            ("2026-03-01T09:00:00Z", None),
            ("2026-03-01T08:00:03Z", "temp"),
        ]
        # Stored with its end in ms too: the device dashboard draws it as a region.
        spans = services.storage.query(SeriesQuery("missed_faults", ["end_ms"], {}))
        assert sorted(v for s in spans for _, v in s.points) == sorted(
            parse_time_ns(m["end"]) // 1_000_000 for m in listed
        )
        summary = client.get(f"{url}/precision").json()
        assert (summary["precision"], summary["missed"], summary["recall"]) == (1.0, 2, 0.3333)
        by_metric = {m["metric"]: m for m in summary["by_metric"]}
        assert (by_metric["temp"]["missed"], by_metric["temp"]["recall"]) == (1, 0.5)
        assert (by_metric[None]["anomalies"], by_metric[None]["recall"]) == (0, 0.0)
        assert "recall" not in summary["by_detector"][0]  # a missed fault has no detector
        assert (
            'millstream_anomaly_feedback_total{verdict="missed"} 2.0' in client.get("/metrics").text
        )


def test_a_device_whose_detectors_fail_is_counted_and_shown_and_others_are_scored(
    services: Services,
) -> None:
    from millstream_cloud.detection.engine import DetectionEngine
    from tests.cloud.detection.test_engine import _CorruptDetector

    engine = services.anomalies.detector
    assert isinstance(engine, DetectionEngine)
    engine.metrics[("press-01", "temp")] = _CorruptDetector()  # type: ignore[assignment]
    t0 = 1_772_352_000_000_000_000
    readings = [(t0 + i * 10**9, "temp", 20.0) for i in range(4)]
    services.pipeline.process([telemetry(d, 0, readings, t0) for d in ("press-01", "press-02")])
    with TestClient(create_app(services.settings, services, start=False)) as client:
        metrics = client.get("/metrics").text
        assert "millstream_detection_failed_readings_total 4.0" in metrics
        assert "millstream_detection_scored_readings_total 8.0" in metrics
        bad = client.get("/api/v1/devices/press-01/detection").json()
        assert bad["error"] == "ValueError: state is corrupt"
        good = client.get("/api/v1/devices/press-02/detection").json()
        assert good["error"] is None and good["metrics"]["temp"]["readings_learned"] == 4


def test_a_whole_device_anomaly_refuses_a_missed_report_on_the_metrics_it_names(
    services: Services,
) -> None:
    from millstream_cloud.anomalies import anomaly_point

    t0 = 1_772_352_000_000_000_000  # 2026-03-01T08:00:00Z
    readings = [(t0, m, 1.0) for m in ("temp", "pressure", "flow")]
    services.pipeline.process([telemetry("press-01", 0, readings, t0)])
    both = [Contribution("temp", 80.0, 60.0, 4.1), Contribution("pressure", 3.0, 2.0, 3.2)]
    device_wide = Anomaly(
        "press-01", "plant-a", t0 + 10**9, "virtual_sensor", 0.9, 0.999, None, "", both
    )
    services.storage.write_points([anomaly_point(device_wide)])
    with TestClient(create_app(services.settings, services, start=False)) as client:

        def report(metric: str) -> Any:
            span = {"start": "2026-03-01T08:00:00Z", "end": "2026-03-01T08:00:05Z"}
            return client.post(
                "/api/v1/anomalies/missed", json={"device": "press-01", "metric": metric, **span}
            )

        for named in ("temp", "pressure"):
            res = report(named)
            assert res.status_code == 409, res.text
            assert [a["metric"] for a in res.json()["detail"]["anomalies"]] == [None]
        # The device-wide anomaly blamed temp and pressure: a fault on flow was missed.
        assert report("flow").status_code == 200


def test_backtest_replays_history_with_proposed_settings_and_checks_the_labels(
    services: Services,
) -> None:
    import numpy as np

    from millstream_cloud.anomalies import anomaly_point

    t0 = 1_772_352_000_000_000_000
    values = 20.0 + np.random.default_rng(1).normal(0.0, 0.5, 3000)
    values[2500:2510] += 15.0  # a fault the live engine raises too
    msgs = [birth("press-01", "press", t0)]
    for seq in range(30):
        readings = [
            (t0 + i * 10**9, "temp", float(values[i])) for i in range(seq * 100, seq * 100 + 100)
        ]
        arrival = t0 + (seq * 100 + 99) * 10**9  # sent as the batch fills: no clock skew
        msgs.append(telemetry("press-01", seq, readings, arrival))
    services.pipeline.process(msgs)
    false_alarm = Anomaly(
        "press-01", "plant-a", t0 + 1800 * 10**9, "ensemble:value", 0.4, 0.99, "temp"
    )
    services.storage.write_points([anomaly_point(false_alarm)])
    url = "/api/v1/anomalies"
    with TestClient(create_app(services.settings, services, start=False)) as client:
        live = client.get(url).json()["anomalies"]
        assert [a["time"] for a in live] == ["2026-03-01T08:41:40Z", "2026-03-01T08:30:00Z"]
        for a, verdict in zip(live, ("confirmed", "false_alarm"), strict=True):
            body = {"device": "press-01", "time": a["time"], "verdict": verdict}
            assert client.post(f"{url}/feedback", json=body).status_code == 200
        body = {
            "device": "press-01",
            "start": "2026-03-01T08:46:40Z",
            "end": "2026-03-01T08:47:30Z",
        }
        assert client.post(f"{url}/missed", json=body).status_code == 200
        engine_before = services.anomalies.detector.state_dict()  # type: ignore[union-attr]

        backtest = "/api/v1/devices/press-01/detection/backtest"
        span = {"start": "2026-03-01T08:16:40Z", "end": "2026-03-01T08:50:00Z", "learn": "1000s"}
        res = client.post(backtest, json={**span, "tolerance": "60s"})
        assert res.status_code == 200, res.text
        out = res.json()
        assert out["readings"] == {"learning": 1000, "scored": 2000}
        assert [(a["time"], a["metric"]) for a in out["anomalies"]] == [
            ("2026-03-01T08:41:40Z", "temp")
        ]
        assert out["live_anomalies"] == 2
        assert out["against_labels"] == {
            "tolerance_s": 60.0,
            "confirmed": {"total": 1, "found": 1},
            "expected": {"total": 0, "found": 0},
            "false_alarm": {"total": 1, "repeated": 0},
            "missed": {"total": 1, "found": 0},
            "unjudged": 0,
        }
        # What if the press kind's temperature were not watched?
        off = [{"match": {"kind": "press", "metric": "temp"}, "enabled": False}]
        out = client.post(backtest, json={**span, "rules": off}).json()
        assert out["anomalies"] == [] and out["against_labels"]["confirmed"]["found"] == 0
        # A warm-up longer than the history learns all of it and raises nothing.
        out = client.post(backtest, json={**span, "engine": {"warmup": 5000}}).json()
        assert out["anomalies"] == []
        # Bad proposals are refused with what is wrong; nothing was changed by any of this.
        res = client.post(backtest, json={**span, "engine": {"sensitivity": 3}})
        assert res.status_code == 422 and "sensitivity" in res.text
        res = client.post(backtest, json={**span, "rules": [{"match": {"colour": "red"}}]})
        assert res.status_code == 422 and "colour" in res.text
        rule = {"match": {"kind": "press"}, "mv_on": 3.0}  # below the default mv_off
        res = client.post(backtest, json={**span, "rules": [rule]})
        assert res.status_code == 422 and "rules[0]: mv_off: 3.5; must be below" in res.text
        res = client.post(backtest, json={**span, "start": "2026-03-01T09:00:00Z"})
        assert res.status_code == 422 and "not after start" in res.text
        assert client.post(backtest, json={**span, "max_readings": 10}).status_code == 413
        from millstream_cloud.api.devices import BACKTEST_LOCK

        with BACKTEST_LOCK:  # another backtest is running: this one is turned away, not queued
            res = client.post(backtest, json=span)
            assert res.status_code == 429 and "already running" in res.text
        assert client.post(backtest, json=span).status_code == 200
        assert client.post(backtest.replace("press-01", "nope"), json=span).status_code == 404
        assert services.anomalies.detector.state_dict() == engine_before  # type: ignore[union-attr]
        assert len(client.get(url).json()["anomalies"]) == 2


def test_a_second_process_on_one_data_dir_runs_without_detection(tmp_path: Path) -> None:
    # Two workers sharing a data dir (docs/cloud.md, Several workers) would each save their
    # view of a device over the other's: the first runs detection, the second says why not.
    import os
    import subprocess
    import sys

    from millstream_cloud.detection.engine import DetectionEngine

    settings = Settings(data_dir=str(tmp_path))
    first = Services.build(settings, with_subscriber=False)
    try:
        assert isinstance(first.anomalies.detector, DetectionEngine)
        assert (tmp_path / "detection.lock").read_text().strip() == str(os.getpid())
        # Another process, as a second worker would be.
        probe = (
            "from millstream_cloud.services import Services\n"
            "from millstream_cloud.settings import Settings\n"
            f"s = Services.build(Settings(data_dir={str(tmp_path)!r}), with_subscriber=False)\n"
            "print(s.anomalies.detector is None, s.anomalies.off_reason)\n"
            "s.stop()\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, check=True
        )
        assert out.stdout.startswith(f"True process {os.getpid()} on this data dir runs detection")
        assert "detection: off in this process" in out.stderr
        # Its API says why (a second build in this process is refused the lock alike).
        second = Services.build(settings, with_subscriber=False)
        try:
            assert second.anomalies.detector is None
            second.pipeline.process([birth("lathe-01", "lathe", time.time_ns())])
            with TestClient(create_app(settings, second, start=False)) as client:
                res = client.get("/api/v1/devices/lathe-01/detection")
                assert res.status_code == 404
                assert f"process {os.getpid()} on this data dir runs detection" in res.text
        finally:
            second.stop()
        assert isinstance(first.anomalies.detector, DetectionEngine)  # still its own
    finally:
        first.stop()
    # Once the first has stopped, the next process takes detection over, state and all.
    again = Services.build(settings, with_subscriber=False)
    try:
        assert isinstance(again.anomalies.detector, DetectionEngine)
    finally:
        again.stop()


@pytest.mark.parametrize(
    ("batch_readings", "calls_made"), [(None, [40, 520, 80]), (200, [40, 200, 200, 200])]
)
def test_the_detection_thread_scores_queued_batches_together_in_order(
    services: Services, batch_readings: int | None, calls_made: list[int]
) -> None:
    # Messages carry a few dozen readings; each observe has a fixed cost (a round trip to
    # every process with detection.processes), so what queued up while the detectors were
    # busy is scored in one call (up to the 500-reading chunk), in arrival order.
    import threading

    calls: list[list[float]] = []
    busy = threading.Event()
    release = threading.Event()

    class Slow:
        def observe(self, readings: Sequence[Reading]) -> list[Anomaly]:
            calls.append([r.value for r in readings])
            busy.set()
            release.wait(10)
            return []

    if batch_readings is not None:  # as PartitionedEngine says how much one call takes
        Slow.batch_readings = batch_readings  # type: ignore[attr-defined]
    sink = services.anomalies
    sink.detector = Slow()
    sink.start()
    try:
        t0 = 1_772_352_000_000_000_000

        def batch(k: int, n: int = 40) -> list[Reading]:
            return [
                Reading("press-01", "plant-a", "temp", t0 + (k * n + i) * 10**9, float(k * n + i))
                for i in range(n)
            ]

        sink.on_readings(batch(0))
        assert busy.wait(10)
        for k in range(1, 16):  # 600 readings queue up behind the first batch
            sink.on_readings(batch(k))
        release.set()
        deadline = time.monotonic() + 10
        while sum(map(len, calls)) < 640 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        release.set()
        sink.stop()
    assert [len(c) for c in calls] == calls_made
    assert [v for c in calls for v in c] == [float(i) for i in range(640)]


def _metric(services: Services, name: str) -> float:
    from prometheus_client import generate_latest

    for line in generate_latest(services.metrics.registry).decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def _wait(cond: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_device_behind_a_full_detection_queue_is_read_back_from_the_store_in_order(
    services: Services,
) -> None:
    # An agent replaying its backlog outruns the detectors: past the queue's bound its
    # readings are left in the store and read back once the queue is empty, each exactly
    # once and in time order, its later readings too; then it queues again. (Before,
    # they were skipped.)
    import threading

    scored: list[tuple[str, float]] = []
    busy = threading.Event()
    release = threading.Event()

    class Slow:
        def observe(self, readings: Sequence[Reading]) -> list[Anomaly]:
            scored.extend((r.device, r.value) for r in readings)
            busy.set()
            release.wait(10)
            return []

    t0 = 1_772_352_000_000_000_000
    sink = services.anomalies
    sink.detector = Slow()
    sink.queue_max_readings = 200
    sink.PAGE = 150  # several pages, cut by time
    sink.start()

    def send(device: str, k: int, n: int = 40) -> None:
        batch = [
            Reading(device, "plant-a", m, t0 + (k * n + i) * 10**9, float(k * n + i))
            for i in range(n)
            for m in ("temp", "flow")
        ]
        services.storage.write_readings(batch)
        sink.on_readings(batch)

    try:
        send("press-01", 0)
        assert busy.wait(10)
        for k in range(1, 16):  # 1200 more readings: the queue holds 200
            send("press-01", k)
        assert set(sink.behind) == {"press-01"}
        send("press-02", 0)  # the queue is full for every device
        assert set(sink.behind) == {"press-01", "press-02"}
        release.set()
        _wait(lambda: not sink.behind)
        send("press-01", 16)  # caught up: queued again
        _wait(lambda: len(scored) == 17 * 80 + 80)
    finally:
        release.set()
        sink.stop()
    mine = [v for d, v in scored if d == "press-01"]
    assert mine == [float(i) for i in range(17 * 40) for _ in ("temp", "flow")]
    assert [v for d, v in scored if d == "press-02"] == [float(i) for i in range(40) for _ in "tf"]
    deferred = _metric(services, "millstream_detection_deferred_readings_total")
    assert 980 <= deferred <= 1280
    assert _metric(services, "millstream_detection_read_back_readings_total") == deferred
    assert _metric(services, "millstream_detection_skipped_readings_total") == 0


def _send_backlog(services: Services) -> int:
    """Ingest a Raspberry Pi's backlog of 1500 CPU temperatures, a second apart, shifted
    by 50 sigma from the 1400th, in 30 messages; its start time."""
    import numpy as np

    rng = np.random.default_rng(5)
    t0 = 1_772_352_000_000_000_000
    values = [20.0 + rng.normal(0, 0.1) + (5.0 if i >= 1400 else 0.0) for i in range(1500)]
    for k in range(0, 1500, 50):
        rows = [(t0 + i * 10**9, "cpu_temp", values[i]) for i in range(k, k + 50)]
        services.pipeline.process([telemetry("pi-01", k // 50, rows, time.time_ns())])
    return t0


def test_a_fault_in_a_backlog_the_detectors_fell_behind_on_is_still_found(
    services: Services,
) -> None:
    from dataclasses import replace

    from millstream_cloud.detection.engine import DetectionEngine
    from tests.cloud.detection.test_engine import FAST

    sink = services.anomalies
    sink.detector = DetectionEngine(replace(FAST, warmup=200))
    sink.queue_max_readings = 1000
    sink.start()
    try:
        with sink._engine_lock:  # the detectors are busy while the backlog arrives
            t0 = _send_backlog(services)
            # the shift at reading 1400 waits in the store, and the API says so
            client = TestClient(create_app(services.settings, services, start=False))
            behind = client.get("/api/v1/devices/pi-01/detection").json()["behind"]
            assert behind["until"] == "2026-03-01T08:24:59Z"  # the 1500th reading
            assert behind["readings"] >= 500 and behind["since"] > "2026-03-01T08:10"
        _wait(
            lambda: (
                not sink.behind
                and _metric(services, "millstream_detection_scored_readings_total") == 1500
            )
        )
    finally:
        sink.stop()
    found = [a for a in sink.recent if a.device == "pi-01"]
    assert [a.metric for a in found] == ["cpu_temp"]
    assert found[0].time_ns >= t0 + 1400 * 10**9
    assert _metric(services, "millstream_detection_skipped_readings_total") == 0


def test_devices_still_behind_at_a_restart_are_read_back_after_it(tmp_path: Path) -> None:
    # The service stops (an upgrade) while a device's backlog still waits in the store:
    # where it stands is saved with the detectors' state, and the next start reads on.
    import threading
    from dataclasses import replace

    from millstream_cloud.detection.engine import DetectionEngine, settings_from_mapping
    from tests.cloud.detection.test_engine import FAST

    fast = {"warmup": 200, "streaming": FAST.streaming, "mv_resolution_s": 0.0}
    settings = Settings(data_dir=str(tmp_path), detection={"engine": fast})
    assert settings_from_mapping(settings.detection.engine) == replace(FAST, warmup=200)
    first = Services.build(settings, with_subscriber=False)
    sink = first.anomalies
    assert isinstance(sink.detector, DetectionEngine)
    sink.queue_max_readings = 1000
    sink.start()
    stopping = threading.Thread(target=first.stop)
    with sink._engine_lock:  # busy while the backlog arrives, then stopped
        t0 = _send_backlog(first)
        assert "pi-01" in sink.behind
        stopping.start()
        _wait(sink._stop.is_set)
    stopping.join(30)
    assert _metric(first, "millstream_detection_skipped_readings_total") == 0
    assert json.loads((tmp_path / "detection" / "behind.json").read_text())["pi-01"]["readings"]

    again = Services.build(settings, with_subscriber=False)
    again.anomalies.start()
    try:
        _wait(lambda: not again.anomalies.behind)
        found = [a for a in again.anomalies.recent if a.device == "pi-01"]
    finally:
        again.stop()
    assert [a.metric for a in found] == ["cpu_temp"]
    assert found[0].time_ns >= t0 + 1400 * 10**9
    assert not (tmp_path / "detection" / "behind.json").exists()


def test_a_late_message_for_a_device_being_read_back_is_scored_once(services: Services) -> None:
    # A message older than where the read-back began (a gap filled late) is not read back
    # (what lies after it may be scored already): it is queued as any late reading is.
    import threading

    scored: list[float] = []
    tokens = threading.Semaphore(0)
    calls: list[threading.Event] = [threading.Event() for _ in range(8)]

    class Gated:
        def observe(self, readings: Sequence[Reading]) -> list[Anomaly]:
            calls[sum(e.is_set() for e in calls)].set()
            assert tokens.acquire(timeout=10)
            scored.extend(r.value for r in readings)
            return []

    t0 = 1_772_352_000_000_000_000
    sink = services.anomalies
    sink.detector = Gated()
    sink.queue_max_readings = 100
    sink.start()

    def send(first: int, n: int = 40) -> None:
        batch = [
            Reading("press-01", "plant-a", "temp", t0 + i * 10**9, float(i))
            for i in range(first, first + n)
        ]
        services.storage.write_readings(batch)
        sink.on_readings(batch)

    try:
        send(0)
        assert calls[0].wait(10)
        send(40)  # queued
        send(80)  # the queue is full: behind from reading 80
        assert sink.behind["press-01"].start_ns == t0 + 80 * 10**9
        tokens.release(2)  # the two queued batches
        assert calls[2].wait(10)  # the read-back's first page, 80..119, being scored
        send(60, n=5)  # late: 60..64, before the read-back began
        send(120)  # behind still: its span grows
        tokens.release(10)
        _wait(lambda: not sink.behind and len(scored) >= 165)
    finally:
        tokens.release(10)
        sink.stop()
    assert scored == [float(i) for i in [*range(120), *range(60, 65), *range(120, 160)]]
    assert _metric(services, "millstream_detection_skipped_readings_total") == 0


def test_an_unreadable_list_of_devices_behind_is_kept_aside_and_the_service_starts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "detection").mkdir()
    (tmp_path / "detection" / "behind.json").write_text('{"pi-01": {"site": "a"}}')
    services = Services.build(Settings(data_dir=str(tmp_path)), with_subscriber=False)
    services.anomalies.start()
    try:
        assert services.anomalies.behind == {}
        kept = list((tmp_path / "detection").glob("behind.json.unreadable-*"))
        assert len(kept) == 1 and "pi-01" in kept[0].read_text()
        assert any("behind.json is unreadable" in r.getMessage() for r in caplog.records)
    finally:
        services.stop()


def test_anomalies_are_listed_since_a_time_relative_to_now(services: Services) -> None:
    # curl '.../api/v1/anomalies?start=now-1h': the last hour's, without writing its time.
    services.anomalies.detector = ThresholdDetector()
    now = time.time_ns()
    readings = [
        Reading("press-01", "plant-a", "temp", now - ago_s * 1_000_000_000, 150.0)
        for ago_s in (3 * 3600, 2 * 3600, 1800, 60)
    ]
    services.storage.write_readings(readings)
    services.pipeline.hooks[0](readings)
    with TestClient(create_app(services.settings, services, start=False)) as client:
        recent = client.get("/api/v1/anomalies", params={"start": "now-1h"}).json()
        assert len(recent["anomalies"]) == 2
        older = client.get("/api/v1/anomalies", params={"start": "now-4h", "end": "now-1h"})
        assert len(older.json()["anomalies"]) == 2
        bad = client.get("/api/v1/anomalies", params={"start": "now-1y"})
        assert bad.status_code == 422 and "'1y' is not a duration" in bad.text
