"""Detection over several processes (detection.processes): same findings, one state."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from millstream_cloud.detection import parallel
from millstream_cloud.detection.engine import (
    DEVICE_DIR,
    STATE_FILE,
    DetectionEngine,
    device_partition,
)
from millstream_cloud.detection.eval.sim import SimConfig, simulate
from millstream_cloud.detection.parallel import EngineSpec, PartitionedEngine
from millstream_cloud.model import Anomaly, Reading
from tests.cloud.detection.test_engine import FAST as ONE_A_SECOND
from tests.cloud.detection.test_engine import silent_pump_and_fan

# test_engine's settings (every row learned), device models trained after 720 rows.
FAST = replace(ONE_A_SECOND, mv_train_rows=720)
# Four devices, two faults after the models are trained; 10-s rows over 5 hours.
FLEET = SimConfig(seed=3, devices=4, hours=5, fault_after_h=3, faults=("level_shift", "stuck"))


def _batches() -> list[list[Reading]]:
    return list(simulate(FLEET).batches())


def _key(found: list[Anomaly]) -> list[tuple[str, str | None, int, str, float]]:
    return sorted((a.device, a.metric, a.time_ns, a.detector, round(a.score, 9)) for a in found)


def _run(
    engine: DetectionEngine | PartitionedEngine, batches: list[list[Reading]]
) -> list[Anomaly]:
    out: list[Anomaly] = []
    for b in batches:
        out += engine.observe(b)
    return out + engine.flush()


@pytest.fixture
def two() -> Iterator[PartitionedEngine]:
    engine = PartitionedEngine(EngineSpec(FAST), 2)
    yield engine
    engine.close()


def test_the_fleet_is_split_and_both_halves_are_watched() -> None:
    devices = {r.device for r in _batches()[0]}
    assert {device_partition(d, 2) for d in devices} == {0, 1}
    # Stable: a function of the id only (not Python's per-process hash).
    assert device_partition("sim-00", 2) == device_partition("sim-00", 2)
    assert [device_partition(d, 1) for d in devices] == [0] * len(devices)


@pytest.mark.slow
def test_several_processes_find_exactly_what_one_engine_finds(two: PartitionedEngine) -> None:
    batches = _batches()
    one = _key(_run(DetectionEngine(FAST), batches))
    split = _key(_run(two, batches))
    assert one, "the faults should be found"
    assert {d for d, *_ in one} == {d for d, *_ in split}
    assert split == one
    assert two.readings_seen == sum(len(b) for b in batches)
    assert two.failed_readings == 0


@pytest.mark.slow
def test_state_moves_between_one_process_and_several(tmp_path: Path) -> None:
    batches = _batches()
    cut = int(len(batches) * 0.7)  # after training, before the faults are over
    names = sorted(f"{d}.json" for d in {r.device for r in batches[0]})
    reference = DetectionEngine(FAST)
    for b in batches[:cut]:
        reference.observe(b)
    whole = _key(_run(reference, batches[cut:]))
    assert whole, "the faults after the cut should be found"

    # Several processes save; one engine continues from their state...
    split = PartitionedEngine(EngineSpec(FAST), 2, tmp_path / "a")
    try:
        for b in batches[:cut]:
            split.observe(b)
        split.save(tmp_path / "a")
    finally:
        split.close()
    files = sorted(p.name for p in (tmp_path / "a" / DEVICE_DIR).glob("*.json"))
    assert files == names, "each process keeps the others' files"
    assert (tmp_path / "a" / STATE_FILE).exists()
    one = DetectionEngine.load(tmp_path / "a", FAST)
    assert one.readings_seen == sum(len(b) for b in batches[:cut])
    assert _key(_run(one, batches[cut:])) == whole

    # ...and several processes continue from one engine's state.
    first = DetectionEngine(FAST)
    for b in batches[:cut]:
        first.observe(b)
    first.save(tmp_path / "b")
    again = PartitionedEngine(EngineSpec(FAST), 3, tmp_path / "b")
    try:
        assert again.restore(tmp_path / "b")
        assert _key(_run(again, batches[cut:])) == whole
        again.save(tmp_path / "b")
    finally:
        again.close()
    files = sorted(p.name for p in (tmp_path / "b" / DEVICE_DIR).glob("*.json"))
    assert files == names


def test_a_held_alarm_is_released_by_the_time_of_the_whole_batch() -> None:
    # As test_engine's silent pump: its alarm is released once the fleet is 7 of its row
    # gaps past its last row. Here the fan, whose readings carry the time, is scored in the
    # other process: each process hears the batch's time, so the release comes as with one.
    assert device_partition("pump", 2) != device_partition("fan", 2)
    pump, fan = silent_pump_and_fan()
    engine = PartitionedEngine(EngineSpec(replace(ONE_A_SECOND, warmup=200)), 2)
    try:
        assert engine.observe(pump[:1000]) + engine.observe(fan[:1000]) == []
        assert engine.observe(pump[1000:]) == []  # held
        released = [engine.observe(fan[i : i + 2]) for i in range(1000, 1040, 2)]
        assert [500 + k for k, out in enumerate(released) if out] == [507]
        assert [(a.device, a.metric) for a in released[7]] == [("pump", "flow")]
    finally:
        engine.close()


def test_describe_and_relearn_reach_the_process_that_holds_the_device(
    two: PartitionedEngine,
) -> None:
    t0 = 1_772_352_000_000_000_000
    readings = [
        Reading(d, "s", "temp", t0 + i * 10**9, 20.0 + (i % 7) * 0.1)
        for i in range(50)
        for d in ("press-01", "press-02", "press-03", "press-04")
    ]
    two.observe(readings)
    for d in ("press-01", "press-02", "press-03", "press-04"):
        seen = two.describe(d, None, ["temp"])
        assert seen["process"] == {"partition": device_partition(d, 2), "processes": 2}
        assert seen["metrics"]["temp"]["readings_learned"] == 50
    assert two.relearn("press-03")["metric_detectors"] == 1
    assert two.describe("press-03", None, ["temp"])["metrics"]["temp"]["readings_learned"] == 0
    assert two.describe("press-04", None, ["temp"])["metrics"]["temp"]["readings_learned"] == 50
    # Re-arming after a maintenance window: a sensor still stuck is reported again.
    stuck = [Reading("press-02", "s", "temp", t0 + (50 + i) * 10**9, 21.5) for i in range(20)]
    assert [a.detector for a in two.observe(stuck)] == ["stuck"]
    assert two.rearm("press-04") == {"stuck": 0, "device_model": 0}
    assert two.rearm("press-02") == {"stuck": 1, "device_model": 0}
    again = two.observe([Reading("press-02", "s", "temp", t0 + 70 * 10**9, 21.5)])
    assert [(a.detector, a.metric) for a in again] == [("stuck", "temp")]
    # What the detectors hold out of line, gathered from the process that holds it.
    assert two.out_of_line() == [("press-02", "temp")]
    two.observe([Reading("press-02", "s", "temp", t0 + 71 * 10**9, 20.3)])
    assert two.out_of_line() == []


def test_a_process_that_dies_costs_its_batch_and_is_started_again_from_the_last_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(parallel, "RESTART_BACKOFF_S", 0.0)
    t0 = 1_772_352_000_000_000_000
    devices = ("press-01", "press-02", "press-03", "press-04")

    def batch(lo: int, hi: int) -> list[Reading]:
        return [
            Reading(d, "s", "temp", t0 + i * 10**9, 20.0 + (i % 7) * 0.1)
            for i in range(lo, hi)
            for d in devices
        ]

    engine = PartitionedEngine(EngineSpec(FAST), 2, tmp_path)
    try:
        engine.observe(batch(0, 40))
        engine.save(tmp_path)
        engine.observe(batch(40, 60))  # not saved: lost with the process
        lost = engine.children[0]
        lost.proc.kill()
        lost.proc.join(5)
        engine.observe(batch(60, 70))
        mine = [d for d in devices if device_partition(d, 2) == 0]
        assert mine, "partition 0 holds a device"
        assert engine.failed_readings == 10 * len(mine)
        assert engine.restarts == 1
        assert engine.children[0].proc.is_alive()
        # The other partition never noticed; the restarted one resumed from the save.
        engine.observe(batch(70, 80))
        assert engine.failed_readings == 10 * len(mine)
        for d in devices:
            learned = engine.describe(d, None, ["temp"])["metrics"]["temp"]["readings_learned"]
            assert learned == (50 if d in mine else 80)
    finally:
        engine.close()
    assert not any(c.proc.is_alive() for c in engine.children)


def test_a_process_that_keeps_dying_is_not_started_again_for_every_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(parallel, "RESTART_BACKOFF_S", 3600.0)
    t0 = 1_772_352_000_000_000_000
    devices = ("press-01", "press-02", "press-03", "press-04")
    mine = [d for d in devices if device_partition(d, 2) == 0]
    engine = PartitionedEngine(EngineSpec(FAST), 2)
    try:
        engine.children[0].proc.kill()
        engine.children[0].proc.join(5)
        for lo in (0, 10):
            engine.observe(
                [
                    Reading(d, "s", "temp", t0 + i * 10**9, 20.0)
                    for i in range(lo, lo + 10)
                    for d in devices
                ]
            )
        assert engine.restarts == 0
        assert engine.failed_readings == 20 * len(mine)
        assert engine.readings_seen == 20 * (len(devices) - len(mine))  # the others go on
    finally:
        engine.close()


def registered_presses(services: Any, devices: Sequence[str], n: int) -> list[Reading]:
    """Register ``devices`` (kind press, site plant-a) through the service's pipeline, as
    the API asks the registry, and return ``n`` healthy temperature readings of each."""
    from millstream_cloud.ingest.pipeline import Message

    now = time.time_ns()
    for d in devices:
        body = f'{{"v": 1, "device": "{d}", "state": "online", "kind": "press"}}'
        services.pipeline.process(
            [Message(f"millstream/v1/plant-a/{d}/status", body.encode(), now)]
        )
    t0 = now - 400 * 10**9
    return [
        Reading(d, "plant-a", "temp", t0 + i * 10**9, 20.0 + (i % 5) * 0.1)
        for i in range(n)
        for d in devices
    ]


def test_the_service_scores_in_the_processes_it_is_given(tmp_path: Path) -> None:
    from millstream_cloud.app import create_app
    from millstream_cloud.services import Services
    from millstream_cloud.settings import Settings

    settings = Settings(data_dir=str(tmp_path), detection={"processes": 2})
    services = Services.build(settings, with_subscriber=False)
    engine = services.anomalies.detector
    devices = ("press-01", "press-02", "press-03")
    try:
        assert isinstance(engine, PartitionedEngine)
        services.anomalies.on_readings(registered_presses(services, devices, 300))
        assert engine.readings_seen == 900
        with TestClient(create_app(settings, services, start=False)) as client:
            for d in devices:
                res = client.get(f"/api/v1/devices/{d}/detection")
                assert res.status_code == 200, res.text
                body = res.json()
                assert body["process"] == {"partition": device_partition(d, 2), "processes": 2}
                assert body["metrics"]["temp"]["readings_learned"] == 300
    finally:
        services.stop()
    assert not any(c.proc.is_alive() for c in engine.children)
    assert (tmp_path / "detection" / STATE_FILE).exists()
    # One engine takes the state over, every device and all it learned.
    again = DetectionEngine.load(tmp_path / "detection")
    assert again.readings_seen == 900
    assert {d for d, _ in again.metrics} == set(devices)


def unreadable_state(data_dir: Path) -> Path:
    """A detection state directory under ``data_dir`` whose header is of an unknown
    version, with one device's file."""
    import json

    state = data_dir / "detection"
    (state / DEVICE_DIR).mkdir(parents=True)
    (state / STATE_FILE).write_text(json.dumps({"version": 99, "settings": {}}))
    (state / DEVICE_DIR / "press-01.json").write_text("{}")
    return state


def test_a_state_the_processes_cannot_read_is_kept_aside_and_they_start_afresh(
    tmp_path: Path,
) -> None:
    from millstream_cloud.services import Services
    from millstream_cloud.settings import Settings

    state = unreadable_state(tmp_path)
    settings = Settings(data_dir=str(tmp_path), detection={"processes": 2})
    services = Services.build(settings, with_subscriber=False)
    engine = services.anomalies.detector
    try:
        assert isinstance(engine, PartitionedEngine)
        assert not (state / STATE_FILE).exists()
        assert len(list(state.glob(f"{STATE_FILE}.unreadable-*"))) == 1
        t0 = 1_772_352_000_000_000_000
        engine.observe(
            [
                Reading(d, "s", "temp", t0 + i * 10**9, 20.0)
                for i in range(30)
                for d in ("press-01", "press-03")
            ]
        )
        # The fresh processes score and answer.
        for d in ("press-01", "press-03"):
            assert engine.describe(d, None, ["temp"])["metrics"]["temp"]["readings_learned"] == 30
    finally:
        services.stop()


def test_after_every_process_refuses_a_request_they_all_still_answer_in_turn(
    two: PartitionedEngine, tmp_path: Path
) -> None:
    import json

    (tmp_path / STATE_FILE).write_text(json.dumps({"version": 99, "settings": {}}))
    with pytest.raises(RuntimeError, match="version 99"):
        two.restore(tmp_path)
    t0 = 1_772_352_000_000_000_000
    devices = ("press-01", "press-03")  # one in each partition
    two.observe([Reading(d, "s", "temp", t0 + i * 10**9, 20.0) for i in range(30) for d in devices])
    assert two.failed_readings == 0
    for d in devices:
        assert two.describe(d, None, ["temp"])["metrics"]["temp"]["readings_learned"] == 30


def test_the_processes_take_each_devices_kind_from_the_registry_for_the_rules(
    tmp_path: Path,
) -> None:
    from millstream_cloud.services import Services
    from millstream_cloud.settings import Settings

    rules = [{"match": {"kind": "lathe"}, "enabled": False}]
    settings = Settings(data_dir=str(tmp_path), detection={"processes": 2, "rules": rules})
    services = Services.build(settings, with_subscriber=False)
    engine = services.anomalies.detector
    try:
        assert isinstance(engine, PartitionedEngine)
        t0 = 1_772_352_000_000_000_000
        lathes, presses = ("lathe-01", "lathe-03"), ("press-01", "press-03")
        for d in lathes:
            services.registry.set_status(d, "plant-a", True, t0, kind="lathe")
        assert {device_partition(d, 2) for d in lathes} == {0, 1}
        engine.observe(
            [
                Reading(d, "plant-a", "temp", t0 + i * 10**9, 20.0 + (i % 5) * 0.1)
                for i in range(100)
                for d in lathes + presses
            ]
        )
        learned = {
            d: engine.describe(d, None, ["temp"])["metrics"]["temp"]["readings_learned"]
            for d in lathes + presses
        }
        assert learned == {"lathe-01": 0, "lathe-03": 0, "press-01": 100, "press-03": 100}
    finally:
        services.stop()
