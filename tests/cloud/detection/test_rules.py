"""Detection settings per device kind, device and metric, and config changes across restarts."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from millstream_cloud.detection.engine import DetectionEngine, EngineSettings
from millstream_cloud.detection.rules import parse_rules, resolve
from millstream_cloud.detection.streaming import COMPONENTS, StreamingEnsemble
from millstream_cloud.model import Anomaly, Reading
from millstream_cloud.settings import SettingsError, load_settings

# Readings a second apart, each learned and each a row for a device model (as before
# the 10-s intervals: resolution_s, mv_resolution_s).
BASE = EngineSettings(
    warmup=200,
    multivariate=False,
    streaming={**EngineSettings().streaming, "resolution_s": 0.0},
    mv_resolution_s=0.0,
)
QUIET = {"streaming": {"alert_level": 0.99}}  # a per-metric alarm needs p < 1e-9.9
SMALL = 0.3  # a 3-sigma step: scores 0.84-0.89, raised at the default level, not at QUIET's


def _series(
    device: str, metric: str, n: int, step_at: int, seed: int = 5, step: float = 1.0
) -> list[Reading]:
    """Steady noise (sigma 0.1) with a ``step`` (10 sigma) from ``step_at`` on."""
    rng = np.random.default_rng(seed)
    return [
        Reading(device, "s", metric, i * 10**9, 20.0 + rng.normal(0, 0.1) + step * (i >= step_at))
        for i in range(n)
    ]


def _feed(engine: DetectionEngine, readings: list[Reading], chunk: int = 100) -> list[Anomaly]:
    out: list[Anomaly] = []
    for i in range(0, len(readings), chunk):
        out += engine.observe(readings[i : i + chunk])
    return out


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        ("not a list item", "detection.rules[0]: must be a mapping"),
        ([{"mv_on": 8.0}], "detection.rules[0].match: required"),
        ([{"match": {"kind": "pump", "site": "x"}, "mv_on": 8.0}], "rules[0].match.site: unknown"),
        ([{"match": {"kind": ""}, "mv_on": 8.0}], "rules[0].match.kind: must be a non-empty"),
        ([{"match": {"kind": "pump"}}], "detection.rules[0]: sets nothing"),
        ([{"match": {"kind": "pump"}, "enabled": "no"}], "rules[0].enabled: must be true or false"),
        (
            [{"match": {"kind": "a"}, "mv_on": 8.0}, {"match": {"metric": "t*"}, "mv_on": 9.0}],
            "detection.rules[1].mv_on: a device model setting",
        ),
        ([{"match": {"device": "d1"}, "mv_onn": 8.0}], "detection.rules[0]: detection settings"),
        ([{"match": {"device": "d1"}, "mv_on": "high"}], "mv_on: must be like 7.0"),
        (
            [{"match": {"device": "d1"}, "load_change_rows": -1}],
            "load_change_rows: -1; must be a whole number, from 0",
        ),
        (
            [{"match": {"device": "d1"}, "silent_after_rows": 2.5}],
            "silent_after_rows: 2.5; must be a whole number",
        ),
        (
            [{"match": {"metric": "temp"}, "stuck_learn_readings": -1}],
            "stuck_learn_readings: -1; must be a whole number, from 0",
        ),
        (
            [{"match": {"device": "d1"}, "row_tolerance_ms": -5}],
            "row_tolerance_ms: -5; must be",
        ),
        (
            [{"match": {"metric": "t"}, "row_tolerance_ms": 100}],
            "detection.rules[0].row_tolerance_ms: a device model setting",
        ),
        (
            [{"match": {"metric": "t"}, "streaming": {"calibrate_after": -3}}],
            "streaming.calibrate_after: -3; must be a whole number",
        ),
        (
            [{"match": {"metric": "t"}, "streaming": {"alert": 0.5}}],
            "detection.rules[0]: detection settings: streaming: unknown key(s) alert",
        ),
        (
            [{"match": {"kind": "pump"}, "warmpu": 10}],
            "detection.rules[0]: detection settings: unknown key(s) warmpu (did you mean "
            "'warmup'?)",
        ),
        (
            [{"match": {"metric": "t"}, "streaming": {"shrot": 3}}],
            "streaming: unknown key(s) shrot (did you mean 'short'?)",
        ),
        (
            [{"match": {"metric": "t"}, "streaming": {"components": ["value", "trend"]}}],
            "streaming.components: ['value', 'trend']; choose from value, level",
        ),
    ],
)
def test_a_bad_rule_is_refused_naming_the_rule_and_the_key(rules: Any, expected: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_rules(rules if isinstance(rules, list) else [rules])
    assert expected in str(err.value)


def test_rules_apply_in_order_and_merge_key_by_key() -> None:
    rules = parse_rules(
        [
            {"match": {"kind": "pump*"}, "mv_on": 8.0, "streaming": {"alert_level": 0.4}},
            {"match": {"kind": "pump-xl"}, "mv_on": 9.0},
            {"match": {"kind": "pump*", "metric": "*temp"}, "streaming": {"history": 2000}},
            {"match": {"device": "p7", "metric": "flow"}, "enabled": False},
        ]
    )
    small, on = resolve(BASE, rules, "p1", "pump-s")
    assert on and small.mv_on == 8.0 and small.streaming["alert_level"] == 0.4
    assert small.streaming["history"] == BASE.streaming["history"]  # merged, not replaced
    assert resolve(BASE, rules, "p2", "pump-xl")[0].mv_on == 9.0  # the later rule wins
    temp, _ = resolve(BASE, rules, "p1", "pump-s", "bearing_temp")
    assert temp.streaming == {**BASE.streaming, "alert_level": 0.4, "history": 2000}
    # A metric rule never changes the device as a whole; a device of no kind matches no kind.
    assert resolve(BASE, rules, "p1", "pump-s")[0].streaming["history"] == BASE.streaming["history"]
    assert resolve(BASE, rules, "p1", None) == (BASE, True)
    assert resolve(BASE, rules, "p7", None, "flow") == (BASE, False)
    assert resolve(BASE, rules, "p7", None, "flow_total")[1]


def test_a_kind_rule_changes_what_is_raised_for_that_kind_only() -> None:
    kinds = {"m1": "press", "m2": "lathe"}
    rules = parse_rules([{"match": {"kind": "lathe"}, **QUIET}])
    engine = DetectionEngine(BASE, rules, kinds.get)
    out = _feed(
        engine,
        _series("m1", "temp", 600, 500, step=SMALL) + _series("m2", "temp", 600, 500, step=SMALL),
    )
    assert [a.device for a in out] == ["m1"]
    assert engine.metrics[("m2", "temp")].alert_level == 0.99
    # Without the rule both raise: the lathe was silenced by its rule, not by its data.
    plain = _feed(
        DetectionEngine(BASE),
        _series("m1", "t", 600, 500, step=SMALL) + _series("m2", "t", 600, 500, step=SMALL),
    )
    assert sorted(a.device for a in plain) == ["m1", "m2"]


def test_a_disabled_metric_is_not_watched_nor_part_of_the_device_model() -> None:
    rules = parse_rules([{"match": {"metric": "door_*"}, "enabled": False}])
    engine = DetectionEngine(replace(BASE, multivariate=True), rules)
    readings = _series("m1", "door_open", 600, 500) + _series("m1", "temp", 600, 10**6, seed=6)
    assert _feed(engine, readings) == []
    assert ("m1", "door_open") not in engine.metrics
    assert ("m1", "door_open") not in engine.stuck
    assert engine.devices["m1"].metrics == ["temp"]


def test_a_disabled_device_is_silent_except_for_metrics_enabled_again() -> None:
    # The metrics are fed one after another, not side by side: no "silent" reports.
    settings = replace(BASE, multivariate=True, mv_train_rows=100, silent_after_rows=0)
    readings = _series("m1", "temp", 600, 500) + _series("m1", "vib", 600, 10**6, seed=6)
    readings += _series("m1", "door", 600, 500, seed=7)
    rules = [
        {"match": {"device": "m1"}, "enabled": False},
        {"match": {"device": "m1", "metric": "[tv]*"}, "enabled": True},
    ]
    engine = DetectionEngine(settings, parse_rules(rules))
    assert [a.metric for a in _feed(engine, readings)] == ["temp"]
    assert ("m1", "door") not in engine.metrics and ("m1", "vib") in engine.metrics
    assert engine.devices["m1"].model is None  # the device model stays off...
    control = DetectionEngine(settings)
    _feed(control, readings)
    assert control.devices["m1"].model is not None  # ...which it would not be otherwise


def test_a_kind_named_after_the_first_data_applies_from_then_on() -> None:
    kinds: dict[str, str] = {}
    asked: list[str] = []

    def kind_of(device: str) -> str | None:
        asked.append(device)
        return kinds.get(device)

    engine = DetectionEngine(BASE, parse_rules([{"match": {"kind": "lathe"}, **QUIET}]), kind_of)
    engine.KIND_RECHECK_S = 0.0
    _feed(engine, _series("m2", "temp", 300, 10**6))
    assert engine.metrics[("m2", "temp")].alert_level == BASE.streaming["alert_level"]
    kinds["m2"] = "lathe"  # its birth message arrives
    assert _feed(engine, _series("m2", "temp", 1200, 1000, step=SMALL)[300:]) == []
    assert engine.metrics[("m2", "temp")].alert_level == 0.99
    n = len(asked)
    _feed(engine, _series("m2", "temp", 100, 10**6))
    assert len(asked) == n  # a known kind is not asked again


def test_a_failing_kind_lookup_does_not_stop_detection(caplog: pytest.LogCaptureFixture) -> None:
    def kind_of(device: str) -> str | None:
        raise OSError("registry unavailable")

    engine = DetectionEngine(BASE, parse_rules([{"match": {"kind": "lathe"}, **QUIET}]), kind_of)
    with caplog.at_level(logging.WARNING, "millstream.detection"):
        out = _feed(engine, _series("m1", "temp", 600, 500))
    assert [a.device for a in out] == ["m1"]
    assert "could not look up the kind of device m1" in caplog.text


def test_changed_settings_apply_after_a_restart(tmp_path: Path) -> None:
    before = DetectionEngine(replace(BASE, multivariate=True))
    _feed(before, _series("m1", "temp", 400, 10**6) + _series("m2", "temp", 400, 10**6, seed=7))
    before.save(tmp_path)
    saved_n = before.metrics[("m2", "temp")].n

    # The settings file changed: one device gets a rule, and the global alarm level moved.
    settings = replace(BASE, multivariate=True, streaming={**BASE.streaming, "alert_level": 0.4})
    after = DetectionEngine(settings, parse_rules([{"match": {"device": "m1"}, **QUIET}]))
    after.load_state(before.state_dict())
    assert after.metrics[("m1", "temp")].alert_level == 0.99
    assert after.metrics[("m2", "temp")].alert_level == 0.4
    assert after.restarted == 2 and after.metrics[("m1", "temp")].n == 0
    # A metric switched off since: its detectors are dropped.
    off = DetectionEngine(BASE, parse_rules([{"match": {"device": "m2"}, "enabled": False}]))
    off.load_state(before.state_dict())
    assert ("m2", "temp") not in off.metrics and ("m2", "temp") not in off.stuck
    assert ("m1", "temp") in off.stuck
    # The same settings again: everything continues where it was.
    same = DetectionEngine(replace(BASE, multivariate=True))
    same.load_state(before.state_dict())
    assert same.restarted == 0 and same.metrics[("m2", "temp")].n == saved_n
    # DetectionEngine.load without settings restores the saved ones.
    assert DetectionEngine.load(tmp_path).settings == before.settings


def test_a_changed_device_model_setting_refits_from_the_kept_rows() -> None:
    settings = EngineSettings(
        warmup=50, mv_train_rows=300, mv_retrain_rows=10**6, mv_resolution_s=0.0
    )
    rng = np.random.default_rng(3)
    load = np.cumsum(rng.normal(0, 0.05, 700))

    def rows(lo: int, hi: int) -> list[Reading]:
        return [
            Reading("m1", "s", m, i * 10**9, k * load[i] + rng.normal(0, 0.05))
            for i in range(lo, hi)
            for m, k in (("a", 1.0), ("b", 2.0), ("c", -1.0))
        ]

    first = DetectionEngine(settings)
    _feed(first, rows(0, 400), chunk=300)
    assert first.devices["m1"].model is not None
    state = first.state_dict()

    gates_only = DetectionEngine(replace(settings, mv_on=9.0))
    gates_only.load_state(state)
    dev = gates_only.devices["m1"]
    assert dev.model is not None and dev.gates == [] and dev.s.mv_on == 9.0

    refit = DetectionEngine(replace(settings, mv_smooth_rows=120))
    refit.load_state(state)
    dev = refit.devices["m1"]
    assert dev.model is None and len(dev.rows) == 400  # the rows are kept...
    _feed(refit, rows(400, 410), chunk=30)
    assert dev.model is not None and dev.model.smooth == 120  # ...and refitted at once


def test_the_settings_file_names_a_bad_rule(tmp_path: Path) -> None:
    path = tmp_path / "cloud.yaml"
    path.write_text(
        "detection:\n"
        "  rules:\n"
        "    - match: {kind: compressor}\n"
        "      mv_on: 8.0\n"
        "    - match: {kind: compressor, metric: discharge_temp}\n"
        "      mv_off: 3.0\n"
    )
    with pytest.raises(SettingsError) as err:
        load_settings(path, environ={})
    assert f"{path}:2: detection.rules: " in str(err.value)
    assert "detection.rules[1].mv_off: a device model setting" in str(err.value)
    path.write_text(
        "detection:\n  rules:\n    - match: {kind: compressor}\n      streaming: {alert_level: 0.45}\n"
    )
    assert load_settings(path, environ={}).detection.rules[0]["match"] == {"kind": "compressor"}


def test_check_config_counts_the_rules_and_names_a_bad_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from millstream_cloud.cli import main

    path = tmp_path / "cloud.yaml"
    path.write_text(
        "detection:\n  rules:\n"
        "    - match: {kind: compressor}\n      mv_on: 8.0\n"
        "    - match: {metric: door_*}\n      enabled: false\n"
    )
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert ": OK (" in out and "2 detection rules)" in out
    path.write_text("detection:\n  rules:\n    - match: {metric: door_*}\n      mv_on: 8.0\n")
    assert main(["check-config", str(path)]) == 2
    assert "detection.rules[0].mv_on: a device model setting" in capsys.readouterr().err


def test_a_lone_bar_set_alone_applies_to_young_metrics_too() -> None:
    from millstream_cloud.detection.engine import settings_from_mapping

    rules = parse_rules(
        [
            {"match": {"kind": "press"}, "streaming_min_score": 0.9},
            {
                "match": {"kind": "lathe"},
                "streaming_min_score": 0.9,
                "streaming_min_score_young": 0.8,
            },
        ]
    )
    press, _ = resolve(BASE, rules, "p1", "press")
    lathe, _ = resolve(BASE, rules, "l1", "lathe")
    assert (press.streaming_min_score, press.streaming_min_score_young) == (0.9, 0.9)
    assert (lathe.streaming_min_score, lathe.streaming_min_score_young) == (0.9, 0.8)
    quieter = settings_from_mapping({"streaming_min_score": 0.8})
    assert quieter.streaming_min_score_young == 0.8
    assert settings_from_mapping({"streaming_min_score_young": 0.6}).streaming_min_score == 0.7


def _metric_states(state: dict[str, Any]) -> list[dict[str, Any]]:
    """The saved per-metric detectors of an engine's ``state_dict()``."""
    return [st for dev in state["devices"].values() for st in dev["metrics"].values()]


def test_a_state_saved_before_calibrate_after_existed_continues_without_restarting() -> None:
    # Such a state's detectors have calibrate_after 0 (and no key for it); the setting only
    # matters in a detector's first values, so one past them takes it on instead of
    # learning afresh. A detector still inside them restarts, as any changed setting does.
    old = replace(BASE, streaming={**BASE.streaming, "calibrate_after": 0})
    before = DetectionEngine(old)
    _feed(before, _series("m1", "temp", 300, 10**6) + _series("m2", "temp", 40, 10**6, seed=7))
    state = before.state_dict()
    for st in _metric_states(state):
        del st["params"]["calibrate_after"]
    after = DetectionEngine(BASE)
    after.load_state(state)
    assert after.restarted == 1 and after.metrics[("m2", "temp")].n == 0
    assert after.metrics[("m1", "temp")].n == 300
    assert after.metrics[("m1", "temp")].calibrate_after == BASE.streaming["calibrate_after"]


def test_a_state_saved_before_the_spike_component_takes_it_on_without_restarting() -> None:
    # Its detectors were saved with four components; the spike component's statistic is
    # rebuilt from the values they remember, so they neither restart nor go blind to it.
    four = ["value", "level", "volatility", "seasonal"]
    old = replace(BASE, streaming={**BASE.streaming, "components": four})
    before = DetectionEngine(old)
    _feed(before, _series("m1", "temp", 600, 10**6))
    state = before.state_dict()
    for st in _metric_states(state):
        for part in ("parts", "cal"):
            st[part].pop("spike", None)
    after = DetectionEngine(BASE)
    after.load_state(state)
    det = after.metrics[("m1", "temp")]
    assert after.restarted == 0 and det.n == 600 and "spike" in det.components
    assert det.params() == DetectionEngine(BASE)._detector("m9", "temp").params()
    assert len(det.cal["spike"].stats) == 600 - 5  # from the remembered values
    out = after.observe([Reading("m1", "s", "temp", 600 * 10**9, 22.0)])  # 20 sigma
    assert [a.detector for a in out] == ["ensemble:spike"]
    # A detector with a component the settings no longer list starts afresh.
    state = after.state_dict()
    fewer = replace(BASE, streaming={**BASE.streaming, "components": four})
    again = DetectionEngine(fewer)
    again.load_state(state)
    assert again.restarted == 1


def test_a_rule_adding_the_pattern_component_keeps_what_the_detector_learned() -> None:
    before = DetectionEngine(BASE)
    _feed(before, _series("m1", "temp", 600, 10**6))
    comps = [*COMPONENTS, "pattern"]
    rules = parse_rules([{"match": {"metric": "temp"}, "streaming": {"components": comps}}])
    after = DetectionEngine(BASE, rules)
    after.load_state(before.state_dict())
    det = after.metrics[("m1", "temp")]
    assert after.restarted == 0 and det.n == 600 and "pattern" in det.components
    # Rebuilt from the 600 values it remembers: 200 to fit its bins, then one a value.
    assert len(det.cal["pattern"].stats) == 400 and det.parts["pattern"].ready
    assert np.isfinite(det.update(10.0))


@pytest.mark.parametrize("before", [6000, 400])
def test_a_state_saved_with_another_history_takes_the_new_one_on_without_restarting(
    before: int,
) -> None:
    # The live history went from 6000 to 17280 values (two days at 10 s): detectors saved
    # with the old one keep what they remember (all of it; the latest when the new one is
    # shorter) instead of learning afresh for their whole warm-up.
    old = replace(BASE, streaming={**BASE.streaming, "history": before})
    saved = DetectionEngine(old)
    _feed(saved, _series("m1", "temp", 1000, 10**6))
    after = DetectionEngine(replace(BASE, streaming={**BASE.streaming, "history": 500}))
    after.load_state(saved.state_dict())
    det = after.metrics[("m1", "temp")]
    assert after.restarted == 0 and det.n == 1000 and det.history == 500
    assert len(det.parts["value"].ref) == min(before, 500)
    assert max(len(c.stats) for c in det.cal.values()) == min(before, 500)
    assert {c.stats.size for c in det.cal.values()} == {500}
    assert det.params() == DetectionEngine(after.settings)._detector("m9", "temp").params()
    out = after.observe([Reading("m1", "s", "temp", 1000 * 10**9, 22.0)])  # 20 sigma
    assert [a.metric for a in out] == ["temp"]


def test_a_state_saved_before_the_week_memory_takes_it_on_without_restarting() -> None:
    # Its detectors were saved without `memory`: they keep what they remember and start
    # remembering extremes from the values their calibrations hold.
    old = replace(BASE, streaming={**BASE.streaming, "memory": 0})
    saved = DetectionEngine(old)
    _feed(saved, _series("m1", "temp", 800, 10**6))
    state = saved.state_dict()
    for st in _metric_states(state):
        del st["params"]["memory"]
    short = replace(BASE, streaming={**BASE.streaming, "history": 500, "memory": 5000})
    after = DetectionEngine(short)
    after.load_state(state)
    det = after.metrics[("m1", "temp")]
    assert after.restarted == 0 and det.n == 800 and det.memory == 5000
    for cal in det.cal.values():
        assert cal.stats.memory is not None and cal.stats.memory.covered == len(cal.stats)
    assert det.params() == DetectionEngine(short)._detector("m9", "temp").params()
    again = DetectionEngine(short)
    again.load_state(json.loads(json.dumps(after.state_dict())))
    mem, was = (e.metrics[("m1", "temp")].cal["level"].stats.memory for e in (again, after))
    assert mem is not None and was is not None and mem.covered == was.covered > 0
    assert mem.forgotten(0)[0].tolist() == was.forgotten(0)[0].tolist()


def test_a_metric_rule_turns_the_spike_check_off_and_a_restart_keeps_what_it_learned(
    tmp_path: Path,
) -> None:
    # Bursts of 10-sigma spikes on two metrics of a device, each spike its own reading; a
    # rule sets spike_count 0 for one: only the other's burst is raised.
    rng = np.random.default_rng(1)
    n = 3 * 3600 + 600
    spikes = {10000, 10100, 10250, 10400, 10500}
    readings = [
        Reading("m1", "s", m, i * 10**9, 20.0 + rng.normal(0, 0.1) + (1.0 if i in spikes else 0))
        for i in range(n)
        for m in ("current", "vibration")
    ]
    rules = parse_rules([{"match": {"metric": "vibration"}, "spike_count": 0}])
    engine = DetectionEngine(replace(BASE, warmup=10**6), rules)
    out = _feed(engine, readings[: 2 * 10200])
    engine.save(tmp_path)
    again = DetectionEngine(replace(BASE, warmup=10**6), rules)  # as the service does
    assert again.restore(tmp_path)
    rest = readings[2 * 10200 :]
    for e in (engine, again):
        found = out + _feed(e, rest)
        assert [(a.detector, a.metric) for a in found] == [("spikes", "current")], found
    assert engine.spikes[("m1", "vibration")].count == 0
    assert (
        engine.spikes[("m1", "current")].state_dict()
        == again.spikes[("m1", "current")].state_dict()
    )


def test_a_rule_can_add_the_optional_pattern_component_to_a_metric() -> None:
    comps = [*BASE.streaming.get("components", COMPONENTS), "pattern"]
    rules = parse_rules([{"match": {"metric": "cycle_*"}, "streaming": {"components": comps}}])
    s, on = resolve(BASE, rules, "m1", None, "cycle_time")
    det = StreamingEnsemble(warmup=s.warmup, **s.streaming)
    assert on and "pattern" in det.components and "pattern" in det.cal
    # ... and only there: the live default leaves it out (its cost, docs/detection.md).
    other = resolve(BASE, rules, "m1", None, "temp")[0]
    assert "pattern" not in StreamingEnsemble(warmup=other.warmup, **other.streaming).components


def test_a_metric_given_the_pattern_component_reports_a_changed_order_in_words() -> None:
    # A cycle 0,1,2,3 for 3000 readings, then 0,2,1,3: every value as ordinary as
    # before, only their order new. The value alone raises nothing; with `pattern`, one
    # anomaly, which says so (and none when the component starts, 200 readings in).
    rng = np.random.default_rng(0)
    cycles = np.concatenate([np.resize([0.0, 1, 2, 3], 3000), np.resize([0.0, 2, 1, 3], 200)])
    values = cycles + rng.normal(0, 0.05, len(cycles))
    readings = [
        Reading("m1", "s", "cycle_time", i * 10**10, float(v)) for i, v in enumerate(values)
    ]
    found = {}
    for comps in (["value"], ["value", "pattern"]):
        rule = {"match": {"metric": "cycle_*"}, "streaming": {"components": comps}}
        found[len(comps)] = _feed(DetectionEngine(BASE, parse_rules([rule])), readings)
    assert found[1] == []
    [a] = found[2]
    assert a.detector == "ensemble:pattern" and 3000 <= a.time_ns // 10**10 < 3010
    assert "out of its usual pattern" in a.explanation and "\u03c3" not in a.explanation  # no sigma
