"""Sequence state is correct when several worker processes share one registry database."""

from __future__ import annotations

import multiprocessing as mp
import random
import time
from pathlib import Path

from millstream_cloud.ingest.deadletters import DeadLetterStore
from millstream_cloud.ingest.pipeline import IngestPipeline, Message
from millstream_cloud.metrics import ServiceMetrics
from millstream_cloud.registry import DeviceRegistry
from millstream_cloud.settings import IngestSettings
from millstream_cloud.storage.base import Storage
from tests.cloud.ingest.conftest import NS, batch, telemetry_topic


class CountingStorage(Storage):
    name = "counting"

    def __init__(self) -> None:
        self.written = 0
        self.points: list = []

    def write_points(self, points):  # type: ignore[no-untyped-def]
        self.points.extend(points)

    def write_readings(self, readings, kinds=None):  # type: ignore[no-untyped-def]
        self.written += len(readings)

    def query(self, query):  # type: ignore[no-untyped-def]
        return []

    def latest(self, measurement, tags):  # type: ignore[no-untyped-def]
        return {}

    def measurements(self):  # type: ignore[no-untyped-def]
        return []

    def field_keys(self, measurement):  # type: ignore[no-untyped-def]
        return {}

    def tag_keys(self, measurement):  # type: ignore[no-untyped-def]
        return []

    def tag_values(self, measurement, key, tags=None):  # type: ignore[no-untyped-def]
        return []


def pipeline_for(data: Path, storage: Storage | None = None) -> IngestPipeline:
    return IngestPipeline(
        storage or CountingStorage(),
        DeviceRegistry(data / "registry.db"),
        DeadLetterStore(data / "dead_letters.db"),
        ServiceMetrics(),
        IngestSettings(),
    )


def _worker(data: str, seed: int, out: mp.Queue, start: object) -> None:  # type: ignore[type-arg]
    pipe = pipeline_for(Path(data))
    t0 = 1_700_000_000 * NS
    msgs = [
        Message(telemetry_topic(f"d{d}"), batch(f"d{d}", seq, t0 + seq * NS, n=4), time.time_ns())
        for seq in range(60)
        for d in range(5)
    ]
    random.Random(seed).shuffle(msgs)  # the other worker sees the same messages, another order
    stored = dups = 0
    start.wait()  # type: ignore[attr-defined]
    for i in range(0, len(msgs), 7):
        time.sleep(0.002)
        r = pipe.process(msgs[i : i + 7])
        stored += r.stored
        dups += r.duplicates
    out.put((stored, dups))


def test_two_processes_same_messages_each_stored_once(tmp_path: Path) -> None:
    pipeline_for(tmp_path)  # create the schema before the race
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_worker, args=(str(tmp_path), s, out, start)) for s in (1, 2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    stored = sum(r[0] for r in results)
    dups = sum(r[1] for r in results)
    assert stored == 5 * 60 * 4  # each of the 300 messages admitted by exactly one worker
    assert dups == 300
    assert all(r[0] > 0 for r in results)
    reg = DeviceRegistry(tmp_path / "registry.db")
    for dev in reg.all():
        assert dev.last_seq == 59 and dev.duplicates == 60
        assert dev.gaps == 0 and not dev.missing  # late arrivals filled every transient gap


def test_failed_write_leaves_sequence_state_untouched(tmp_path: Path) -> None:
    class Failing(CountingStorage):
        fail = True

        def write_readings(self, readings, kinds=None):  # type: ignore[no-untyped-def]
            if self.fail:
                raise OSError("disk full")
            super().write_readings(readings, kinds)

    store = Failing()
    pipe = pipeline_for(tmp_path, store)
    msg = Message(telemetry_topic("d1"), batch("d1", 0, 1_700_000_000 * NS), time.time_ns())
    try:
        pipe.process([msg])
    except OSError:
        pass
    assert pipe.registry.get("d1") is None  # rolled back with the failed write
    store.fail = False
    r = pipe.process([msg])  # the retry (or the broker's redelivery) stores it
    assert r.stored == 40 and r.duplicates == 0
    assert pipe.process([msg]).duplicates == 1


class Limiter:
    def __init__(self, allowed: int) -> None:
        self.left = allowed

    def allow(self, device: str, now: float) -> bool:
        self.left -= 1
        return self.left >= 0


def test_rate_limiter_rejects_to_dead_letters(tmp_path: Path) -> None:
    pipe = pipeline_for(tmp_path)
    pipe.limiter = Limiter(2)
    t0 = 1_700_000_000 * NS
    msgs = [
        Message(telemetry_topic("d1"), batch("d1", s, t0 + s * NS), time.time_ns())
        for s in range(4)
    ]
    r = pipe.process(msgs)
    assert r.stored == 80 and r.rejected == 2
    assert [d.reason for d in pipe.dead_letters.list()] == ["rate_limited", "rate_limited"]
    dev = pipe.registry.get("d1")
    assert dev is not None and dev.last_seq == 3 and dev.gaps == 0 and dev.rejected == 2


def test_clock_policy(tmp_path: Path) -> None:
    pipe = pipeline_for(tmp_path)
    now = time.time_ns()
    ahead = batch("d1", 0, now + 60 * NS, n=2)  # 60 s ahead: within the future bound, skewed
    r = pipe.process([Message(telemetry_topic("d1"), ahead, now)])
    assert r.stored == 2 and all(x.source_time_ns is None for x in r.readings)
    dev = pipe.registry.get("d1")
    assert dev is not None and dev.clock_skewed and dev.clock_skew_s > 50
    far = batch("d1", 1, now + 3600 * NS, n=2)  # 1 h ahead: stored at arrival, original kept
    r = pipe.process([Message(telemetry_topic("d1"), far, now)])
    src = [x.source_time_ns for x in r.readings]
    assert None not in src and abs(src[0] - (now + 3600 * NS)) < 1000  # type: ignore[operator]
    # shifted so the newest lands on arrival time, spacing kept (1 ms apart)
    assert [x.time_ns for x in r.readings] == [now - 1_000_000, now]
    unsynced = batch("d1", 2, 0, n=1, clock="unsynced")  # 1970: never trusted
    r = pipe.process([Message(telemetry_topic("d1"), unsynced, now)])
    assert r.readings[0].time_ns == now and r.readings[0].source_time_ns == 0
    assert pipe.registry.get("d1").restamped == 3  # type: ignore[union-attr]
    kept = [p for p in pipe.storage.points if p.measurement == "restamped"]  # type: ignore[attr-defined]
    assert len(kept) == 3 and kept[-1].fields == {"m0": 0} and kept[-1].time_ns == now
    good = batch("d1", 3, now - NS, n=1)
    r = pipe.process([Message(telemetry_topic("d1"), good, now)])
    assert not pipe.registry.get("d1").clock_skewed  # type: ignore[union-attr]
