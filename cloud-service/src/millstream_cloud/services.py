"""The running parts of one service instance, built from settings and owned by the app."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from millstream_cloud.anomalies import AnomalySink
from millstream_cloud.ingest.deadletters import DeadLetterStore
from millstream_cloud.ingest.pipeline import IngestPipeline
from millstream_cloud.ingest.subscriber import Subscriber
from millstream_cloud.metrics import ServiceMetrics
from millstream_cloud.registry import DeviceRegistry
from millstream_cloud.remote import RemoteService
from millstream_cloud.settings import Settings
from millstream_cloud.storage import open_storage
from millstream_cloud.storage.base import Storage

log = logging.getLogger("millstream.services")


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
    extras: dict[str, object] = field(default_factory=dict)

    @classmethod
    def build(cls, settings: Settings, with_subscriber: bool = True) -> Services:
        data = settings.data_path
        metrics = ServiceMetrics()
        storage = open_storage(settings)
        registry = DeviceRegistry(data / "registry.db", settings.registry.url)
        dead_letters = DeadLetterStore(data / "dead_letters.db", settings.ingest.dead_letter_max)
        pipeline = IngestPipeline(storage, registry, dead_letters, metrics, settings.ingest)
        anomalies = AnomalySink(storage, metrics)
        pipeline.hooks.append(anomalies.on_readings)
        subscriber = (
            Subscriber(settings.mqtt, settings.ingest, pipeline, metrics)
            if with_subscriber
            else None
        )
        services = cls(
            settings, storage, registry, dead_letters, metrics, pipeline, anomalies, subscriber
        )
        if with_subscriber:
            remote = RemoteService(settings, data / "remote.db")
            pipeline.remote = remote
            services.extras["remote"] = remote
        return services

    def start(self) -> None:
        if self.subscriber is not None:
            self.subscriber.start()
        remote = self.extras.get("remote")
        if isinstance(remote, RemoteService):
            remote.start()

    def stop(self) -> None:
        if self.subscriber is not None:
            self.subscriber.stop()
        remote = self.extras.get("remote")
        if isinstance(remote, RemoteService):
            remote.stop()
        self.registry.close()
        self.dead_letters.close()
        self.storage.close()
