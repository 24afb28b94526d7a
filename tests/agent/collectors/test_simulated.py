"""The simulated machine: realistic, reproducible signals and faults with ground truth."""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

import pytest

from millstream_agent.collectors import collector_class
from millstream_agent.collectors._options import parse_rfc3339
from millstream_agent.collectors.simulated import (
    MACHINE_METRICS,
    SimulatedCollector,
    generate,
)

T0 = 1_764_000_000.0  # 2025-11-24T16:00:00Z


# Written out rather than zip(strict=)/statistics.correlation so the suite runs on 3.9 too.
def pairs(a: list[Any], b: list[Any]) -> list[tuple[Any, Any]]:
    assert len(a) == len(b)
    return [(a[i], b[i]) for i in range(len(a))]


def correlation(x: list[float], y: list[float]) -> float:
    mx, my = statistics.fmean(x), statistics.fmean(y)
    sxy = sum((a - mx) * (b - my) for a, b in pairs(x, y))
    return sxy / (len(x) * statistics.pstdev(x) * statistics.pstdev(y))


def run(options: dict[str, Any], seconds: int, name: str = "m1") -> list[dict[str, float]]:
    """One dict metric -> value per second (empty dict during a dropout)."""
    collector = SimulatedCollector(name, options)
    return [{s.metric: s.value for s in samples} for _, samples in generate(collector, T0, seconds)]


def test_registered_under_its_name() -> None:
    assert collector_class("simulated") is SimulatedCollector


@pytest.mark.parametrize("kind", sorted(MACHINE_METRICS))
def test_each_kind_has_at_least_ten_metrics_with_units(kind: str) -> None:
    samples = SimulatedCollector("m", {"kind": kind, "metrics": 12, "faults": "none"}).collect(T0)
    assert len(samples) == 12
    assert len({s.metric for s in samples}) == 12
    assert sum(1 for s in samples if s.unit) >= 11
    assert all(s.ts == T0 and s.quality == "good" for s in samples)


def test_metrics_beyond_the_table_cycle_with_a_suffix() -> None:
    collector = SimulatedCollector("m", {"metrics": 30, "faults": "none"})
    names = [s.metric for s in collector.collect(T0)]
    assert len(names) == len(set(names)) == 30
    assert names[12] == "bearing_vibration_1"
    assert names[23] == "torque_1"
    assert names[29] == "power_2"


def test_same_seed_same_signals_different_device_different_signals() -> None:
    a = run({"seed": 7, "faults": "none"}, 300)
    b = run({"seed": 7, "faults": "none"}, 300)
    c = run({"seed": 7, "faults": "none"}, 300, name="m2")
    d = run({"seed": 8, "faults": "none"}, 300)
    assert a == b
    assert a != c
    assert a != d


def test_load_moves_related_metrics_together() -> None:
    rows = run({"seed": 1, "faults": "none", "load_change_interval": "2m"}, 3600)
    current = [r["current"] for r in rows]
    power = [r["power"] for r in rows]
    speed = [r["speed"] for r in rows]
    assert correlation(current, power) > 0.9
    # An induction motor slows a little under load (slip).
    assert correlation(current, speed) < -0.5


def test_temperatures_follow_load_with_a_lag() -> None:
    rows = run({"seed": 2, "faults": "none", "load_change_interval": "10m"}, 7200)
    current = [r["current"] for r in rows]
    winding = [r["winding_temperature"] for r in rows]

    # Within a minute of a load change the current has moved most of its range; the
    # winding, with a thermal time constant of ten minutes, only a small part of it.
    def minute_change(xs: list[float]) -> float:
        return max(abs(xs[i + 60] - xs[i]) for i in range(len(xs) - 60)) / (max(xs) - min(xs))

    assert minute_change(current) > 0.5
    assert minute_change(winding) < 0.3
    lagged = correlation(current[:-600], winding[600:])
    assert lagged > correlation(current, winding) - 0.05


def test_daily_cycle_warms_the_afternoon() -> None:
    collector = SimulatedCollector("m", {"seed": 1, "faults": "none"})
    day = T0 - (T0 % 86400)
    ambient = {}
    for hour in range(24):
        values = collector.values(day + hour * 3600)
        ambient[hour] = values[collector.metric_names.index("ambient_temperature")]
    assert ambient[15] > ambient[3] + 5


def test_faults_do_not_change_the_machine_outside_their_intervals() -> None:
    clean = run({"seed": 5, "faults": "none"}, 4 * 3600)
    collector = SimulatedCollector("m1", {"seed": 5, "fault_rate_per_hour": 4})
    faulty = [
        {s.metric: s.value for s in samples} for _, samples in generate(collector, T0, 4 * 3600)
    ]
    truth = collector.ground_truth
    assert len(truth) >= 3
    intervals = [(parse_rfc3339(g["start"], "s"), parse_rfc3339(g["end"], "e")) for g in truth]
    inside = 0
    for i, c in enumerate(clean):
        f = faulty[i]
        ts = T0 + i
        if any(s <= ts < e for s, e in intervals):
            inside += 1
            continue
        assert c == f, f"second {i} differs outside every fault"
    assert inside > 0


def one_fault(fault: dict[str, Any], seconds: int = 1200, **options: Any) -> tuple:
    clean = run({"seed": 3, "faults": "none", **options}, seconds)
    collector = SimulatedCollector("m1", {"seed": 3, "faults": [fault], **options})
    faulty = [
        {s.metric: s.value for s in samples} for _, samples in generate(collector, T0, seconds)
    ]
    return clean, faulty, collector.ground_truth


def test_drift_rises_linearly_to_magnitude_sigma() -> None:
    clean, faulty, truth = one_fault(
        {
            "type": "drift",
            "metric": "bearing_vibration",
            "start": "1m",
            "duration": "10m",
            "magnitude": 2.0,
        }
    )
    sigma = 0.05
    diff = [f["bearing_vibration"] - c["bearing_vibration"] for c, f in pairs(clean, faulty)]
    assert diff[59] == 0
    assert diff[60 + 300] == pytest.approx(1.0 * sigma, abs=2e-4)
    assert diff[60 + 599] == pytest.approx(2.0 * sigma * 599 / 600, abs=2e-4)
    assert diff[60 + 600] == 0
    assert truth == [
        {
            "device": "m1",
            "collector": "m1",
            "kind": "motor",
            "fault": "drift",
            "metrics": ["bearing_vibration"],
            "start": "2025-11-24T16:01:00.000Z",
            "end": "2025-11-24T16:11:00.000Z",
            "magnitude": 2.0,
        }
    ]


def test_overheat_raises_every_machine_temperature_not_ambient() -> None:
    clean, faulty, truth = one_fault({"type": "overheat", "start": 60, "duration": 600})
    assert truth[0]["metrics"] == ["winding_temperature", "housing_temperature"]
    late = 60 + 590
    assert faulty[late]["winding_temperature"] - clean[late]["winding_temperature"] > 8
    assert faulty[late]["ambient_temperature"] == clean[late]["ambient_temperature"]


def test_stuck_sensor_repeats_one_value() -> None:
    clean, faulty, _ = one_fault(
        {"type": "stuck", "metric": "current", "start": 100, "duration": 200}
    )
    stuck = {faulty[i]["current"] for i in range(100, 300)}
    assert len(stuck) == 1
    assert len({clean[i]["current"] for i in range(100, 300)}) > 100
    assert faulty[300]["current"] == clean[300]["current"]


def test_spike_hits_one_sample() -> None:
    clean, faulty, truth = one_fault(
        {"type": "spike", "metric": "power", "start": 100, "magnitude": -10}
    )
    diffs = [round(f["power"] - c["power"], 6) for c, f in pairs(clean, faulty)]
    assert [i for i, d in enumerate(diffs) if d] == [100]
    assert diffs[100] == pytest.approx(-10 * 0.06, abs=1e-3)
    assert truth[0]["end"] == "2025-11-24T16:01:41.000Z"


def test_shift_and_dropout() -> None:
    clean, faulty, truth = one_fault(
        {"type": "shift", "metric": "voltage", "start": 10, "duration": 20, "magnitude": 3}
    )
    assert faulty[15]["voltage"] - clean[15]["voltage"] == pytest.approx(1.8, abs=1e-3)
    clean, faulty, truth = one_fault({"type": "dropout", "start": 10, "duration": 20})
    assert [i for i, row in enumerate(faulty) if not row] == list(range(10, 30))
    assert truth[0]["metrics"] == [s for s in clean[0]]


def test_absolute_start_time() -> None:
    _, faulty, truth = one_fault(
        {"type": "dropout", "start": "2025-11-24T17:00:05+01:00", "duration": "5s"}
    )
    assert [i for i, row in enumerate(faulty) if not row] == [5, 6, 7, 8, 9]
    assert truth[0]["start"] == "2025-11-24T16:00:05.000Z"


def test_ground_truth_file_is_jsonl_with_rfc3339_utc(tmp_path: Any) -> None:
    path = tmp_path / "truth.jsonl"
    options = {"seed": 9, "fault_rate_per_hour": 6, "ground_truth": str(path), "device": "press-7"}
    collector = SimulatedCollector("sim", options)
    for _ in generate(collector, T0, 6 * 3600):
        pass
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == collector.ground_truth
    assert len(lines) >= 10
    ends = []
    for record in lines:
        assert record["device"] == "press-7"
        assert record["start"].endswith("Z") and record["end"].endswith("Z")
        start, end = parse_rfc3339(record["start"], "s"), parse_rfc3339(record["end"], "e")
        assert end > start >= T0 + 300  # quiet for fault_start_after (5m) first
        ends.append((start, end))
    # The random schedule has one fault at a time, so intervals never overlap.
    for (_, e1), (s2, _) in pairs(ends[:-1], ends[1:]):
        assert s2 >= e1
    assert {r["fault"] for r in lines} >= {"spike", "dropout", "stuck"}


def test_auto_rate_is_roughly_the_configured_rate() -> None:
    collector = SimulatedCollector(
        "m", {"seed": 1, "fault_rate_per_hour": 2, "fault_types": ["spike"]}
    )
    for _ in generate(collector, T0, 50 * 3600, interval=10.0):
        pass
    assert 60 < len(collector.ground_truth) < 140


@pytest.mark.parametrize(
    ("kind", "fault_types", "expected"),
    [
        # A planned overheating heats the machine's temperatures (it was always turned
        # into a level shift of one metric); drift goes to a vibration; a machine without
        # such a sensor gets a level shift instead.
        ("motor", ["overheat"], {("overheat", ("housing_temperature", "winding_temperature"))}),
        ("motor", ["drift"], {("drift", ("axial_vibration",)), ("drift", ("bearing_vibration",))}),
    ],
)
def test_auto_faults_hit_the_metrics_their_type_names(
    kind: str, fault_types: list[str], expected: set[tuple[str, tuple[str, ...]]]
) -> None:
    collector = SimulatedCollector(
        "m", {"kind": kind, "seed": 1, "fault_rate_per_hour": 4, "fault_types": fault_types}
    )
    for _ in generate(collector, T0, 20 * 3600, interval=10.0):
        pass
    got = {(g["fault"], tuple(sorted(g["metrics"]))) for g in collector.ground_truth}
    assert len(collector.ground_truth) > 10 and got == expected


def test_an_auto_overheat_on_a_machine_without_temperatures_is_a_level_shift() -> None:
    collector = SimulatedCollector(
        "m", {"kind": "motor", "metrics": 1, "seed": 1, "fault_rate_per_hour": 4,
              "fault_types": ["overheat"]},
    )  # fmt: skip
    for _ in generate(collector, T0, 5 * 3600, interval=10.0):
        pass
    assert {g["fault"] for g in collector.ground_truth} == {"shift"}


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"kind": "turbine"}, "kind"),
        ({"metrics": 0}, "metrics"),
        ({"metric": 3}, "metric"),
        ({"faults": "sometimes"}, "faults"),
        ({"faults": [{"type": "melt", "start": 1}]}, "faults[0].type"),
        ({"faults": [{"type": "spike", "metric": "nope", "start": 1}]}, "faults[0].metric"),
        ({"faults": [{"type": "spike"}]}, "faults[0].start"),
        ({"faults": [{"type": "spike", "start": "soon"}]}, "faults[0].start"),
        ({"faults": [{"type": "spike", "start": 1, "magnitud": 3}]}, "faults[0].magnitud"),
        ({"faults": [{"type": "spike", "start": 1, "duration": 0}]}, "faults[0].duration"),
        ({"fault_types": ["spike", "melt"]}, "fault_types"),
        ({"fault_rate_per_hour": -1}, "fault_rate_per_hour"),
        ({"load_change_interval": "fast"}, "load_change_interval"),
    ],
)
def test_bad_options_are_refused_naming_the_key(options: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError) as info:
        SimulatedCollector("m", options)
    assert str(info.value).startswith(key + ":")


def test_collect_is_cheap() -> None:
    """1,000 devices x 10 metrics at 1 Hz on one core: well under 50 us per collect."""
    collector = SimulatedCollector("m", {"seed": 1})
    for i in range(1000):
        collector.collect(T0 + i)
    n = 20000
    start = time.perf_counter()
    for i in range(n):
        collector.collect(T0 + 1000 + i)
    per_call = (time.perf_counter() - start) / n
    # The budget is 50 us; allow slack for a loaded CI machine.
    assert per_call < 100e-6, f"{per_call * 1e6:.1f} us per collect"


def test_data_set_command_writes_csv_and_ground_truth(tmp_path: Any) -> None:
    import csv

    from millstream_agent.collectors.simulated import main

    out, truth = tmp_path / "sim.csv", tmp_path / "truth.jsonl"
    argv = ["--devices", "2", "--hours", "3", "--interval", "10", "--fault-rate", "3"]
    argv += ["--kind", "pump", "--out", str(out), "--ground-truth", str(truth)]
    assert main(argv) == 0
    rows = list(csv.DictReader(out.open()))
    assert {r["device"] for r in rows} == {"sim-0000", "sim-0001"}
    assert rows[0]["ts"] == "2026-01-05T00:00:00.000Z" and rows[0]["metric"] == "flow"
    faults = [json.loads(line) for line in truth.read_text().splitlines()]
    assert faults and {f["device"] for f in faults} <= {"sim-0000", "sim-0001"}
    assert main(argv) == 0  # a second run starts a fresh ground-truth file
    assert len(truth.read_text().splitlines()) == len(faults)
