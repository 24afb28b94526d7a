"""`make demo` shows real anomalies: the agent's simulator, with the demo's fault settings,
fed to the detection engine with the demo's warmup, raises anomalies on the injected faults
(right device and metric, inside the fault) and nowhere else, within the demo's first minutes.
"""

from __future__ import annotations

from datetime import datetime

import pytest

from millstream_cloud.detection.engine import DetectionEngine, EngineSettings
from millstream_cloud.model import Anomaly, Reading

simulated = pytest.importorskip("millstream_agent.collectors.simulated")

# As in scripts/demo.py: DEMO_CLOUD_CONFIG (warmup, resolution_s) and the simulate arguments.
DEMO_WARMUP = 120
DEMO_FAULTS = {"fault_rate_per_hour": 20.0, "fault_types": ["stuck", "spike"]}
DEMO_START_AFTER = "150s"
T0 = 1_764_000_000.0  # fixed start: the simulator's daily waves depend on the clock


def demo_settings() -> EngineSettings:
    """The demo's detection settings (scripts/demo.py): its warm-up, learning from every
    reading."""
    return EngineSettings(
        warmup=DEMO_WARMUP, streaming={**EngineSettings().streaming, "resolution_s": 0.0}
    )


def _run(
    options: dict[str, object], devices: list[str], seconds: int
) -> tuple[list[Anomaly], list[dict[str, object]]]:
    machines = [
        simulated.SimulatedCollector(
            "machine", {"kind": "motor", "metrics": 10, "seed": 1, "device": d, **options}
        )
        for d in devices
    ]
    engine = DetectionEngine(demo_settings())
    anomalies: list[Anomaly] = []
    batch: list[Reading] = []
    for k in range(seconds):
        for m in machines:
            batch += [
                Reading(m.device, "demo-plant", s.metric, int(s.ts * 1e9), s.value)
                for s in m.collect(T0 + k)
            ]
        if k % 5 == 4:  # the cloud scores each stored batch; the demo's are ~5 s of a fleet
            anomalies += engine.observe(batch)
            batch = []
    anomalies += engine.observe(batch)
    return anomalies, [g for m in machines for g in m.ground_truth]


def _ts(stamp: object) -> float:
    return datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()


def _explained(a: Anomaly, truth: list[dict[str, object]], slack: float = 60.0) -> bool:
    t = a.time_ns / 1e9
    return any(
        g["device"] == a.device
        and a.metric in g["metrics"]  # type: ignore[operator]
        and _ts(g["start"]) <= t <= _ts(g["end"]) + slack
        for g in truth
    )


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
    assert hits[0].time_ns / 1e9 - _ts(truth[0]["start"]) <= 15.0


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
