"""Detection split over several workers (detection.shards): each scores its shard's devices."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from millstream_cloud.detection.engine import (
    DEVICE_DIR,
    DetectionEngine,
    Shard,
    device_partition,
)
from millstream_cloud.detection.parallel import EngineSpec, PartitionedEngine
from millstream_cloud.settings import Settings
from tests.cloud.detection.test_parallel import (
    FAST,
    _batches,
    _key,
    _run,
    registered_presses,
    unreadable_state,
)

IDS = [f"press-{i:03d}" for i in range(300)] + ["pump/with slash", "Ünïcode-7", "x" * 250]


def test_a_shard_is_a_stable_share_and_its_processes_split_exactly_that_share() -> None:
    shards = [Shard(k, 3) for k in range(3)]
    for d in IDS:
        assert [s.owns(d) for s in shards].count(True) == 1
        assert Shard().owns(d)
    assert all(sum(s.owns(d) for d in IDS) > 60 for s in shards), "roughly a third each"
    # Within shard k of S, process p of P keeps partition k + S*p of S*P: the engine that
    # a device is routed to is the one that saves and restores its file.
    for s in shards:
        for d in (d for d in IDS if s.owns(d)):
            p = s.process_of(d, 4)
            assert 0 <= p < 4
            engine = DetectionEngine(FAST, partition=s.process_partition(p, 4))
            others = [DetectionEngine(FAST, partition=s.process_partition(q, 4)) for q in range(4)]
            name = f"{d}.json" if "/" not in d and len(d) < 200 else None
            if name:
                assert engine.owns_file(name)
                assert [e.owns_file(name) for e in others].count(True) == 1
    with pytest.raises(ValueError, match=re.escape("shard 2 of 2: must be 0 .. 1")):
        Shard(2, 2)


def test_shards_together_find_exactly_what_one_engine_finds() -> None:
    batches = _batches()
    one = _key(_run(DetectionEngine(FAST), batches))
    assert one, "the faults should be found"
    found = []
    devices = {r.device for b in batches for r in b}
    for k in range(2):
        shard = Shard(k, 2)
        engine = DetectionEngine(FAST, partition=(k, 2))
        mine = [[r for r in b if shard.owns(r.device)] for b in batches]
        found += _run(engine, [b for b in mine if b])
        assert set(engine.sites) == {d for d in devices if shard.owns(d)}
    assert _key(found) == one


@pytest.mark.slow
def test_state_moves_from_one_worker_to_shards_with_processes(tmp_path: Path) -> None:
    """One engine's state directory taken over by two shards (the second with two
    processes of its own) sharing it: each restores and keeps its devices only."""
    batches = _batches()
    cut = int(len(batches) * 0.7)
    reference = DetectionEngine(FAST)
    for b in batches[:cut]:
        reference.observe(b)
    whole = _key(_run(reference, batches[cut:]))
    first = DetectionEngine(FAST)
    for b in batches[:cut]:
        first.observe(b)
    first.save(tmp_path)
    names = sorted(p.name for p in (tmp_path / DEVICE_DIR).glob("*.json"))

    zero = DetectionEngine(FAST, partition=(0, 2))
    zero.restore(tmp_path)
    one = PartitionedEngine(EngineSpec(FAST), 2, tmp_path, Shard(1, 2))
    try:
        assert one.restore(tmp_path)
        found = []
        for engine, shard in ((zero, Shard(0, 2)), (one, Shard(1, 2))):
            mine = [[r for r in b if shard.owns(r.device)] for b in batches[cut:]]
            found += _run(engine, [b for b in mine if b])
        assert _key(found) == whole
        zero.save(tmp_path)
        one.save(tmp_path)
    finally:
        one.close()
    # Each saved and cleaned up its own files only: every device's file is still there.
    assert sorted(p.name for p in (tmp_path / DEVICE_DIR).glob("*.json")) == names


def test_settings_check_the_shard_and_that_a_shard_sees_every_message() -> None:
    with pytest.raises(
        ValidationError, match=re.escape("detection.shard 2 is not one of the 2 shards")
    ):
        Settings(detection={"shards": 2, "shard": 2})
    # On a shared subscription a worker stores a share of every device's messages.
    with pytest.raises(ValidationError, match=re.escape("needs detection.feed: all")):
        Settings(detection={"shards": 2, "shard": 1})
    Settings(detection={"shards": 2, "shard": 1, "feed": "all"})
    # Without a shared group every worker receives every message anyway.
    Settings(mqtt={"shared_group": ""}, detection={"shards": 2, "shard": 1})
    Settings(detection={"shards": 2, "shard": 1, "enabled": False})


def _sharded(tmp_path: Path, k: int, n: int = 2, **detection: object) -> Settings:
    return Settings(
        data_dir=str(tmp_path),
        mqtt={"shared_group": ""},
        detection={"shards": n, "shard": k, **detection},
    )


def test_shards_on_one_data_dir_share_it_and_each_saves_its_devices(tmp_path: Path) -> None:
    from millstream_cloud.app import create_app
    from millstream_cloud.services import Services

    devices = [f"press-{i:02d}" for i in range(8)]
    zero = Services.build(_sharded(tmp_path, 0), with_subscriber=False)
    one = Services.build(_sharded(tmp_path, 1, processes=2), with_subscriber=False)
    try:
        assert zero.anomalies.detector is not None and one.anomalies.detector is not None
        # Another worker for shard 1 gets no detection; an unsharded one neither.
        again = Services.build(_sharded(tmp_path, 1), with_subscriber=False)
        plain = Services.build(
            Settings(data_dir=str(tmp_path), mqtt={"shared_group": ""}), with_subscriber=False
        )
        try:
            assert again.anomalies.detector is None
            assert "shard 1 of 2's devices" in again.anomalies.off_reason
            assert plain.anomalies.detector is None
            assert "sharded workers (detection.shards)" in plain.anomalies.off_reason
        finally:
            again.stop()
            plain.stop()

        readings = registered_presses(zero, devices, 100)  # the registry is shared
        for s in (zero, one):  # every worker is handed every reading (the feed's case)
            s.anomalies.on_readings(readings)
        theirs = {d: device_partition(d, 2) for d in devices}
        assert set(theirs.values()) == {0, 1}
        assert zero.anomalies.detector.readings_seen == 100 * list(theirs.values()).count(0)
        assert one.anomalies.detector.readings_seen == 100 * list(theirs.values()).count(1)
        for k, s in enumerate((zero, one)):
            with TestClient(create_app(s.settings, s, start=False)) as client:
                for d in devices:
                    res = client.get(f"/api/v1/devices/{d}/detection")
                    if theirs[d] == k:
                        assert res.status_code == 200, res.text
                        assert res.json()["shard"] == {"shard": k, "shards": 2}
                        assert res.json()["metrics"]["temp"]["readings_learned"] == 100
                    else:
                        assert res.status_code == 404
                        assert f"scored by detection shard {1 - k} of 2" in res.json()["detail"]
                        relearn = client.post(f"/api/v1/devices/{d}/detection/relearn")
                        assert relearn.status_code == 404
    finally:
        zero.stop()
        one.stop()
    # Both saved into the one state directory, each its own devices, none lost.
    saved = sorted(p.stem for p in (tmp_path / "detection" / DEVICE_DIR).glob("*.json"))
    assert saved == devices
    whole = DetectionEngine.load(tmp_path / "detection")
    assert {d for d, _ in whole.metrics} == set(devices)


def test_the_feed_passes_over_another_shards_devices_before_decoding_them() -> None:
    from millstream_cloud.ingest.decode import Limits
    from millstream_cloud.ingest.feed import DetectionFeed
    from millstream_cloud.metrics import ServiceMetrics
    from millstream_cloud.registry import DeviceRegistry

    settings = Settings(detection={"shards": 2, "shard": 0, "feed": "all"})
    shard = Shard(0, 2)
    mine = next(d for d in IDS if shard.owns(d))
    theirs = next(d for d in IDS if not shard.owns(d))
    metrics = ServiceMetrics()
    feed = DetectionFeed(
        settings.mqtt,
        settings.ingest,
        Limits.of(settings.ingest),
        DeviceRegistry(Path(":memory:")),
        lambda readings: None,
        metrics,
        owns=shard.owns,
    )
    try:
        # Not even valid JSON: another shard's message is not decoded at all.
        assert feed.take(f"millstream/v1/s/{theirs}/telemetry", b"{not json", 0) == []
        assert feed.take(f"millstream/v1/s/{mine}/telemetry", b"{not json", 0) == []
        assert feed.messages.labels("elsewhere")._value.get() == 1
        assert feed.messages.labels("rejected")._value.get() == 1
    finally:
        feed.registry.close()


def test_a_shard_that_cannot_read_the_state_leaves_the_other_shards_files(
    tmp_path: Path,
) -> None:
    from millstream_cloud.detection.engine import STATE_FILE
    from millstream_cloud.services import Services

    state = unreadable_state(tmp_path)
    services = Services.build(_sharded(tmp_path, 0), with_subscriber=False)
    try:
        assert services.anomalies.detector is not None
        assert len(list(state.glob(f"{STATE_FILE}.unreadable-*"))) == 1
        # The devices' files may be another running shard's: they stay where they are.
        assert (state / DEVICE_DIR / "press-01.json").exists()
        assert not list(state.glob(f"{DEVICE_DIR}.unreadable-*"))
    finally:
        services.stop()
