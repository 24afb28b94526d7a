"""`make demo` shows real anomalies: the agent's simulator, with the demo's fault settings,
fed to the detection engine with the demo's warmup, raises anomalies on the injected faults
(right device and metric, inside the fault) and nowhere else, within the demo's first minutes.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from millstream_cloud.detection.eval import groundtruth
from millstream_cloud.model import Anomaly

simulated = pytest.importorskip("millstream_agent.collectors.simulated")

# As in scripts/demo.py: the simulate arguments (its detection settings:
# groundtruth.demo_settings(), checked against its config below).
DEMO_FAULTS = {"fault_rate_per_hour": 20.0, "fault_types": ["stuck", "spike"]}
DEMO_START_AFTER = "150s"
T0 = 1_764_000_000.0  # fixed start: the simulator's daily waves depend on the clock


def _run(
    options: dict[str, object], devices: list[str], seconds: int
) -> tuple[list[Anomaly], list[dict[str, object]]]:
    machines = [
        simulated.SimulatedCollector(
            "machine", {"kind": "motor", "metrics": 10, "seed": 1, "device": d, **options}
        )
        for d in devices
    ]
    return groundtruth.run_demo_fleet(machines, T0, seconds)


def _explained(a: Anomaly, truth: list[dict[str, Any]], slack: float = 60.0) -> bool:
    return any(groundtruth.covers(g, groundtruth.raised(a), slack) for g in truth)


ROOT = Path(__file__).resolve().parents[3]


def _demo_script() -> ModuleType:
    """scripts/demo.py, loaded as a module."""
    spec = importlib.util.spec_from_file_location("demo_script", ROOT / "scripts" / "demo.py")
    assert spec is not None and spec.loader is not None
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo


def test_the_demo_runs_detection_as_its_config_says() -> None:
    # scripts/demo.py writes its cloud config as YAML for users to read; the test and the
    # benchmark use groundtruth.demo_settings(): the same settings.
    import yaml

    from millstream_cloud.detection.engine import settings_from_mapping

    demo = _demo_script()
    engine = yaml.safe_load(demo.DEMO_CLOUD_CONFIG)["detection"]["engine"]
    assert settings_from_mapping(engine) == groundtruth.demo_settings()
    # The demo restates how much past a device model needs (it does not import the
    # detection package at start): the engine's defaults, with the past, decide.
    trained = groundtruth.demo_settings(history=True)
    assert trained.mv_train_rows * trained.mv_resolution_s == demo.DEVICE_MODEL_AFTER_S
    assert trained.mv_resolution_s >= demo.HISTORY_STEP_S


def test_the_demo_benchmark_and_these_tests_inject_the_demos_faults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # They restate the demo's fault types (the benchmark runs without the broker); the
    # demo's own, with its past and without, decide.
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    bench = importlib.import_module("detection_demo")
    types = {history: kinds.split(",") for history, kinds in _demo_script().FAULT_TYPES.items()}
    assert bench.FAULTS_WITH_HISTORY["fault_types"] == types[True]
    assert bench.FAULTS["fault_types"] == types[False] == DEMO_FAULTS["fault_types"]


@pytest.mark.parametrize(
    ("fault", "metric"),
    [({"type": "stuck"}, "current"), ({"type": "spike", "magnitude": 40}, "voltage")],
)
def test_demo_fault_after_warmup_is_flagged_on_its_metric(
    fault: dict[str, object], metric: str
) -> None:
    options = {"faults": [{**fault, "metric": metric, "start": DEMO_START_AFTER}]}
    anomalies, truth = _run(options, ["demo-plant-0001"], 240)
    assert len(truth) == 1
    hits = [a for a in anomalies if _explained(a, truth, slack=0.0)]
    assert hits, f"{fault} on {metric} not flagged; anomalies: {anomalies}"
    assert hits[0].metric == metric
    assert hits[0].time_ns / 1e9 - groundtruth.timestamp(truth[0]["start"]) <= 15.0


def test_demo_fleet_shows_true_anomalies_in_its_first_minutes() -> None:
    devices = [f"demo-plant-{i:04d}" for i in range(1, 11)]
    options = {**DEMO_FAULTS, "fault_start_after": DEMO_START_AFTER}
    anomalies, truth = _run(options, devices, 420)
    assert truth, "the demo's settings injected no fault in 7 minutes"
    assert anomalies, f"no anomaly in 7 minutes; faults: {truth}"
    stray = [a for a in anomalies if not _explained(a, truth)]
    assert not stray, f"anomalies outside any injected fault: {stray}"
    # Each anomaly goes to the default AnomalyDetected rule (min_likelihood 0.9).
    assert any(a.likelihood >= 0.9 for a in anomalies)


@pytest.mark.parametrize("metric", ["voltage", "bearing_vibration"])
def test_with_the_fleets_past_the_device_model_finds_what_the_demo_injects(metric: str) -> None:
    """The default demo (``--history 12h``): the fleet's healthy past trains the device
    model, so a 3-sigma level shift, which the young per-metric detectors miss, is found
    minutes in, on its metric, and nothing else is raised."""
    fault = "shift"
    spec: dict[str, object] = {"type": fault, "start": "150s", "metric": metric, "magnitude": 3.0}
    machines = [
        simulated.SimulatedCollector(
            "machine",
            {"kind": "motor", "metrics": 10, "seed": 1, "device": "demo-plant-0001",
             "faults": [spec]},
        )
    ]  # fmt: skip
    anomalies, truth = groundtruth.run_demo_fleet(machines, T0, 900, history_s=12.5 * 3600)
    assert len(truth) == 1
    hits = [a for a in anomalies if _explained(a, truth)]
    assert hits, f"{fault} not found; anomalies: {anomalies}"
    assert hits[0].detector == "virtual_sensor"
    delay = hits[0].time_ns / 1e9 - groundtruth.timestamp(truth[0]["start"])
    assert delay <= groundtruth.SETTLE_S[fault], delay
    stray = [a for a in anomalies if not _explained(a, truth)]
    assert not stray, f"anomalies outside the fault: {stray}"


def test_without_the_fleets_past_the_same_shift_is_not_found_in_the_demos_minutes() -> None:
    # What the past buys: the same fleet and shift, judged by the young per-metric
    # detectors alone (the demo with --history 0).
    machines = [
        simulated.SimulatedCollector(
            "machine",
            {"kind": "motor", "metrics": 10, "seed": 1, "device": "demo-plant-0001",
             "faults": [{"type": "shift", "metric": "voltage", "magnitude": 3.0,
                         "start": "150s"}]},
        )
    ]  # fmt: skip
    anomalies, truth = groundtruth.run_demo_fleet(machines, T0, 900)
    assert not [a for a in anomalies if _explained(a, truth)]


def test_with_the_fleets_past_an_overheating_is_named_on_the_temperatures_that_heat() -> None:
    """The agent's overheating heats a motor's winding and housing together; residuals
    read against each other cannot tell that from the ambient temperature they are both
    read against falling, which is what used to be named. The ambient's expected value
    moving faster than the ambient ever did rules it out."""
    machines = [
        simulated.SimulatedCollector(
            "machine",
            {"kind": "motor", "metrics": 10, "seed": 1, "device": "demo-plant-0001",
             "faults": [{"type": "overheat", "start": "150s"}]},
        )
    ]  # fmt: skip
    anomalies, truth = groundtruth.run_demo_fleet(machines, T0, 900, history_s=12.5 * 3600)
    assert [g["metrics"] for g in truth] == [["winding_temperature", "housing_temperature"]]
    hits = [a for a in anomalies if _explained(a, truth)]
    assert hits, f"overheating not found; anomalies: {anomalies}"
    assert hits[0].detector == "virtual_sensor"
    assert {a.metric for a in hits} <= {"winding_temperature", "housing_temperature"}, hits
    stray = [a for a in anomalies if not _explained(a, truth)]
    assert not stray, f"anomalies outside the fault: {stray}"
    # The ambient's own residual, the largest sigma of the first report, is said to be led
    # by the temperatures out of line, not left to read as a second fault.
    first = hits[0].explanation
    assert "ambient_temperature" in first, first
    assert "a prediction led by the metrics out of line: it moved faster than" in first, first
    assert "also ambient_temperature" not in first, first
    assert "ambient_temperature" in [c.metric for c in hits[0].contributions]
