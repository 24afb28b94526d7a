"""Rule validation (errors name the field) and each rule type's behaviour."""

from __future__ import annotations

import pytest

from millstream_cloud.alerts.clock import ManualClock
from millstream_cloud.alerts.labels import fingerprint, parse_duration
from millstream_cloud.alerts.rules import (
    DEFAULT_RULES,
    RuleError,
    load_rule_files,
    parse_rule,
    parse_rules,
)
from millstream_cloud.model import Anomaly, Contribution
from millstream_cloud.timeutil import rfc3339
from tests.alerts.conftest import T0, FakeDevice
from tests.alerts.test_lifecycle import hook, route, run


def errors_of(data: object) -> list[tuple[str, str]]:
    with pytest.raises(RuleError) as info:
        parse_rule(data)
    return info.value.errors


def test_fingerprint_is_alertmanagers():
    # Values computed by Prometheus' model.LabelSet.Fingerprint() (FNV-1a 64).
    assert fingerprint({}) == "cbf29ce484222325"
    assert fingerprint({"a": "b"}) == fingerprint({"a": "b"})
    assert fingerprint({"a": "b", "c": "d"}) == fingerprint({"c": "d", "a": "b"})
    assert fingerprint({"a": "b"}) != fingerprint({"a": "c"})


def test_durations():
    assert parse_duration("0s") == 0
    assert parse_duration("1h30m") == 5400 * 10**9
    assert parse_duration(2.5) == 2_500_000_000
    with pytest.raises(ValueError):
        parse_duration("5 minutes")


def test_errors_name_the_field():
    assert errors_of({"name": "x", "type": "threshold", "threshold": 1}) == [
        ("metric", "field required")
    ]
    assert errors_of({"name": "x", "type": "thresold"})[0][0] == "type"
    assert errors_of({"name": "x"})[0][0] == "type"
    errs = errors_of(
        {"name": "x", "type": "threshold", "metric": "t", "threshold": 1, "for": "5 min"}
    )
    assert errs[0][0] == "for" and "duration" in errs[0][1]
    errs = errors_of(
        {"name": "x", "type": "threshold", "metric": "t", "threshold": 80, "clear": 90}
    )
    assert errs[0][0] == "clear"
    errs = errors_of({"name": "x", "type": "anomaly", "min_likelihood": 1.5})
    assert errs[0][0] == "min_likelihood"
    errs = errors_of(
        {"name": "x", "type": "no_data", "metric": "t", "after": "1m", "colour": "red"}
    )
    assert errs == [("colour", "unknown field")]
    errs = errors_of({"name": "x", "type": "offline", "annotations": {"summary": "{devise} down"}})
    assert errs[0][0] == "annotations" and "devise" in errs[0][1]
    errs = errors_of({"name": "x", "type": "offline", "labels": {"device": "a"}})
    assert errs[0][0] == "labels"
    errs = errors_of({"name": "x", "type": "offline", "labels": {"v": "{value}"}})
    assert errs[0][0] == "labels" and "identity" in errs[0][1]
    errs = errors_of({"name": "x", "type": "offline", "matchers": ["site plant-a"]})
    assert errs[0][0] == "matchers"


def test_rules_file_errors_name_file_index_and_rule():
    data = {
        "rules": [
            {"name": "ok", "type": "offline"},
            {"name": "bad", "type": "threshold", "metric": "t"},
            {"name": "ok", "type": "offline"},
        ]
    }
    with pytest.raises(RuleError) as info:
        parse_rules(data, "site.yaml")
    text = str(info.value)
    assert "site.yaml: rules[1] (bad).threshold: field required" in text
    assert "site.yaml: rules[2] (ok).name: duplicate rule name 'ok'" in text


def test_default_rules_load():
    rules = load_rule_files(["default"])
    assert {"SiteOffline", "DeviceOffline", "AnomalyDetected"} <= set(rules)
    assert all(src == f"file:{DEFAULT_RULES}" for _, src in rules.values())


def test_anomaly_rule_min_likelihood_and_resolve_after(make_service, webhook):
    clock = ManualClock(T0)
    rule = {
        "name": "Anomaly",
        "type": "anomaly",
        "min_likelihood": 0.95,
        "resolve_after": "2m",
        "annotations": {
            "summary": "{device}: {explanation} ({likelihood:.2f})",
            "anomaly_time": "{anomaly_time}",
        },
    }
    svc = make_service([rule], route(group_wait="0s"), hook(webhook), clock)

    def anomaly(likelihood: float) -> Anomaly:
        return Anomaly(
            "press-1",
            "plant-a",
            clock.now_ns(),
            "hst",
            3.0,
            likelihood,
            metric=None,
            contributions=[Contribution("vib", 9.0, 2.0, 6.5)],
        )

    svc.observe_anomalies([anomaly(0.9)])
    assert svc.list_alerts() == []
    svc.observe_anomalies([anomaly(0.99)])
    (a,) = svc.list_alerts(state="firing")
    assert a["annotations"]["summary"] == "press-1: vib=9 (normal 2, +6.5 sigma) (0.99)"
    assert "metric" not in a["labels"]  # a whole-device anomaly
    # The anomaly's own time, which a verdict names it by (POST /api/v1/anomalies/feedback).
    assert a["annotations"]["anomaly_time"] == rfc3339(clock.now_ns())
    run(svc, clock, 60, 3, None)
    svc.observe_anomalies([anomaly(0.99)])
    run(svc, clock, 110, 10, None)
    assert svc.list_alerts()[0]["state"] == "firing"
    run(svc, clock, 20, 10, None)
    assert svc.list_alerts()[0]["state"] == "resolved"
    assert [b["status"] for b in webhook.bodies()] == ["firing", "resolved"]


def test_no_data_rule(make_service, webhook):
    clock = ManualClock(T0)
    rule = {"name": "NoData", "type": "no_data", "metric": "temp", "after": "1m"}
    svc = make_service([rule], route(group_wait="0s"), hook(webhook), clock)
    run(svc, clock, 30, 3, lambda i: 20.0)
    run(svc, clock, 60, 3, None)
    assert [a["labels"]["alertname"] for a in svc.list_alerts(state="firing")] == ["NoData"]
    run(svc, clock, 3, 3, lambda i: 20.0)
    assert svc.list_alerts(state="firing") == []


def test_rate_of_change_rule(make_service, webhook):
    clock = ManualClock(T0)
    rule = {
        "name": "Rising",
        "type": "rate_of_change",
        "metric": "temp",
        "threshold": 5,
        "per": "1m",
        "window": "30s",
        "clear": 1,
    }
    svc = make_service([rule], route(group_wait="0s"), hook(webhook), clock)
    run(svc, clock, 60, 3, lambda i: 20 + 0.05 * i)  # 1 °C/min
    assert svc.list_alerts() == []
    run(svc, clock, 30, 3, lambda i: 21 + 0.5 * i)  # 10 °C/min
    (a,) = svc.list_alerts(state="firing")
    assert 5 < a["value"] <= 10.0 + 1e-9
    run(svc, clock, 60, 3, lambda i: 26.0)
    assert svc.list_alerts()[0]["state"] == "resolved"


def test_offline_by_last_will_and_by_stale_last_seen(make_service, webhook):
    clock = ManualClock(T0)
    devices = [
        FakeDevice("press-1", "plant-a", True, T0),
        FakeDevice("press-2", "plant-a", True, T0),
    ]
    rule = {"name": "DeviceOffline", "type": "offline", "stale_after": "2m", "for": "30s"}
    svc = make_service(
        [rule], route(group_wait="0s"), hook(webhook), clock, devices=lambda: devices
    )
    devices[0].online = False  # last will
    run(svc, clock, 60, 3, None)
    devices[1].last_seen_ns = T0
    assert [a["labels"]["device"] for a in svc.list_alerts(state="firing")] == ["press-1"]
    run(svc, clock, 120, 3, None)  # press-2 not seen for 3 minutes
    assert sorted(a["labels"]["device"] for a in svc.list_alerts(state="firing")) == [
        "press-1",
        "press-2",
    ]
    devices[0].online = True
    devices[0].last_seen_ns = clock.now_ns()
    run(svc, clock, 3, 3, None)
    assert [a["labels"]["device"] for a in svc.list_alerts(state="firing")] == ["press-2"]


def test_check_rules_cli(tmp_path, capsys):
    import argparse

    from millstream_cloud.alerts import cli

    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    good = tmp_path / "good.yaml"
    good.write_text("rules:\n  - {name: DeviceDown, type: offline}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "rules:\n  - {name: Hot, type: threshold, metric: t, threshold: 80, for: soon}\n"
    )
    args = parser.parse_args(["alerts", "check-rules", str(good), "default"])
    assert args.func(args) == 0
    assert f"{good}: OK (1 offline)" in capsys.readouterr().out
    args = parser.parse_args(["alerts", "check-rules", str(bad)])
    assert args.func(args) == 2
    assert f"{bad}: rules[0] (Hot).for: " in capsys.readouterr().err


def test_a_misspelt_field_or_a_promql_expr_gets_a_hint() -> None:
    errs = errors_of({"name": "x", "type": "threshold", "metric": "t", "treshold": 80})
    assert ("treshold", "unknown field (did you mean 'threshold'?)") in errs
    # Written as a Prometheus rule: told what a rule here says instead.
    [(field, msg)] = errors_of({"name": "hot", "expr": "temp > 80", "for": "5m"})
    assert field == "type" and "PromQL" in msg and "metric, op and threshold" in msg
