"""Prometheus metrics of one service instance (its own registry: no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.messages = Counter(
            "millstream_ingest_messages",
            "MQTT messages received, by channel",
            ["channel"],
            registry=r,
        )
        self.readings_stored = Counter(
            "millstream_ingest_readings_stored", "Readings written to storage", registry=r
        )
        self.rejected = Counter(
            "millstream_ingest_rejected_messages",
            "Messages rejected and dead-lettered, by reason",
            ["reason"],
            registry=r,
        )
        self.duplicates = Counter(
            "millstream_ingest_duplicate_messages",
            "Messages dropped as repeated sequence numbers",
            registry=r,
        )
        self.gaps = Counter(
            "millstream_ingest_sequence_gaps",
            "Sequence numbers skipped by devices (messages missing)",
            registry=r,
        )
        self.late = Counter(
            "millstream_ingest_late_messages",
            "Messages that arrived after a later sequence number and filled a gap "
            "(gaps minus late = sequence numbers still missing)",
            registry=r,
        )
        self.restamped = Counter(
            "millstream_ingest_restamped_readings",
            "Readings stored at arrival time because the device clock was not trusted",
            registry=r,
        )
        self.clock_skewed = Counter(
            "millstream_ingest_clock_skewed_messages",
            "Telemetry messages whose device clock was off by more than the skew bound",
            registry=r,
        )
        self.queue_capacity = Gauge(
            "millstream_ingest_queue_capacity",
            "Bound of the queue between subscriber and writer",
            registry=r,
        )
        self.inflight = Gauge(
            "millstream_ingest_unacked_messages",
            "Messages received from the broker and not yet acknowledged",
            registry=r,
        )
        self.ingest_rate = Gauge(
            "millstream_ingest_readings_per_second",
            "Readings stored per second, averaged over the last 10 s",
            registry=r,
        )
        self.groups = Counter(
            "millstream_ingest_groups",
            "Groups of messages written (one transaction each)",
            registry=r,
        )
        self.broker_connect_failures = Counter(
            "millstream_broker_connect_failures",
            "Connection attempts to the broker that failed (refused or unreachable)",
            registry=r,
        )
        self.broker_outage_seconds = Counter(
            "millstream_broker_outage_seconds",
            "Time spent disconnected from the broker after the first connection",
            registry=r,
        )
        self.queue_depth = Gauge(
            "millstream_ingest_queue_depth",
            "Messages waiting between subscriber and writer",
            registry=r,
        )
        self.lag = Gauge(
            "millstream_ingest_lag_seconds",
            "Arrival-to-stored delay of the last written batch",
            registry=r,
        )
        self.write_latency = Histogram(
            "millstream_store_write_seconds",
            "Time to write one batch to storage",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.store_errors = Counter(
            "millstream_store_write_errors", "Failed storage writes (retried)", registry=r
        )
        self.broker_connected = Gauge(
            "millstream_broker_connected", "1 while connected to the MQTT broker", registry=r
        )
        self.broker_disconnects = Counter(
            "millstream_broker_disconnects", "Connections to the broker lost", registry=r
        )
        self.devices_online = Gauge(
            "millstream_devices_online", "Devices currently online", registry=r
        )
        self.devices_known = Gauge(
            "millstream_devices_known", "Devices known to the registry", registry=r
        )
