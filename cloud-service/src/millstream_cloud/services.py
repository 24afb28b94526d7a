"""The running parts of one service instance, built from settings and owned by the app."""

from __future__ import annotations

import fcntl
import logging
import os
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from prometheus_client import Gauge

from millstream_cloud.alerts.service import AlertService
from millstream_cloud.anomalies import AnomalySink
from millstream_cloud.grafana.fleet import FleetWriter
from millstream_cloud.ingest.deadletters import DeadLetterStore
from millstream_cloud.ingest.feed import DetectionFeed
from millstream_cloud.ingest.pipeline import IngestPipeline
from millstream_cloud.ingest.subscriber import Subscriber
from millstream_cloud.maintenance import MaintenanceWindows
from millstream_cloud.metrics import ServiceMetrics
from millstream_cloud.registry import DeviceRegistry
from millstream_cloud.remote import RemoteService
from millstream_cloud.security.limits import DeviceRateLimiter
from millstream_cloud.settings import Settings
from millstream_cloud.storage import open_storage
from millstream_cloud.storage.base import Storage

if TYPE_CHECKING:
    from millstream_cloud.detection.engine import Shard

log = logging.getLogger("millstream.services")


def attach_detection(
    sink: AnomalySink,
    settings: Settings,
    state_dir: Path,
    registry: DeviceRegistry | None = None,
) -> None:
    """Give the sink the detection engine, restored from its saved state when there is one.

    With a ``registry``, rules that match on machine kind learn each device's kind from it."""
    from millstream_cloud.detection.engine import (
        DEVICE_DIR,
        STATE_FILE,
        DetectionEngine,
        settings_from_mapping,
    )
    from millstream_cloud.detection.parallel import EngineSpec, PartitionedEngine
    from millstream_cloud.detection.rules import parse_rules

    engine_settings = settings_from_mapping(settings.detection.engine)
    rules = tuple(parse_rules(settings.detection.rules))
    processes = settings.detection.processes
    shard = detection_shard(settings)

    def fresh() -> DetectionEngine | PartitionedEngine:
        if processes > 1:  # each child opens the registry itself, when rules ask for kinds
            where = None
            if registry is not None and any(r.kind is not None for r in rules):
                where = (str(registry.path), registry.url)
            spec = EngineSpec(engine_settings, rules, where)
            return PartitionedEngine(spec, processes, state_dir, shard)
        kind_of = registry.kind_of if registry is not None else None
        return DetectionEngine(engine_settings, rules, kind_of, (shard.index, shard.count))

    engine = fresh()
    path = state_dir / STATE_FILE
    if path.exists():
        try:
            engine.restore(state_dir)
            log.info("detector state restored from %s", state_dir)
        except Exception as exc:  # whatever is wrong with it, the service still starts
            # A half-restored engine is not trusted: start afresh, and keep the file for
            # inspection instead of letting the next save overwrite it.
            if isinstance(engine, PartitionedEngine):
                engine.close()
            engine = fresh()
            stamp = time.strftime("%Y%m%dT%H%M%S")
            aside = path.with_name(f"{path.name}.unreadable-{stamp}")
            path.replace(aside)
            devices = state_dir / DEVICE_DIR
            # The devices' files belong to it; with shards, also to the other shards'
            # workers, which may be running: this shard's are replaced at its next save.
            if devices.exists() and shard.count == 1:
                devices.replace(devices.with_name(f"{DEVICE_DIR}.unreadable-{stamp}"))
            log.error(
                "detector state %s is unreadable (%s: %s); kept as %s, detectors learn afresh",
                path,
                type(exc).__name__,
                exc,
                aside.name,
            )
    sink.detector = engine
    # Devices whose readings wait in the store for the detectors (saved with the state).
    own = "" if shard.count == 1 else f".shard-{shard.index}-of-{shard.count}"
    sink.behind_path = state_dir / f"behind{own}.json"
    # The devices' maintenance windows (set through the API of the worker scoring them).
    # Those of another shard layout are read too, for this shard's devices (a window
    # set before detection.shards changed still holds).
    mine = state_dir / f"maintenance{own}.json"
    others = sorted(p for p in state_dir.glob("maintenance*.json") if p != mine)
    sink.maintenance = MaintenanceWindows(mine)
    sink.maintenance.load(others, shard.owns if shard.count > 1 else None)
    if shard.count > 1:
        sink.owns = shard.owns
        log.info("detection scores the devices of %s (detection.shards)", shard)
    if processes > 1:
        log.info("detection scores in %d processes, devices split between them", processes)

    def save(guard: AbstractContextManager[Any]) -> None:
        engine.save(state_dir, guard)

    sink.save = save


@dataclass
class Services:
    settings: Settings
    storage: Storage
    registry: DeviceRegistry
    dead_letters: DeadLetterStore
    metrics: ServiceMetrics
    pipeline: IngestPipeline
    anomalies: AnomalySink
    subscriber: Subscriber | None = None
    remote: RemoteService | None = None
    fleet: FleetWriter | None = None
    alerts: AlertService | None = None
    feed: DetectionFeed | None = None  # detection.feed: all
    # Per-instance caches and hooks of optional parts (query engine, authorizers).
    extras: dict[str, object] = field(default_factory=dict)

    @classmethod
    def build(cls, settings: Settings, with_subscriber: bool = True) -> Services:
        data = settings.data_path
        metrics = ServiceMetrics()
        writer_lock = _embedded_writer_lock(settings) if with_subscriber else None
        storage = open_storage(settings)
        registry = DeviceRegistry(data / "registry.db", settings.registry.url)
        dead_letters = DeadLetterStore(data / "dead_letters.db", settings.ingest.dead_letter_max)
        pipeline = IngestPipeline(
            storage, registry, dead_letters, metrics, settings.ingest, limiter=_limiter(settings)
        )
        anomalies = AnomalySink(
            storage,
            metrics,
            queue_max_readings=settings.detection.queue_max_readings,
            save_interval_s=settings.detection.save_interval_s,
        )
        detection_lock = None
        if settings.detection.enabled:
            shard = detection_shard(settings)
            detection_lock, holder = _detection_lock(data / "detection", shard)
            if detection_lock is not None:
                attach_detection(anomalies, settings, data / "detection", registry)
                # Which shard this worker scores: count(...) < shards in Prometheus says one
                # is missing (its devices go unwatched; nothing else here can tell).
                Gauge(
                    "millstream_detection_shard",
                    "1 in each worker that runs detection, labelled with the shard it scores "
                    "and the number of shards (detection.shards)",
                    ["shard", "shards"],
                    registry=metrics.registry,
                ).labels(str(shard.index), str(shard.count)).set(1)
            else:
                who = f"process {holder}" if holder else "sharded workers (detection.shards)"
                what = f"{shard}'s devices" if shard.count > 1 else "detection"
                anomalies.off_reason = (
                    f"{who} on this data dir runs {what}; its state is one process's "
                    "(docs/cloud.md, Several workers)"
                )
                log.error(
                    "detection: off in this process: %s. Ingest, storage and alert rules on "
                    "readings run as usual",
                    anomalies.off_reason,
                )
        feed = None
        # Without a shared group (or on MQTT 3.1.1, which has none) this worker's own
        # subscription already brings every message: no second one.
        shared = settings.mqtt.shared
        if settings.detection.feed == "all" and not shared:
            log.info(
                "detection.feed: all: no shared subscription, so detection scores what "
                "this worker receives, every message"
            )
        if (
            with_subscriber
            and detection_lock is not None
            and settings.detection.feed == "all"
            and shared
        ):
            # Every device's every message, not this worker's share (docs/cloud.md).
            feed = DetectionFeed(
                settings.mqtt,
                settings.ingest,
                pipeline.limits,
                registry,
                anomalies.on_readings,
                metrics,
                limiter=_limiter(settings),  # its own: it sees all of a device's messages
                owns=anomalies.owns,
            )
        else:
            pipeline.hooks.append(anomalies.on_readings)
        subscriber = (
            Subscriber(settings.mqtt, settings.ingest, pipeline, metrics)
            if with_subscriber
            else None
        )
        services = cls(
            settings, storage, registry, dead_letters, metrics, pipeline, anomalies, subscriber
        )
        services.feed = feed
        # Rules on readings (pipeline hook) and anomalies (sink hook), devices from the
        # registry, metrics, the `alerts` measurement. A bad rules file raises RuleError.
        AlertService.for_services(services, settings.alerts)  # sets services.alerts
        if with_subscriber:
            services.remote = RemoteService(settings, data / "remote.db")
            pipeline.remote = services.remote
            # Device state and ingest rate as series, for the fleet dashboard.
            services.fleet = FleetWriter(storage, registry, metrics, settings.mqtt.client_id)
        if writer_lock is not None:
            services.extras["embedded_writer_lock"] = writer_lock
        if detection_lock is not None:
            services.extras["detection_lock"] = detection_lock
        return services

    def start(self) -> None:
        if self.subscriber is not None:
            self.anomalies.busy = self.subscriber.receiving
        self.anomalies.start()
        if self.feed is not None:
            self.feed.start()
        if self.subscriber is not None:
            self.subscriber.start()
        if self.remote is not None:
            self.remote.start()
        if self.fleet is not None:
            self.fleet.start()
        if self.alerts is not None:
            self.alerts.start()

    def stop(self) -> None:
        if self.fleet is not None:
            self.fleet.stop()
        if self.subscriber is not None:
            self.subscriber.stop()
        if self.feed is not None:
            self.feed.stop()
        self.anomalies.stop()  # its last save first, then the scoring processes (if any)
        close = getattr(self.anomalies.detector, "close", None)
        if close is not None:
            close()
        if self.remote is not None:
            self.remote.stop()
        if self.alerts is not None:
            self.alerts.stop()  # after the subscriber: no more readings arrive
        self.registry.close()
        self.dead_letters.close()
        self.storage.close()
        for name in ("embedded_writer_lock", "detection_lock"):
            lock = self.extras.pop(name, None)
            if lock is not None:
                lock.close()  # type: ignore[attr-defined]


def detection_shard(settings: Settings) -> Shard:
    """The devices this worker's detection scores (all of them unless sharded)."""
    from millstream_cloud.detection.engine import Shard

    return Shard(settings.detection.shard, settings.detection.shards)


def _limiter(settings: Settings) -> DeviceRateLimiter | None:
    """A per-device message rate limit as ``ingest.*`` says (None: unlimited)."""
    rate = settings.ingest.rate_limit_per_device
    return DeviceRateLimiter(rate, settings.ingest.rate_limit_burst) if rate else None


def _process_lock(path: Path, exclusive: bool = True) -> tuple[IO[str] | None, str]:
    """Take ``path`` for this process (an exclusive ``flock``, held while the handle is
    open) and write its pid there; when another process holds it: None and that pid.
    Not ``exclusive``: a shared lock, which any number of processes hold together (and
    none of them writes its pid)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 (not "w": it would wipe the holder's pid)
    try:
        fcntl.flock(handle, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        return None, holder
    if not exclusive:
        return handle, ""
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle, str(os.getpid())


class _Locks:
    """Lock handles held together, released together."""

    def __init__(self, *handles: IO[str]) -> None:
        self.handles = handles

    def close(self) -> None:
        for h in self.handles:
            h.close()


def _detection_lock(state_dir: Path, shard: Shard) -> tuple[_Locks | None, str]:
    """One process per detector state: two workers on one data dir would each save their
    own view of a device over the other's (and append to the same rows files). The first
    takes ``detection.lock`` beside the state; a later one gets None and the first's pid.

    Sharded workers (``detection.shards``) each save only their shard's devices, so they
    share ``detection.lock`` (an unsharded worker cannot take it while they run, nor they
    while it does) and each takes its shard's own ``detection.shard-K-of-N.lock``."""
    base = state_dir.parent / f"{state_dir.name}.lock"
    if shard.count == 1:
        handle, holder = _process_lock(base)
        return (_Locks(handle) if handle else None), holder
    common, holder = _process_lock(base, exclusive=False)
    if common is None:  # an unsharded worker detects for every device here
        return None, holder
    own_path = base.with_name(f"{state_dir.name}.shard-{shard.index}-of-{shard.count}.lock")
    own, holder = _process_lock(own_path)
    if own is None:
        common.close()
        return None, holder
    return _Locks(common, own), holder


def _embedded_writer_lock(settings: Settings) -> IO[str] | None:
    """One ingest process per embedded store: it keeps series ids and recent points in
    memory, so a second writer would corrupt it. Several workers need a shared store
    (storage.backend: influxdb); see docs/cloud.md."""
    if settings.storage.backend != "embedded":
        return None
    emb = settings.storage.embedded
    store = Path(emb.path) if emb.path else settings.data_path / "embedded"
    handle, holder = _process_lock(store.parent / f"{store.name}.writer.lock")
    if handle is None:
        raise RuntimeError(
            f"another millstream-cloud ingest process writes the embedded store {store} "
            f"(pid {holder or '?'}); several workers need storage.backend: influxdb "
            "(or one embedded path each)"
        )
    return handle
