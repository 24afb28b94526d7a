from __future__ import annotations

import gzip
import json
import math
import re
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from millstream_cloud.detection.base import unpack_floats
from millstream_cloud.detection.engine import (
    DEVICE_DIR,
    STATE_FILE,
    DetectionEngine,
    DeviceModel,
    EngineSettings,
)
from millstream_cloud.detection.eval import runners
from millstream_cloud.detection.eval.sim import Fault, SimConfig, inject, simulate
from millstream_cloud.model import Anomaly, Reading

# The default settings (models trained after 12 h of 10-s rows); short fleets of one or two
# devices keep the tests fast. Many tests stamp their rows a second apart: their metrics
# learn every reading and their device models see every row, as before the 10-s intervals
# (resolution_s, mv_resolution_s; tested on their own).
FAST = EngineSettings(
    warmup=300,
    streaming={**EngineSettings().streaming, "resolution_s": 0.0},
    mv_resolution_s=0.0,
)
FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


def _pump_row(
    i: int,
    rng: np.random.Generator,
    spike: float = 0.0,
    device: str = "pump",
    flow: float = 50.0,
    pressure: float = 3.0,
) -> list[Reading]:
    """Row ``i`` (one a second) of a two-metric device, noise sigma 0.1; ``spike`` on flow."""
    return [
        Reading(device, "s", "flow", i * 10**9, flow + rng.normal(0, 0.1) + spike),
        Reading(device, "s", "pressure", i * 10**9, pressure + rng.normal(0, 0.1)),
    ]


def _run(cfg: SimConfig, settings: EngineSettings = FAST) -> tuple[list[Anomaly], list[Fault]]:
    fleet = simulate(cfg)
    engine = DetectionEngine(settings)
    out: list[Anomaly] = []
    for batch in fleet.batches():
        out.extend(engine.observe(batch))
    return out, fleet.faults


def test_metrics_read_one_after_another_still_make_one_row_per_sample() -> None:
    # Each metric stamped up to 0.4 s after the sample's time, as a sequential Modbus poll
    # or OPC UA source timestamps give: the device model still sees one row per sample
    # (not one per reading, half of them stale) and finds the fault as without jitter.
    cfg = SimConfig(seed=1, devices=1, hours=18, fault_after_h=13, faults=("level_shift",))
    fleet = simulate(cfg)
    rng = np.random.default_rng(2)
    engines = {tol: DetectionEngine(replace(FAST, row_tolerance_ms=tol)) for tol in (1000, 0)}
    out: dict[float, list[Anomaly]] = {tol: [] for tol in engines}
    for batch in fleet.batches():
        late = [
            msgspec.structs.replace(r, time_ns=r.time_ns + int(rng.uniform(0, 4e8))) for r in batch
        ]
        for tol, engine in engines.items():
            out[tol] += engine.observe(late)
    f = fleet.faults[0]
    hits = [a for a in out[1000] if f.start_ns <= a.time_ns <= f.end_ns + 600 * 10**9]
    assert hits and hits[0].metric == f.metric
    assert len(out[1000]) == 1  # the fault, nothing else
    samples = len(fleet.times_ns)
    (dev,) = engines[1000].devices.values()
    assert dev.row_no == samples
    # Without the tolerance every reading is a row, of mostly stale values.
    (exact,) = engines[0].devices.values()
    assert exact.row_no >= samples * len(exact.metrics) - 1


def test_simulator_is_deterministic_and_documents_its_faults() -> None:
    a = simulate(SimConfig(seed=3, devices=2, hours=6, fault_after_h=3, faults=("stuck",)))
    b = simulate(SimConfig(seed=3, devices=2, hours=6, fault_after_h=3, faults=("stuck",)))
    assert a.faults == b.faults and len(a.faults) == 1
    key = next(iter(a.series))
    assert np.array_equal(a.series[key], b.series[key])
    f = a.faults[0]
    i0 = int(np.searchsorted(a.times_ns, f.start_ns))
    stuck = a.series[(f.device, f.metric)][i0 : i0 + 100]
    assert np.all(stuck == stuck[0])


@pytest.mark.parametrize("kind", ["overheating", "level_shift", "stuck", "drift", "spikes"])
def test_injected_fault_raises_an_anomaly_naming_the_metric(kind: str) -> None:
    cfg = SimConfig(seed=1, devices=1, hours=18, fault_after_h=13, faults=(kind,))
    anomalies, faults = _run(cfg)
    f = faults[0]
    hits = [a for a in anomalies if f.start_ns <= a.time_ns <= f.end_ns + 600 * 10**9]
    assert hits, f"{kind} on {f.metric} raised nothing"
    assert hits[0].metric == f.metric
    assert f.metric in hits[0].explanation
    assert hits[0].contributions[0].metric == f.metric
    assert all(math.isfinite(c.sigma) for a in anomalies for c in a.contributions)
    assert all(0.0 <= a.likelihood <= 1.0 and math.isfinite(a.score) for a in anomalies)


def _motor_with(
    first: str, second: str, incidents: int
) -> tuple[Fault, Fault, DetectionEngine, list[list[Reading]]]:
    """A simulated motor with ``first`` at 20:00 and ``second`` 20 minutes later, an
    engine with ``incidents`` at once, and the fleet's batches."""
    fleet = simulate(SimConfig(seed=0, devices=1, hours=23, faults=()))
    a = inject(fleet, "motor-00", first, 20 * 3600)
    b = inject(fleet, "motor-00", second, 20 * 3600 + 1200)
    engine = DetectionEngine(EngineSettings(mv_max_incidents=incidents))
    return a, b, engine, list(fleet.batches())


def _reloaded_rest(
    engine: DetectionEngine, tmp_path: Path, rest: list[list[Reading]]
) -> list[Anomaly]:
    """What ``engine`` finds in ``rest``, which a copy saved and loaded now finds too."""
    engine.save(tmp_path)
    again = DetectionEngine.load(tmp_path)
    found = [engine.observe(b) for b in rest]
    assert found == [again.observe(b) for b in rest]
    return [a for f in found for a in f]


@pytest.mark.parametrize("incidents", [2, 1])
def test_a_second_fault_while_the_first_is_open_is_an_incident_of_its_own(
    tmp_path: Path, incidents: int
) -> None:
    # The bearing overheats from 20:00 (+12 degC over 30 min); at 20:20, still hot, the
    # speed shifts by 2 sigma: with one incident per device only the first was reported.
    hot, shift, engine, batches = _motor_with("overheating", "level_shift", incidents)
    found: list[Anomaly] = []
    for i, batch in enumerate(batches):
        found += engine.observe(batch)
        if found and i < len(batches) - 1 and incidents == 2:
            # Saved with the first incident open (its metric distrusted), then loaded.
            model = engine.describe("motor-00", None, [])["device_model"]
            assert model["open_incidents"] == ["bearing_temp_c"]
            found += _reloaded_rest(engine, tmp_path, batches[i + 1 :])
            break
    assert [a.metric for a in found] == ["bearing_temp_c", "speed_rpm"][:incidents]
    assert hot.start_ns < found[0].time_ns < shift.start_ns
    if incidents == 2:
        second = found[1]
        assert shift.start_ns < second.time_ns < shift.start_ns + 20 * 60 * 10**9
        assert second.explanation.startswith("speed_rpm ")
        assert second.explanation.endswith("a second incident: bearing_temp_c already out of line")
        assert [c.metric for c in second.contributions if c.metric == "bearing_temp_c"] == []


@pytest.mark.parametrize("incidents", [2, 1])
def test_a_fault_in_the_quiet_period_after_an_incident_is_raised(
    tmp_path: Path, incidents: int
) -> None:
    # A burst of vibration spikes from 20:00 opens an incident that ends within minutes;
    # at 20:20 the speed shifts by 2 sigma. The device's quiet period after an incident
    # (an hour or more) hid the shift: the gate that rose during it never rose again.
    # With one incident per device the whole device is quiet for that period: the shift
    # is raised when it ends (its gate stayed on), an hour late.
    spikes, shift, engine, batches = _motor_with("spikes", "level_shift", incidents)
    found: list[Anomaly] = []
    for i, batch in enumerate(batches):
        found += engine.observe(batch)
        model = engine.describe("motor-00", None, [])["device_model"]
        if incidents == 2 and found and not model["open_incidents"]:
            # The burst's incident has ended: its metric is still distrusted, and that
            # survives a save and a load.
            assert found[-1].time_ns < shift.start_ns
            assert model["distrusted"] == ["vibration_mm_s"]
            found += _reloaded_rest(engine, tmp_path, batches[i + 1 :])
            break
    mv = [a for a in found if a.detector == "virtual_sensor"]
    assert [a.metric for a in mv] == ["vibration_mm_s", "speed_rpm"]
    assert spikes.start_ns <= mv[0].time_ns <= spikes.end_ns
    if incidents == 1:
        assert mv[1].time_ns > shift.start_ns + 60 * 60 * 10**9
    if incidents == 2:
        second = mv[1]
        assert shift.start_ns < second.time_ns < shift.start_ns + 20 * 60 * 10**9
        assert second.explanation.startswith("speed_rpm ")
        assert second.explanation.endswith("a new incident shortly after vibration_mm_s's")


@pytest.mark.parametrize("first", ["stuck", "level_shift"])
def test_a_burst_of_spikes_beside_an_open_incident_is_one_of_its_own(first: str) -> None:
    # The current sticks (or the speed shifts) at 20:00; at 20:20 five 6-sigma vibration
    # spikes within ten minutes. Each alone is under a further incident's bar, and two
    # close together count only as a first incident's: three count as a further one's.
    # The spike check, reading each spike against the metric's recent spread, reports the
    # same burst on its own (before, at 10 s, it did not): one anomaly of each detector.
    _, burst, engine, batches = _motor_with(first, "spikes", 2)
    found = [a for b in batches for a in engine.observe(b)]
    spikes = [a for a in found if a.metric == "vibration_mm_s"]
    assert [a.detector for a in spikes] == ["virtual_sensor", "spikes"]
    assert all(burst.start_ns < a.time_ns < burst.end_ns for a in spikes)
    held = "current_a" if first == "stuck" else "speed_rpm"
    assert spikes[0].explanation.endswith(f"a second incident: {held} already out of line")
    assert len(found) == 3


@pytest.mark.parametrize("seed", [3, 5])
def test_a_model_due_mid_incident_is_retrained_after_it_and_scores_on_from_now(
    seed: int,
) -> None:
    # The speed shifts at 15:00 for an hour; the model is due to retrain at 16:00 with the
    # incident still open. Its rows since are all inside it, left out of training, so a
    # retrain then learns nothing new, and run over the latest rows with the incident's
    # metrics' stand-ins it read a pump's shifted current in line (the incident closed and
    # the fault's rows were trained on): it waits until the incident is over and out of
    # the model's memory. Fitted without the incident's rows, its averages end where
    # those rows do: retrained mid-incident and scored from there, the bearing
    # temperature went 9 sigma off as they caught up (seeds 3, 4, 5).
    fleet = simulate(SimConfig(seed=seed, devices=1, hours=30, faults=()))
    shift = inject(fleet, "motor-00", "level_shift", 15 * 3600)
    engine = DetectionEngine(EngineSettings())
    found: list[Anomaly] = []
    retrained_open, waited, retrained_after = False, False, False
    for batch in fleet.batches():
        before = engine.describe("motor-00", None, [])["device_model"]
        dev = engine.devices.get("motor-00")
        model = dev.model if dev is not None else None
        found += engine.observe(batch)
        dev = engine.devices["motor-00"]
        still_open = bool(before["open_incidents"]) and bool(dev.open)
        retrained = model is not None and dev.model is not model
        retrained_open |= retrained and still_open
        waited |= still_open and dev.since_fit >= dev.s.mv_retrain_rows
        retrained_after |= waited and retrained and not dev.open
    assert not retrained_open
    assert waited and retrained_after
    assert [a.metric for a in found] == ["speed_rpm"]
    assert shift.start_ns < found[0].time_ns < shift.end_ns


def _first_day(
    seed: int,
    curves: bool,
    faults: tuple[tuple[str, str, float], ...] = (),
    beyond: set[tuple[str, str]] | None = None,
    injected: list[Fault] | None = None,
) -> list[Anomaly]:
    """The anomalies of the simulator's motor and pump over a day (their first models
    at hour 12), with ``faults`` (device, kind, hour) injected (into ``injected``); into
    ``beyond``, the metrics their descriptions listed ``beyond_reach`` (read every 10
    minutes)."""
    fleet = simulate(SimConfig(seed=seed, devices=2, hours=24, faults=(), curves=curves))
    for device, kind, hour in faults:
        fault = inject(fleet, device, kind, hour * 3600)
        if injected is not None:
            injected.append(fault)
    engine = DetectionEngine(EngineSettings())
    found: list[Anomaly] = []
    for i, batch in enumerate(fleet.batches()):
        found += engine.observe(batch)
        if beyond is not None and i % 10 == 0:
            for device in ("motor-00", "pump-01"):
                said = engine.describe(device, None, [])["device_model"]["beyond_reach"]
                beyond.update((device, m) for m in said)
    return found + engine.flush()


def test_a_young_model_of_a_machine_on_curves_does_not_judge_loads_beyond_its_reach(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Healthy machines on curves, their first models (half a day of their loads) judging
    # the rest of the day: where the loads went beyond the training range, the line
    # missed the curve by more than its doubt widened the bar, and a pump raised "flow"
    # (seeds 5 and 12) or "motor_current_a" (seed 11), the metric the others follow.
    # Beyond its reach such a model now says nothing.
    from millstream_cloud.detection import engine as engine_module

    for seed in (5, 11, 12):
        beyond: set[tuple[str, str]] = set()
        assert _first_day(seed, curves=True, beyond=beyond) == [], seed
        # ... and its device's description says which metrics are beyond it.
        assert ("pump-01", "flow_l_min") in beyond, (seed, beyond)
    monkeypatch.setattr(engine_module, "REACH", math.inf)
    assert [a.metric for a in _first_day(12, curves=True)] == ["flow_l_min"]


def test_a_young_model_of_a_machine_on_curves_still_finds_a_shift() -> None:
    # A 2-sigma shift of a motor's speed an hour into its first model's judging (hour
    # 17), on machines on curves: found and named within 15 minutes, as before the
    # reach (and on seed 9, whose loads stayed beyond it for the fault's hour, not found).
    for seed in (4, 5, 7):
        shift: list[Fault] = []
        found = _first_day(
            seed, curves=True, faults=(("motor-00", "level_shift", 17.0),), injected=shift
        )
        motor = [a for a in found if a.device == "motor-00"]
        assert [a.metric for a in motor] == ["speed_rpm"], seed
        assert 0 < motor[0].time_ns - shift[0].start_ns <= 15 * 60e9, seed


def test_only_a_model_of_a_machine_on_curves_has_a_reach() -> None:
    # A young model that doubts its lines (its curves explain over CURVE_DOUBT of their
    # misfit) and one of a day and more that chose squares have a reach; straight-line
    # machines' models (their curves explain 0.00-0.04, no square chosen) judge every load.
    from millstream_cloud.detection.engine import CURVE_DOUBT

    for curves in (False, True):
        fleet = simulate(SimConfig(seed=4, devices=2, hours=31, faults=(), curves=curves))
        X = np.column_stack([v for (d, _), v in fleet.series.items() if d == "pump-01"])
        for rows in (4320, 10800):  # half a day; a day and a half
            dev = DeviceModel(EngineSettings())
            dev.model = dev._new_model().fit(X[:rows])
            lo, hi = dev.model.training_range()
            reach = dev._reach(np.vstack([hi * 1.2, (lo + hi) / 2]), lo, hi)
            assert dev.model.curved(CURVE_DOUBT) == curves, rows
            # young, by its doubt; older, by the squares it chose (no doubt kept)
            assert (dev.model.curve_coef_ is None) == (rows == 10800), rows
            if curves:
                assert reach is not None and reach[0].all() and not reach[1].any(), rows
            else:
                assert reach is None, rows


def test_a_stuck_sensor_is_distrusted_and_a_fault_beside_it_is_named_right() -> None:
    # The current sticks at 20:00 (the stuck check reports it); at 20:20 the speed shifts.
    # The stuck value fed the others' predictions: before it was distrusted, the shift's
    # incident came with one naming the healthy vibration.
    fleet = simulate(SimConfig(seed=0, devices=1, hours=23, faults=()))
    stuck = inject(fleet, "motor-00", "stuck", 20 * 3600)
    shift = inject(fleet, "motor-00", "level_shift", 20 * 3600 + 1200)
    engine = DetectionEngine(EngineSettings())
    found: list[Anomaly] = []
    distrusted = []
    for batch in fleet.batches():
        found += engine.observe(batch)
        model = engine.describe("motor-00", None, [])["device_model"]
        if stuck.start_ns < batch[0].time_ns < shift.start_ns:
            distrusted.append(model["distrusted"])
    assert [(a.detector, a.metric) for a in found] == [
        ("stuck", "current_a"),
        ("virtual_sensor", "speed_rpm"),
    ]
    assert shift.start_ns < found[1].time_ns < shift.end_ns
    assert found[1].explanation.endswith("a second incident: current_a already out of line")
    assert distrusted[-1] == ["current_a"]


def test_steady_signal_raises_nothing() -> None:
    engine = DetectionEngine(FAST)
    rng = np.random.default_rng(0)
    batch: list[Reading] = []
    for i in range(4000):
        t = i * 10**10
        batch += [
            Reading("m1", "s1", "temp", t, 50.0 + rng.normal(0, 0.2)),
            Reading("m1", "s1", "rpm", t, 1500.0 + rng.normal(0, 2.0)),
        ]
        if len(batch) >= 200:
            assert engine.observe(batch) == []
            batch = []
    assert engine.observe(batch) == []


@pytest.mark.parametrize("seed", [2, 5])
def test_healthy_simulated_device_raises_nothing(seed: int) -> None:
    # Load follows a daily cycle and operator steps, so after 12 h of training the model
    # meets loads it has never seen: what it must not do is call that a fault.
    anomalies, _ = _run(SimConfig(seed=seed, devices=2, hours=24, faults=()))
    assert anomalies == []


@pytest.mark.parametrize(
    "settings", [FAST, replace(FAST, mv_extrapolation_penalty=3.0, mv_holdout=0.3)]
)
def test_engine_state_round_trip_continues_identically(
    tmp_path: Path, settings: EngineSettings
) -> None:
    cfg = SimConfig(seed=1, devices=1, hours=18, fault_after_h=13, faults=("level_shift",))
    fleet = simulate(cfg)
    batches = list(fleet.batches())
    cut = int(len(batches) * 12.5 / 18)  # after the models are trained, before the fault
    a = DetectionEngine(settings)
    for b in batches[:cut]:
        a.observe(b)
    a.save(tmp_path)
    b_engine = DetectionEngine.load(tmp_path)
    # A device's rows and flags as states were saved before they were packed: lists.
    state = json.loads(json.dumps(a.state_dict()))
    for dev in state["devices"].values():
        rows = dev["model"]["rows"]
        dev["model"]["rows"] = unpack_floats(rows).reshape(-1, rows["width"]).tolist()
        dev["model"]["flags"] = [
            bool(v) for v, n in dev["model"]["flags"]["runs"] for _ in range(n)
        ]
    c_engine = DetectionEngine(settings)
    c_engine.load_state(state)
    rest: list[list[Anomaly]] = [[], [], []]
    for b in batches[cut:]:
        for out, engine in zip(rest, (a, b_engine, c_engine), strict=True):
            out += engine.observe(b)
    seen = [[(x.time_ns, x.metric, round(x.score, 9)) for x in out] for out in rest]
    assert seen[0] == seen[1] == seen[2]
    assert seen[0], "the fault after the restart should still be found"


def test_load_of_empty_dir_gives_fresh_engine(tmp_path: Path) -> None:
    engine = DetectionEngine.load(tmp_path)
    assert engine.readings_seen == 0


def test_non_finite_values_are_skipped() -> None:
    engine = DetectionEngine(FAST)
    assert engine.observe([Reading("d", "s", "m", 0, float("nan"))]) == []
    assert engine.readings_seen == 1


def test_a_door_that_opens_now_and_then_is_not_reported_stuck() -> None:
    # A state signal holds its value by nature: every closing used to be "stuck" after 12
    # readings, all day long (20 anomalies in 24 h of this door).
    engine = DetectionEngine(EngineSettings())
    out: list[Anomaly] = []
    for i in range(8640):
        door = 1.0 if i % 500 < 3 else 0.0
        out += engine.observe([Reading("line-1", "s", "door_open", i * 10**9, door)])
    assert [a for a in out if a.detector == "stuck"] == []


@pytest.mark.parametrize("lag", [0, 3])
def test_metrics_that_move_together_before_the_device_model_are_a_load_change(lag: int) -> None:
    # Before a device model is trained nothing tells a change of load from a fault, but a
    # load moves several metrics, at once or one after the other (pressure follows flow
    # here by `lag` rows): a per-metric alarm is held load_change_rows (5) rows and dropped
    # when another metric of the device stirred within as many rows of it.
    def run(both: bool) -> list[Anomaly]:
        engine = DetectionEngine(replace(FAST, warmup=200))
        rng = np.random.default_rng(8)
        out: list[Anomaly] = []
        for i in range(1200):
            step = 6.0 if i >= 1000 else 0.0
            late = 6.0 * both if i >= 1000 + lag else 0.0
            out += engine.observe(
                [
                    Reading("pump", "s", "flow", i * 10**9, 50.0 + rng.normal(0, 0.1) + step),
                    Reading("pump", "s", "pressure", i * 10**9, 3.0 + rng.normal(0, 0.1) + late),
                ]
            )
        return out

    assert run(both=True) == []
    alone = run(both=False)
    assert [(a.metric, a.detector.split(":")[0]) for a in alone] == [("flow", "ensemble")]
    assert alone[0].time_ns == 1000 * 10**9  # reported 5 rows later, with its own time


def test_a_held_alarm_survives_a_restart(tmp_path: Path) -> None:
    def rows(start: int, stop: int) -> list[Reading]:
        rng = np.random.default_rng(start)
        # 30 sigma on flow alone at row 500
        return [r for i in range(start, stop) for r in _pump_row(i, rng, 3.0 * (i == 500))]

    engine = DetectionEngine(replace(FAST, warmup=200))
    assert engine.observe(rows(0, 502)) == []  # the spike at 500 is held
    assert engine.devices["pump"].held
    engine.save(tmp_path)
    again = DetectionEngine.load(tmp_path)
    out = again.observe(rows(502, 510))
    assert [(a.metric, a.time_ns) for a in out] == [("flow", 500 * 10**9)]


def silent_pump_and_fan() -> tuple[list[Reading], list[Reading]]:
    """A pump that spikes at its row 500 and then stops reporting, and a fan that goes on
    (rows a second apart, two metrics each)."""

    def readings(device: str, base: float, stop: int, spike_at: int = -1) -> list[Reading]:
        rng = np.random.default_rng(len(device))
        return [
            r
            for i in range(stop)
            for r in _pump_row(i, rng, 3.0 * (i == spike_at), device, base, base / 10)
        ]

    return readings("pump", 50.0, 501, spike_at=500), readings("fan", 20.0, 520)


def test_a_held_alarm_of_a_device_that_goes_silent_is_not_kept_waiting() -> None:
    # The pump spikes and stops reporting (a crash, a cut link): its alarm cannot wait for
    # five more of its rows; it is released once the rest of the fleet is more than six of
    # its row gaps past its last row. flush() releases what is left (the end of a replay).
    pump, fan = silent_pump_and_fan()
    engine = DetectionEngine(replace(FAST, warmup=200))
    assert engine.observe(pump[:1000]) + engine.observe(fan[:1000]) == []
    assert engine.observe(pump[1000:]) == []  # held
    released = [engine.observe(fan[i : i + 2]) for i in range(1000, 1040, 2)]
    when = [500 + k for k, out in enumerate(released) if out]
    assert when == [507]  # 7 s after its last row, its row gap being 1 s
    assert [(a.device, a.metric, a.time_ns) for a in released[7]] == [("pump", "flow", 500 * 10**9)]
    replay = DetectionEngine(replace(FAST, warmup=200))
    assert replay.observe(pump) == []
    assert [(a.device, a.time_ns) for a in replay.flush()] == [("pump", 500 * 10**9)]
    assert replay.flush() == []


def test_a_lone_spike_on_a_young_metric_is_judged_by_the_bar_of_its_tail_fit() -> None:
    # Until its calibration holds 200 values (learned from the 64th reading on) a metric's
    # tail is still extrapolated from the range it has seen, which scores the same spike
    # lower than the quantile fit does later (0.65 here against 0.82): a lower bar,
    # streaming_min_score_young, can be set for that time.
    def run(at: int, settings: EngineSettings) -> list[tuple[str, int]]:
        engine = DetectionEngine(settings)
        rng = np.random.default_rng(3)
        out: list[Anomaly] = []
        for i in range(at + settings.load_change_rows + 1):
            out += engine.observe(_pump_row(i, rng, 1.0 * (i == at)))  # 10 sigma
        det = engine.metrics[("pump", "flow")]
        assert det.fit_in_use == ("quantiles" if at >= 264 else "range")
        return [(a.metric or "", a.time_ns // 10**9) for a in out]

    young = replace(FAST, warmup=200, streaming_min_score_young=0.6)
    assert run(240, young) == [("flow", 240)]
    assert run(240, replace(young, streaming_min_score_young=0.7)) == []
    assert run(1500, replace(young, streaming_min_score_young=0.7)) == [("flow", 1500)]
    assert run(240, replace(FAST, warmup=200)) == []  # the default: one bar, 0.7


def test_single_metric_device_uses_the_streaming_ensemble() -> None:
    engine = DetectionEngine(replace(FAST, warmup=200))
    rng = np.random.default_rng(5)
    out: list[Anomaly] = []
    for i in range(1500):
        v = 20.0 + rng.normal(0, 0.1) + (5.0 if i >= 1400 else 0.0)
        out += engine.observe([Reading("pi", "s", "cpu_temp", i * 10**9, v)])
    assert len(out) == 1 and out[0].metric == "cpu_temp"
    assert "above its usual level" in out[0].explanation


def test_a_spike_is_explained_against_the_readings_just_before_it() -> None:
    # A motor current ramping with its load: the spike at idle is inside the range the
    # load covers, so "n sigma above its usual level" would understate it.
    engine = DetectionEngine(replace(FAST, warmup=200))
    rng = np.random.default_rng(5)
    out: list[Anomaly] = []
    for i in range(2000):
        v = 5.0 - 5.0 * math.cos(2 * math.pi * i / 400) + rng.normal(0, 0.1)
        v += 3.0 if i == 1990 else 0.0
        out += engine.observe([Reading("m1", "s", "current", i * 10**9, v)])
    assert [(a.detector, a.time_ns) for a in out] == [("ensemble:spike", 1990 * 10**9)]
    (c,) = out[0].contributions
    assert c.sigma > 10 and abs(out[0].contributions[0].value - c.expected - 3.0) < 0.5
    assert "above the readings just before it" in out[0].explanation


def test_relearn_accepts_a_new_normal_and_still_finds_the_next_fault() -> None:
    engine = DetectionEngine(replace(FAST, warmup=200))
    rng = np.random.default_rng(6)

    def feed(start: int, n: int, level: float) -> list[Anomaly]:
        out: list[Anomaly] = []
        for i in range(start, start + n):
            v = level + rng.normal(0, 0.1)
            out += engine.observe([Reading("pi", "s", "cpu_temp", i * 10**9, v)])
        return out

    assert feed(0, 1400, 20.0) == []
    assert len(feed(1400, 100, 25.0)) == 1  # the step is an anomaly
    assert engine.relearn("pi") == {"metric_detectors": 1, "device_model": 1}
    assert engine.relearn("other") == {"metric_detectors": 0, "device_model": 0}
    assert engine.metrics == {} and "pi" not in engine.devices
    # 25 is the new normal: nothing during the new warm-up or after it ...
    assert feed(1500, 1400, 25.0) == []
    assert engine.metrics[("pi", "cpu_temp")].n == 1400
    # ... and a step away from it is found again.
    hits = feed(2900, 100, 30.0)
    assert len(hits) == 1 and hits[0].metric == "cpu_temp"


class _CorruptDetector:
    """Stands in for a per-metric detector whose state went bad: every value raises."""

    n = 0
    quiet = 0

    def update(self, x: float, t: float | None = None) -> float:
        raise ValueError("state is corrupt")


def _c_joins(
    warmup: int,
    rows: int,
    joins_at: int,
    batch_rows: int = 1,
    spike_at: tuple[int, ...] = (),
    max_metrics: int = 200,
) -> tuple[DetectionEngine, list[Anomaly]]:
    """A device reporting "a" and "b" every second, and "c" from ``joins_at`` on (+5, 50
    sigma, at each row of ``spike_at``); fed ``batch_rows`` rows at a time."""
    s = replace(
        FAST,
        warmup=warmup,
        mv_train_rows=300,
        mv_window_rows=600,
        mv_retrain_rows=100,
        mv_max_metrics=max_metrics,
    )
    engine = DetectionEngine(s)
    rng = np.random.default_rng(0)
    out: list[Anomaly] = []
    batch: list[Reading] = []
    for i in range(rows):
        for m in ["a", "b"] + (["c"] if i >= joins_at else []):
            v = 20 + rng.normal(0, 0.1) + 5.0 * (m == "c" and i in spike_at)
            batch.append(Reading("d", "s", m, i * 10**9, v))
        if i % batch_rows == batch_rows - 1:
            out += engine.observe(batch)
            batch = []
    return engine, out


def test_a_metric_that_joins_before_the_device_model_is_in_the_model() -> None:
    # The rows kept before it lack the new metric: they are dropped and the model is
    # trained on rows of all three (mixing them used to fail every batch of the device).
    # Batches of 7 rows, so that "c" joins inside a batch, after rows without it.
    engine, _ = _c_joins(warmup=50, rows=800, joins_at=100, batch_rows=7)
    dev = engine.devices["d"]
    assert engine.failed_readings == 0 and not engine.errors
    assert dev.metrics == ["a", "b", "c"] and dev.model is not None
    assert {len(r) for r in dev.rows} == {3}


@pytest.mark.parametrize("batch_rows", [1, 7])
def test_a_metric_that_joins_after_the_device_model_is_watched_then_joins_it(
    batch_rows: int,
) -> None:
    # A sensor added later (model trained at row 300, "c" from row 400): watched by its
    # own per-metric detectors (it used to get the stuck check only) until the model is
    # trained again on mv_train_rows (300) rows of all three, then by the model (it used
    # to stay outside it for good).
    engine, out = _c_joins(
        warmup=100, rows=650, joins_at=400, batch_rows=batch_rows, spike_at=(600,)
    )
    dev = engine.devices["d"]
    assert dev.model is not None and dev.metrics == ["a", "b"] and dev.joining == ["c"]
    assert engine.describe("d", None, [])["device_model"]["joining"] == ["c"]
    assert [(a.metric, a.detector, a.time_ns) for a in out] == [
        ("c", "ensemble:spike", 600 * 10**9)
    ]
    engine, out = _c_joins(
        warmup=100, rows=1500, joins_at=400, batch_rows=batch_rows, spike_at=(600, 1400)
    )
    dev = engine.devices["d"]
    assert dev.metrics == ["a", "b", "c"] and dev.joining == [] and not dev.next_rows
    assert {len(r) for r in dev.rows} == {3}
    assert ("d", "c") not in engine.metrics  # its per-metric detector stood in until then
    assert [(a.metric, a.detector.split(":")[0], a.time_ns) for a in out] == [
        ("c", "ensemble", 600 * 10**9),
        ("c", "virtual_sensor", 1400 * 10**9),
    ]


def test_a_device_wider_than_a_device_model_takes_is_watched_metric_by_metric() -> None:
    # mv_max_metrics 2: "a" and "b" make a model, and "c", which would make it three
    # wide, is watched by its own detectors for good (a 1000-tag device's model would
    # take gigabytes and many minutes to fit every 4 h).
    engine, out = _c_joins(warmup=100, rows=1500, joins_at=400, spike_at=(1400,), max_metrics=2)
    dev = engine.devices["d"]
    assert dev.model is not None and dev.metrics == ["a", "b"] and dev.joining == []
    assert [(a.metric, a.detector, a.time_ns) for a in out] == [
        ("c", "ensemble:spike", 1400 * 10**9)
    ]
    # Three metrics from the first row: no device model at all, each metric on its own.
    engine, out = _c_joins(warmup=100, rows=1500, joins_at=0, spike_at=(1400,), max_metrics=2)
    dev = engine.devices["d"]
    assert dev.model is None and len(dev.rows) < 2
    info = engine.describe("d", None, [])
    assert info["device_model"]["too_wide"] and info["device_model"]["max_metrics"] == 2
    assert {m["state"] for m in info["metrics"].values()} == {"watching"}
    assert [(a.metric, a.detector.split(":")[0], a.time_ns) for a in out] == [
        ("c", "ensemble", 1400 * 10**9)
    ]
    engine, _ = _c_joins(warmup=100, rows=500, joins_at=0)
    assert not engine.describe("d", None, [])["device_model"]["too_wide"]


def _speed_goes_silent(
    spike_at_h: float | None = None,
) -> tuple[DetectionEngine, list[Anomaly], list[int], int, list[str]]:
    """A motor whose speed sensor reports nothing from hour 16 to 20 of 30; with
    ``spike_at_h``, a 40-sigma spike on its current at that hour. Returns the engine, its
    anomalies, its device model's rows scored after each batch, the first reading's time
    and what ``describe`` said of the current in the batches at hour 19."""
    cfg = SimConfig(seed=0, devices=1, hours=30, fault_after_h=100, faults=())
    fleet = simulate(cfg)
    engine = DetectionEngine(EngineSettings())
    t0 = int(fleet.times_ns[0])
    out: list[Anomaly] = []
    scored: list[int] = []
    states: list[str] = []
    spiked = False
    for batch in fleet.batches():
        hours = (batch[0].time_ns - t0) / 3600e9
        if 16 <= hours < 20:
            batch = [r for r in batch if r.metric != "speed_rpm"]
        if spike_at_h is not None and hours >= spike_at_h and not spiked:
            spiked = True
            k = next(i for i, r in enumerate(batch) if r.metric == "current_a")
            batch[k] = msgspec.structs.replace(batch[k], value=batch[k].value + 12.0)
        out += engine.observe(batch)
        scored.append(engine.devices["motor-00"].n_rows)
        if 19 <= hours < 19.01:
            states.append(engine.describe("motor-00", None, [])["metrics"]["current_a"]["state"])
    return engine, out, scored, t0, states


def test_a_metric_that_stops_reporting_is_reported_once_and_pauses_the_model() -> None:
    # A dead sensor: its last value would stay in every row; the model would learn it as
    # normal or blame it as a residual. One "silent" anomaly, no others, and the model
    # resumes when it reports again.
    engine, out, scored, t0, _ = _speed_goes_silent()
    (a,) = out
    assert (a.metric, a.detector) == ("speed_rpm", "silent")
    assert 270 <= (a.time_ns - t0) / 1e9 - 16 * 3600 <= 360  # 31 rows after its last
    assert "speed_rpm silent: no reading for 31 rows (5.0 min)" in a.explanation
    dev = engine.devices["motor-00"]
    assert not dev.silent and dev.model is not None
    per_hour = len(scored) // 30
    paused = scored[int(16.2 * per_hour)] == scored[int(19.8 * per_hour)]
    assert paused and scored[-1] > scored[int(20.5 * per_hour)]
    # Back under the model, the per-metric detectors that stood in are dropped again.
    assert not [k for k in engine.metrics if k[0] == "motor-00"]


def test_while_a_metric_is_silent_the_others_are_watched_on_their_own() -> None:
    # The model is paused for as long as the sensor stays dead; the motor's other metrics
    # fall back to per-metric detectors (learning from the pause on: 720 readings, 2 h).
    engine, out, _, t0, states = _speed_goes_silent(spike_at_h=19.0)
    assert set(states) == {"watching"}  # said so while the model was paused
    # After the sensor came back, the model watches them again.
    assert engine.describe("motor-00", None, [])["metrics"]["current_a"]["state"] == "device model"
    found = [(a.metric, a.detector.split(":")[0], round((a.time_ns - t0) / 3600e9, 1)) for a in out]
    assert found == [("speed_rpm", "silent", 16.1), ("current_a", "ensemble", 19.0)]


def test_a_metric_reported_less_often_than_the_others_is_not_silent() -> None:
    # "temp" every 40 rows (a slow sensor): silent only after five of its own gaps.
    engine = DetectionEngine(replace(FAST, warmup=100, multivariate=False))
    rng = np.random.default_rng(1)
    out: list[Anomaly] = []
    for i in range(3000):
        metrics = ["flow"] + (["temp"] if i % 40 == 0 and i < 2000 else [])
        out += engine.observe([Reading("p", "s", m, i * 10**9, 5 + rng.normal()) for m in metrics])
    assert [(a.metric, a.detector) for a in out] == [("temp", "silent")]
    assert out[0].time_ns >= (1960 + 5 * 40) * 10**9  # five of its gaps after its last


def test_a_failing_device_loses_its_own_batch_not_the_fleets_detection() -> None:
    engine = DetectionEngine(replace(FAST, warmup=200))
    rng = np.random.default_rng(7)
    out: list[Anomaly] = []
    for i in range(1500):
        v = 20.0 + rng.normal(0, 0.1) + (5.0 if i >= 1400 else 0.0)
        if i == 100:
            engine.metrics[("bad", "cpu_temp")] = _CorruptDetector()  # type: ignore[assignment]
        out += engine.observe(
            [
                Reading("bad", "s", "cpu_temp", i * 10**9, 20.0 + rng.normal(0, 0.1)),
                Reading("pi", "s", "cpu_temp", i * 10**9, v),
            ]
        )
    assert [(a.device, a.metric) for a in out] == [("pi", "cpu_temp")]
    assert engine.failed_readings == 1400 and engine.readings_seen == 3000
    assert engine.describe("bad", None, ["cpu_temp"])["error"] == "ValueError: state is corrupt"
    assert engine.describe("pi", None, ["cpu_temp"])["error"] is None
    engine.relearn("bad")  # the repair: fresh detectors, and the error is gone with the next batch
    engine.observe([Reading("bad", "s", "cpu_temp", 1500 * 10**9, 20.0)])
    assert engine.describe("bad", None, ["cpu_temp"])["error"] is None
    assert engine.failed_readings == 1400


@pytest.mark.slow
def test_sim_eval_default_fleet_meets_the_targets() -> None:
    res = runners.run_sim(runners.load_frozen(), seed=0)
    assert res["recall"] >= 0.95 and res["precision"] >= 0.95, res["false_positives"]


def test_settings_from_mapping_names_bad_keys() -> None:
    from millstream_cloud.detection.engine import settings_from_mapping

    assert settings_from_mapping({"warmup": 100, "mv_spans": [5, 10]}).mv_spans == (5, 10)
    with pytest.raises(ValueError, match=r"unknown key.*warmpu"):
        settings_from_mapping({"warmpu": 1})
    with pytest.raises(ValueError, match="mv_on: must be"):
        settings_from_mapping({"mv_on": "high"})


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (
            {"streaming": {"short": 0}},
            r"streaming\.short: 0; must be a whole number, from 1 to 100,000",
        ),
        (
            {"streaming": {"history": 1e12}},
            r"history: 1000000000000\.0; must be a whole number, from 10 to 1,000,000",
        ),
        ({"streaming": {"history": 2.5}}, r"streaming\.history: 2\.5; must be a whole number"),
        ({"streaming": {"long": -1}}, r"streaming\.long: -1"),
        ({"streaming": {"alert_level": 2}}, r"alert_level: 2; must be a number, from 0\.001 to 1"),
        ({"streaming": {"weights": {"value": -1}}}, r"streaming\.weights"),
        ({"streaming": {"tail_fit": "normal"}}, r"streaming\.tail_fit: 'normal'; one of range"),
        ({"mv_smooth_rows": 0}, r"mv_smooth_rows: 0; must be a whole number, from 1 to 100,000"),
        ({"mv_spike_sigma": 0}, r"mv_spike_sigma: 0; must be a number, 0\.1 or more"),
        ({"stuck_min_run": 1}, r"stuck_min_run: 1"),
        ({"mv_holdout": 1.5}, r"mv_holdout: 1\.5; must be a number, from 0\.01 to 0\.99"),
        ({"mv_spans": [0, 30]}, r"mv_spans: 0; must be a whole number"),
        ({"mv_spans": []}, r"mv_spans: give one or more"),
        ({"mv_on": 3.0}, r"mv_off: 3\.5; must be below mv_on \(3\)"),
    ],
)
def test_settings_out_of_range_are_refused_when_read(block: dict, message: str) -> None:
    # Each of these was accepted before and failed only when a device's detectors were
    # built or its model trained (a division by zero, an empty window, a negative deque).
    from millstream_cloud.detection.engine import settings_from_mapping

    with pytest.raises(ValueError, match=message):
        settings_from_mapping(block)


def test_whole_numbers_written_as_floats_are_read_as_whole_numbers() -> None:
    # YAML and JSON may say 6000.0; a float where a window size goes failed at the first
    # reading of a new series (numpy refuses a float array size).
    from millstream_cloud.detection.engine import settings_from_mapping
    from millstream_cloud.detection.rules import parse_rules

    s = settings_from_mapping({"warmup": 200.0, "streaming": {"history": 600.0}})
    assert (s.warmup, s.streaming["history"]) == (200, 600)
    assert type(s.warmup) is int and type(s.streaming["history"]) is int
    [rule] = parse_rules([{"match": {"kind": "x"}, "streaming": {"short": 8.0}, "mv_spans": [6.0]}])
    assert rule.overrides == {"streaming": {"short": 8}, "mv_spans": (6,)}
    engine = DetectionEngine(replace(FAST, warmup=20), [rule], lambda _d: "x")
    for i in range(50):
        engine.observe([Reading("d", "s", "m", i * 10**9, 1.0 + i % 3)])
    assert engine.errors == {} and engine.metrics[("d", "m")].short == 8


def test_a_rule_is_checked_against_the_settings_it_applies_over() -> None:
    from millstream_cloud.detection.engine import check_rules, settings_from_mapping
    from millstream_cloud.detection.rules import parse_rules
    from millstream_cloud.settings import Settings

    rules = parse_rules([{"match": {"kind": "press"}, "mv_on": 3.0}])
    with pytest.raises(ValueError, match=r"detection\.rules\[0\]: mv_off: 3\.5; must be below"):
        check_rules(EngineSettings(), rules)
    check_rules(settings_from_mapping({"mv_off": 2.0}), rules)  # the engine block lowered mv_off
    with pytest.raises(ValueError, match=r"detection\.rules\[0\]: mv_off"):
        Settings(detection={"rules": [{"match": {"kind": "press"}, "mv_on": 3.0}]})
    Settings(detection={"engine": {"mv_off": 2.0}, "rules": [{"match": {"kind": "p"}, "mv_on": 3}]})


def test_a_device_whose_model_is_turned_off_is_watched_per_metric_again(tmp_path: Path) -> None:
    # A rule (or the settings) turns the device model off after it was trained: the
    # device's metrics go back to their per-metric detectors, not to the stuck check alone.
    s = replace(FAST, warmup=200, mv_train_rows=300)
    engine = DetectionEngine(s)
    rng = np.random.default_rng(4)
    for i in range(500):
        engine.observe(_pump_row(i, rng))
    assert engine.devices["pump"].model is not None
    engine.save(tmp_path)
    again = DetectionEngine.load(tmp_path, replace(s, multivariate=False))
    out: list[Anomaly] = []
    for i in range(500, 1000):
        out += again.observe(_pump_row(i, rng, 3.0 * (i == 900)))
    assert [(a.metric, a.time_ns, a.detector.split(":")[0]) for a in out] == [
        ("flow", 900 * 10**9, "ensemble")
    ]
    assert again.describe("pump", None, ["flow"])["metrics"]["flow"]["state"] == "watching"


# The engine and readings that wrote tests/fixtures/detection/state-v2.json.gz with the
# version-2 persistence (one file; commit 03d9491): a two-metric pump with a trained
# device model and a one-metric fan with its per-metric ensemble.
V2_SETTINGS = EngineSettings(
    warmup=60,
    mv_train_rows=120,
    mv_window_rows=200,
    mv_retrain_rows=100,
    # (`memory` and `resolution_s` came after the fixture: its saved settings do not name
    # them.)
    streaming={
        **{
            k: v
            for k, v in EngineSettings().streaming.items()
            if k not in ("memory", "resolution_s")
        },
        "history": 150,
    },
)


def _v2_readings(start: int, stop: int) -> list[Reading]:
    rng = np.random.default_rng(start)
    out = []
    for i in range(start, stop):
        load = 50 + 5 * np.sin(i / 40)
        out += [
            Reading("pump-1", "plant", "flow", i * 10**10, load + rng.normal(0, 0.1)),
            Reading("pump-1", "plant", "pressure", i * 10**10, load / 10 + rng.normal(0, 0.05)),
            Reading("fan-2", "plant", "rpm", i * 10**10, 1400 + rng.normal(0, 3)),
        ]
    return out


def _before_v3(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` without what the stuck check has kept since version 3 (how many readings
    it learned, and how: a state saved before counts as learned; the smallest change it
    saw, learned again from the next ones), the spike check (it starts afresh) and the
    device model's record of how its expected values move and the doubt of its lines
    (both kept from its next fit)."""
    for dev in state["devices"].values():
        dev.pop("spikes", None)
        for st in dev["stuck"].values():
            for key in ("learn_for", "n", "repeats", "raised", "step"):
                st.pop(key, None)
        if dev["model"] is not None:
            dev["model"].pop("bucket", None)  # the interval averaged for the model
            if dev["model"]["model"] is not None:
                for key in ("recent_pred", "move", "curve_coef", "curve_weight"):
                    dev["model"]["model"].pop(key, None)
    return state


def _rounded(state: Any) -> Any:
    """``state`` with every float to 10 significant digits."""
    if isinstance(state, float):
        return float(f"{state:.10g}")
    if isinstance(state, dict):
        return {k: _rounded(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_rounded(v) for v in state]
    return state


def test_a_state_saved_by_the_previous_version_loads_and_is_rewritten_per_device(
    tmp_path: Path,
) -> None:
    old = tmp_path / "old"
    old.mkdir()
    (old / STATE_FILE).write_bytes(
        gzip.decompress((FIXTURES / "detection" / "state-v2.json.gz").read_bytes())
    )
    restored = DetectionEngine.load(old)
    same = DetectionEngine(V2_SETTINGS)
    same.observe(_v2_readings(0, 150))
    # to 10 significant digits: the device model solves its regressions in another order
    # (one set of cross-products for all metrics) than the version that saved the state
    assert _rounded(_before_v3(restored.state_dict())) == _rounded(_before_v3(same.state_dict()))
    # The next save writes it the new way: a header and one file per device, the pump
    # model's rows in a rows file and the values of the fan's eight calibrations and
    # references in one each.
    restored.save(old)
    assert json.loads((old / STATE_FILE).read_text())["version"] == 3
    names = sorted(p.name for p in (old / DEVICE_DIR).iterdir())
    assert [n for n in names if n.endswith(".json")] == ["fan-2.json", "pump-1.json"]
    rows = [tuple(n.split(".")[:3:2]) for n in names if n.endswith(".rows")]
    assert sorted(rows) == [("fan-2", "ring")] * 8 + [("pump-1", "rows")]
    again = DetectionEngine.load(old)
    assert again.state_dict() == restored.state_dict()
    later = _v2_readings(150, 400)
    assert again.observe(later) == same.observe(later)


def test_a_save_writes_only_the_devices_that_changed_and_drops_relearned_ones(
    tmp_path: Path,
) -> None:
    engine = DetectionEngine(V2_SETTINGS)
    engine.observe(_v2_readings(0, 150))
    engine.save(tmp_path)
    folder = tmp_path / DEVICE_DIR
    assert sorted(p.name for p in folder.glob("*.json")) == ["fan-2.json", "pump-1.json"]
    fan = (folder / "fan-2.json").read_text()
    for name in ("fan-2.json", "pump-1.json"):  # marked, to see which a save rewrites
        (folder / name).write_text('"not rewritten"')
    engine.observe([r for r in _v2_readings(150, 160) if r.device == "pump-1"])
    engine.save(tmp_path)
    assert (folder / "fan-2.json").read_text() == '"not rewritten"'
    assert json.loads((folder / "pump-1.json").read_text())["device"] == "pump-1"
    engine.relearn("fan-2")
    engine.save(tmp_path)
    assert [p.name for p in folder.glob("*.json")] == ["pump-1.json"]
    # A device file with no device behind it (left by another run) does not come back,
    # nor do rows files of no device.
    (folder / "fan-2.json").write_text(fan)
    (folder / "fan-2.json.rows.0badc0de.rows").write_bytes(b"\0" * 16)
    engine.save(tmp_path)
    assert [p.name for p in folder.glob("*.json")] == ["pump-1.json"]
    assert [p.name.split(".")[0] for p in folder.glob("*.rows")] == ["pump-1"]
    assert DetectionEngine.load(tmp_path).state_dict() == engine.state_dict()


def test_a_save_appends_a_device_models_new_rows_to_its_rows_file(tmp_path: Path) -> None:
    # A week of rows is megabytes a device: a save writes the rows added since the last
    # one, not the whole window, and the device's JSON says where its rows are.
    engine = DetectionEngine(V2_SETTINGS)
    engine.observe(_v2_readings(0, 150))
    engine.save(tmp_path)
    folder = tmp_path / DEVICE_DIR
    [rows_file] = folder.glob("pump-1.json.rows.*.rows")
    ref = json.loads((folder / "pump-1.json").read_text())["model"]["rows"]
    width, count = ref["width"], ref["count"]
    assert ref == {"file": rows_file.name, "width": 2, "offset": 0, "count": count} | {
        "crc": zlib.crc32(rows_file.read_bytes())
    }
    assert rows_file.stat().st_size == count * width * 8
    engine.observe(_v2_readings(150, 160))
    engine.save(tmp_path)
    ref = json.loads((folder / "pump-1.json").read_text())["model"]["rows"]
    assert ref["file"] == rows_file.name and ref["count"] == count + 10
    assert rows_file.stat().st_size == (count + 10) * width * 8  # 10 rows appended
    # A save that wrote rows but not the state (a crash between): the state counts the
    # rows it knows, and the next save cuts the others before appending.
    with open(rows_file, "ab") as fh:
        fh.write(b"\xff" * 8 * width * 3)
    assert DetectionEngine.load(tmp_path).state_dict() == engine.state_dict()
    engine.observe(_v2_readings(160, 165))
    engine.save(tmp_path)
    assert rows_file.stat().st_size == (count + 15) * width * 8
    again = DetectionEngine.load(tmp_path)
    assert again.state_dict() == engine.state_dict()
    # A rows file no state refers to (a save cut short after starting a new one) goes at
    # the next save; the loaded engine knows which the state refers to.
    stray = folder / "pump-1.json.rows.deadbeef.rows"
    stray.write_bytes(b"\0" * 16)
    again.save(tmp_path)
    assert not stray.exists() and rows_file.exists()
    # Once the file holds more rows the window dropped than it keeps (200), the window
    # is written to a new file and the old one goes; a loaded engine appends too.
    again.observe(_v2_readings(165, 400))
    again.save(tmp_path)
    [new_file] = folder.glob("pump-1.json.rows.*.rows")
    assert new_file != rows_file and new_file.stat().st_size == 200 * width * 8
    again.observe(_v2_readings(400, 410))
    again.save(tmp_path)
    assert new_file.stat().st_size == 210 * width * 8
    assert DetectionEngine.load(tmp_path).state_dict() == again.state_dict()
    # A rows file not as saved (a power cut before its data reached the disk) or gone:
    # that device learns afresh, the others carry on.
    data = bytearray(new_file.read_bytes())
    data[100] ^= 0xFF
    new_file.write_bytes(bytes(data))
    torn = DetectionEngine.load(tmp_path)
    assert torn.unreadable_devices == 1 and "pump-1" not in torn.devices
    assert ("fan-2", "rpm") in torn.metrics
    again.observe(_v2_readings(410, 412))
    again.save(tmp_path)  # rewrites the pump's device file (it was moved aside)
    [new_file] = folder.glob("pump-1.json.rows.*.rows")
    new_file.unlink()
    lost = DetectionEngine.load(tmp_path)
    assert lost.unreadable_devices == 1 and "pump-1" not in lost.devices


def test_a_damaged_device_file_costs_that_device_only(tmp_path: Path) -> None:
    engine = DetectionEngine(V2_SETTINGS)
    engine.observe(_v2_readings(0, 150))
    engine.save(tmp_path)
    damaged = tmp_path / DEVICE_DIR / "fan-2.json"
    damaged.write_text(damaged.read_text()[:-200])  # cut short, as by a full disk
    again = DetectionEngine.load(tmp_path)
    assert again.unreadable_devices == 1
    [aside] = (tmp_path / DEVICE_DIR).glob("fan-2.json.unreadable-*")
    assert aside.stat().st_size > 0
    assert again.state_dict()["devices"].keys() == {"pump-1"}
    assert again.state_dict()["devices"]["pump-1"] == engine.state_dict()["devices"]["pump-1"]
    # The fan learns afresh; the pump carries on with its trained model.
    later = _v2_readings(150, 200)
    again.observe(later)
    assert again.metrics[("fan-2", "rpm")].n == 50 and again.devices["pump-1"].model is not None


def test_a_save_lets_scoring_in_between_devices(tmp_path: Path) -> None:
    # The guard (the lock scoring runs under) is taken once for the dirty list and once
    # per device, never for the whole save.
    class Counting:
        def __init__(self) -> None:
            self.entered = 0

        def __enter__(self) -> None:
            self.entered += 1

        def __exit__(self, *exc: object) -> None:
            return None

    engine = DetectionEngine(V2_SETTINGS)
    engine.observe(_v2_readings(0, 150))
    guard = Counting()
    engine.save(tmp_path, guard)
    assert guard.entered == 1 + 2


def test_a_metric_that_never_moved_is_reported_once_and_said_to_be_perhaps_a_constant() -> None:
    # A setpoint read along with the measurements looks exactly like a dead sensor; the
    # one anomaly says both, and how to stop it, instead of a "longest normal repeat 0".
    engine = DetectionEngine(replace(FAST, warmup=100))
    rng = np.random.default_rng(3)
    out: list[Anomaly] = []
    for i in range(600):
        out += engine.observe(
            [*_pump_row(i, rng), Reading("pump", "s", "setpoint", i * 10**9, 50.0)]
        )
    [a] = out
    assert (a.metric, a.detector) == ("setpoint", "stuck")
    assert "the same value 50 in all 13 readings since it was first seen" in a.explanation
    assert "a constant such as a setpoint" in a.explanation


def test_counters_are_modelled_by_their_increase_and_a_drop_in_rate_is_found() -> None:
    # Parts made and energy used only count up: as totals they leave every range the model
    # was trained on (a false anomaly within days); their increase per reading follows the
    # load. At row 6000 the line makes half as many parts for the same load (a jam).
    s = replace(FAST, mv_train_rows=2000, mv_window_rows=4000, mv_retrain_rows=1000)
    engine = DetectionEngine(s)
    rng = np.random.default_rng(11)
    out: list[Anomaly] = []
    parts = energy = 0.0
    batch: list[Reading] = []
    for i in range(8000):
        load = 50 + 10 * np.sin(i / 300)
        parts += rng.poisson(0.2 * load * (0.5 if i >= 6000 else 1.0))
        energy += load * 10 / 3600
        t = i * 10 * 10**9
        batch += [
            Reading("line", "s", "flow", t, load + rng.normal(0, 0.3)),
            Reading("line", "s", "parts_total", t, parts),
            Reading("line", "s", "energy_kwh", t, energy),
        ]
        if i % 6 == 5:
            out += engine.observe(batch)
            batch = []
    dev = engine.devices["line"]
    assert [dev.metrics[j] for j in dev.counters] == ["parts_total", "energy_kwh"]
    found = [(a.metric, a.detector, a.time_ns // (10 * 10**9)) for a in out]
    assert [f[:2] for f in found] == [("parts_total", "virtual_sensor")], found
    assert 6000 <= found[0][2] < 6100
    assert "(its increase per reading: it counts up)" in out[0].explanation


def test_a_metric_read_in_whole_degrees_is_not_stuck_at_a_turning_point() -> None:
    # A temperature read as whole degrees (a Modbus register) holds each value for a while
    # by nature, longest where it turns. In its first day a turning point outlasted three
    # times the longest hold seen so far: "stuck" (day 0.1). Such a metric is judged once it
    # has been learned for stuck_learn_readings (a day); a dead one is still found then.
    engine = DetectionEngine(replace(FAST, multivariate=False))
    rng = np.random.default_rng(0)
    out: list[Anomaly] = []
    temp = 40.0
    for i in range(3 * 8640):
        temp += (30 + 10 * np.sin(i / 1500) - temp) / 300
        value = round(temp + rng.normal(0, 0.1)) if i < 2 * 8640 else 33.0  # dies on day 2
        out += engine.observe([Reading("oven", "s", "temp_c", i * 10**10, value)])
    stuck = [
        (a.detector, round(a.time_ns / 10**10 / 8640, 1)) for a in out if a.detector == "stuck"
    ]
    assert len(stuck) == 1 and stuck[0][1] >= 2.0, stuck


def test_a_glitch_is_reported_on_its_metric_and_kept_out_of_the_device_model() -> None:
    # One 65535 (an error code) in a motor's current, twice, four hours apart: it went into
    # every smoothed and lagged input of the model, was blamed on the vibration, and held
    # the device's incident open so long that the second went unreported. Then a real
    # offset of the current that lasts: reported by the model, not taken for a glitch.
    cfg = SimConfig(seed=3, devices=1, hours=30, faults=())
    fleet = simulate(cfg)
    engine = DetectionEngine(EngineSettings())
    t0 = int(fleet.times_ns[0])
    out: list[Anomaly] = []
    hit: set[float] = set()
    for batch in fleet.batches():
        hours = (batch[0].time_ns - t0) / 3600e9
        for at in (20.0, 24.0):
            if hours >= at and at not in hit:
                hit.add(at)
                k = next(i for i, r in enumerate(batch) if r.metric == "current_a")
                batch[k] = msgspec.structs.replace(batch[k], value=65535.0)
        if hours >= 28.0:
            batch = [
                msgspec.structs.replace(r, value=r.value + 2.0) if r.metric == "current_a" else r
                for r in batch
            ]
        out += engine.observe(batch)
    found = [(a.detector, a.metric, round((a.time_ns - t0) / 3600e9, 1)) for a in out]
    assert found[:2] == [("glitch", "current_a", 20.0), ("glitch", "current_a", 24.0)]
    assert "current_a read 65535, far outside all it read" in out[0].explanation
    assert [f[:2] for f in found[2:]] == [("virtual_sensor", "current_a")], found
    assert 28.0 <= found[2][2] < 28.5
    dev = engine.devices["motor-00"]
    assert 65535.0 not in dev.rows.values()[~dev.rows.flags()]  # never learned


@pytest.mark.parametrize(
    ("metric", "offset"), [("current_a", 2.0), ("vibration_mm_s", 0.5), ("speed_rpm", 10.0)]
)
def test_an_offset_is_named_on_its_own_metric_not_on_one_that_predicts_it(
    metric: str, offset: float
) -> None:
    # A motor's current and vibration predict each other (the vibration through a lag of
    # 960 rows). Judged with the steady-state leaks, a current offset was named as the
    # vibration "4.9 sigma below prediction", the current itself 7 sigma above.
    fleet = simulate(SimConfig(seed=4, devices=1, hours=30, faults=()))
    engine = DetectionEngine(EngineSettings())
    t0 = int(fleet.times_ns[0])
    out: list[Anomaly] = []
    for batch in fleet.batches():
        if (batch[0].time_ns - t0) / 3600e9 >= 28.0:
            batch = [
                msgspec.structs.replace(r, value=r.value + offset) if r.metric == metric else r
                for r in batch
            ]
        out += engine.observe(batch)
    assert [(a.detector, a.metric) for a in out] == [("virtual_sensor", metric)]
    assert out[0].explanation.startswith(f"{metric} ")
    # the reading against what the model expected of it: most of the offset, which its
    # 5-minute average has mostly taken in (0.79-0.85 of it; against the 10-minute
    # average 0.54-0.59, and the residual's 30- and 180-row averages, quoted before, said
    # a 2 A offset was 0.29 A)
    main = out[0].contributions[0]
    assert 0.7 * offset < main.value - main.expected < 1.2 * offset


def _factory_week(days: int, seed: int = 0) -> list[list[Reading]]:
    """A four-metric machine read every minute that runs Monday to Friday 06:00-22:00 and
    stands idle at night and at the weekend (day 0 is a Monday), in batches of an hour."""
    rng = np.random.default_rng(seed)
    n = days * 1440
    i = np.arange(n)
    weekday, hour = (i // 1440) % 7, (i % 1440) / 60
    load = ((weekday < 5) & (hour >= 6) & (hour < 22)) * 0.85
    temp = np.empty(n)
    t = 40.0
    for k in range(n):  # follows the load through a 30-minute thermal lag
        t += (40 + 30 * load[k] - t) * (1 - math.exp(-1 / 30))
        temp[k] = t
    metrics = {
        "current_a": 2 + 20 * load + rng.normal(0, 0.3, n),
        "vibration": 0.1 + 2 * load + rng.normal(0, 0.05, n),
        "power_kw": 0.5 + 10 * load + rng.normal(0, 0.2, n),
        "temp_c": temp + rng.normal(0, 0.2, n),
    }
    return [
        [
            Reading("m", "s", k, (r * 60) * 10**9, float(v[r]))
            for r in range(h, h + 60)
            for k, v in metrics.items()
        ]
        for h in range(0, n, 60)
    ]


@pytest.mark.slow
def test_a_device_model_remembers_the_working_week_over_a_weekend() -> None:
    # Its model retrains every few hours on its rolling window: a window of a day held only
    # idle rows by Sunday night, so Monday's start (and every transient the start's alarm
    # kept out of training after it) was new. A week's window still holds last week.
    s = replace(FAST, mv_train_rows=600, mv_retrain_rows=240, mv_smooth_rows=30, mv_slow_span=10)
    batches = _factory_week(9)
    monday = 7 * 1440 * 60 * 10**9

    def after_weekend(window: int) -> list[tuple[str, float]]:
        engine = DetectionEngine(replace(s, mv_window_rows=window))
        found = [a for b in batches for a in engine.observe(b)]
        return [
            (a.metric, round((a.time_ns - monday) / 3600e9, 1))
            for a in found
            if a.time_ns >= monday
        ]

    assert after_weekend(EngineSettings().mv_window_rows) == []
    assert after_weekend(1440)  # a day: the start after the weekend is reported


def test_a_one_metric_machine_remembers_the_working_week_over_a_weekend() -> None:
    # Its ensemble's calibrations hold two days in detail: by Monday morning those are the
    # idle weekend, so the start-up (a step of 50 sigma) and the evening stop were records
    # of the spike statistic and alarms, every Monday. The week's extremes are remembered.
    batches = [[r for r in b if r.metric == "current_a"] for b in _factory_week(9)]
    monday = 7 * 1440 * 60 * 10**9

    def after_weekend(memory: int) -> list[float]:
        streaming = {**FAST.streaming, "history": 2 * 1440, "memory": memory}
        engine = DetectionEngine(replace(FAST, streaming=streaming))
        found = [a for b in batches for a in engine.observe(b)]
        assert found  # the first start-up ever is new, week or not
        return [round((a.time_ns - monday) / 3600e9, 1) for a in found if a.time_ns >= monday]

    assert after_weekend(7 * 1440) == []
    assert after_weekend(0) == [6.0, 22.0]  # Monday's start and stop


def test_a_save_appends_a_one_metric_devices_new_values_to_its_calibrations_rows_files(
    tmp_path: Path,
) -> None:
    # A one-metric device's ensemble remembers two days of each statistic (1.5 MB): its
    # calibrations' values go to rows files too, and a save appends the new ones.
    engine = DetectionEngine(V2_SETTINGS)
    engine.observe([r for r in _v2_readings(0, 150) if r.device == "fan-2"])
    engine.save(tmp_path)
    folder = tmp_path / DEVICE_DIR
    sizes = {p.name: p.stat().st_size for p in folder.glob("fan-2.json.ring.*.rows")}
    assert len(sizes) == 8  # seven calibrations and the value's reference
    state = engine.state_dict()["devices"]["fan-2"]
    inline = len(json.dumps(state))
    # The spike check's few floats and last 17 readings (under 1 KB) stay in the file.
    spikes = len(json.dumps(state["spikes"]))
    assert spikes < 1000
    assert (folder / "fan-2.json").stat().st_size < (inline - spikes) / 2 + spikes
    engine.observe([r for r in _v2_readings(150, 160) if r.device == "fan-2"])
    engine.save(tmp_path)
    grown = {p.name: p.stat().st_size - sizes[p.name] for p in folder.glob("*.ring.*.rows")}
    # Ten values appended to each: float32 in the five compact windows (differences and
    # z-scores), float64 in the two levels' and the value's reference.
    assert sorted(grown.values()) == [10 * 4] * 5 + [10 * 8] * 3
    again = DetectionEngine.load(tmp_path)
    assert again.state_dict() == engine.state_dict()
    later = _v2_readings(160, 300)
    assert again.observe(later) == engine.observe(later)


def test_a_machine_read_every_second_alarms_at_its_first_start_and_stop_only() -> None:
    # A one-metric machine on two shifts (06:00-22:00 at 50, idle at 20, noise 1), read
    # every second with the default settings. Learned per reading its two days of values
    # were 4.8 hours and each start and stop was a record: two alarms every day. Learned
    # one value per 10 s, the second day's start and stop are no news.
    n = int(2.3 * 86400)
    t = np.arange(n)
    hour = (t % 86400) / 3600
    rng = np.random.default_rng(0)
    v = np.where((hour >= 6) & (hour < 22), 50.0, 20.0) + rng.normal(0.0, 1.0, n)
    engine = DetectionEngine(EngineSettings())
    out: list[Anomaly] = []
    for i in range(0, n, 10):
        out += engine.observe(
            [
                Reading("m", "s", "current_a", (i + k) * 10**9, float(v[i + k]))
                for k in range(min(10, n - i))
            ]
        )
    when = [
        (int(a.time_ns // 10**9 // 86400), int(a.time_ns // 10**9 % 86400 // 3600)) for a in out
    ]
    assert when == [(0, 6), (0, 22)]


def test_a_detector_saved_before_resolution_takes_it_on_without_restarting(tmp_path: Path) -> None:
    old = replace(FAST, streaming={**FAST.streaming, "resolution_s": 0.0})
    saved = DetectionEngine(old)
    rng = np.random.default_rng(3)
    for i in range(0, 400, 20):
        saved.observe(
            [Reading("fan", "s", "rpm", (i + k) * 10**9, 900.0 + rng.normal()) for k in range(20)]
        )
    saved.save(tmp_path)
    loaded = DetectionEngine.load(tmp_path, EngineSettings(warmup=300))
    det = loaded.metrics[("fan", "rpm")]
    assert loaded.restarted == 0 and det.n == 400 and det.resolution_s == 10.0


def test_a_slow_whole_degree_signal_learns_its_long_holds_and_a_stuck_one_is_still_found() -> None:
    # A temperature in whole degrees on a daily wave, with little noise (10-s readings):
    # it holds each degree for tens of minutes, longer than 12 readings from its first
    # hold on, so no hold was ever learned and each one was "stuck" (63 in 4 days). A hold
    # that ends by one degree is the signal holding; it is learned.
    t = np.arange(4 * 8640) * 10.0
    rng = np.random.default_rng(0)
    values = np.round(40 + 5 * np.sin(2 * np.pi * t / 86400) + rng.normal(0, 0.05, len(t)))
    values[3 * 8640 + 3000 :] = values[3 * 8640 + 3000]  # it dies on day 3
    engine = DetectionEngine(replace(FAST, multivariate=False))
    out: list[Anomaly] = []
    for i in range(0, len(t), 60):
        batch = values[i : i + 60]
        out += engine.observe(
            [
                Reading("tank", "s", "temp_c", int(t[i + k] * 1e9), float(v))
                for k, v in enumerate(batch)
            ]
        )
    stuck = [round(a.time_ns / 1e9 / 86400, 2) for a in out if a.detector == "stuck"]
    # Its first 13 readings (a sensor that never changed may be dead), then the real one.
    assert len(stuck) == 2 and stuck[0] < 0.01 and stuck[1] > 3.0, stuck


def test_a_device_model_sees_one_row_per_10_s_whatever_the_reading_rate() -> None:
    # Rows a second apart reach the model as the mean of each 10 s (its row counts, a week
    # or 12 h of training, stay time); rows 10 s apart pass as they are, at once.
    dev = DeviceModel(EngineSettings())
    for m in ("flow", "pressure"):
        dev.add_metric(m)
    fast = [(i * 10**9, [float(i), 2.0 * i]) for i in range(25)]
    out = dev.decimate(fast[:12], 10.0) + dev.decimate(fast[12:], 10.0)
    assert out == [(9 * 10**9, [4.5, 9.0]), (19 * 10**9, [14.5, 29.0])]
    assert dev.bucket is not None and dev.bucket[2] == 5  # 20 s to 24 s, still gathering
    again = DeviceModel(EngineSettings())
    again.load_state(json.loads(json.dumps(dev.state_dict())))
    rest = [(i * 10**9, [float(i), 2.0 * i]) for i in range(25, 31)]
    assert again.decimate(rest, 10.0) == dev.decimate(rest, 10.0) == [(29 * 10**9, [24.5, 49.0])]
    slow = [(i * 10 * 10**9, [float(i), 1.0]) for i in range(5)]
    other = DeviceModel(EngineSettings())
    assert other.decimate(slow[:1], 10.0) == []  # the first row: the usual gap not known yet
    other.row_gap_ns = 10 * 10**9  # as settle() measures it from the second row on
    assert other.decimate(slow[1:], 10.0) == slow  # then each row at once


@pytest.mark.parametrize("count", [3, 0])
def test_spikes_read_every_second_on_a_modelled_device_are_found_by_the_spike_check(
    count: int,
) -> None:
    # A two-metric device read every second, its model trained (on 10-s rows) after an
    # hour: five +8 sigma single-reading spikes of flow within 10 minutes are a tenth of
    # themselves in the model's rows. The spike check finds them and names flow; off
    # (spike_count 0) nothing does.
    settings = replace(EngineSettings(), mv_train_rows=360, spike_count=count)
    engine = DetectionEngine(settings)
    rng = np.random.default_rng(5)
    n = 3 * 3600
    spikes = set((9000 + np.sort(rng.choice(600, 5, replace=False))).tolist())
    out: list[Anomaly] = []
    for lo in range(0, n, 30):
        batch: list[Reading] = []
        for i in range(lo, lo + 30):
            batch += _pump_row(i, rng, spike=0.8 if i in spikes else 0.0)
        out += engine.observe(batch)
    assert engine.devices["pump"].model is not None
    if count:
        assert [(a.detector, a.metric) for a in out] == [("spikes", "flow")], out
        (a,) = out
        assert min(spikes) * 10**9 <= a.time_ns <= max(spikes) * 10**9
        assert re.match(r"flow spiked [345] times in \d+\.\d min, up to", a.explanation)
        assert a.contributions[0].sigma > 4
    else:
        assert out == []
