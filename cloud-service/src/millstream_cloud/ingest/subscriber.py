"""The MQTT side of ingest: a persistent session, a shared subscription, manual acks.

paho's network thread only enqueues (a bounded queue: when storage is slow the queue
fills, ``on_message`` blocks, and the broker stops sending once our in-flight window is
full: backpressure instead of unbounded memory). A writer thread takes groups of messages,
runs the pipeline, and acknowledges each message only after it is stored.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from millstream_cloud.ingest.pipeline import IngestPipeline, Message
from millstream_cloud.metrics import ServiceMetrics
from millstream_cloud.settings import IngestSettings, MQTTSettings

log = logging.getLogger("millstream.subscriber")

SUBSCRIPTIONS = (
    "millstream/v1/+/+/telemetry",
    "millstream/v1/+/+/status",
    "millstream/v1/+/+/config/reported",
    "millstream/v1/+/+/cmd/+/result",
)


def parse_broker_url(url: str) -> tuple[str, int, bool]:
    """``mqtt://host:1883`` or ``mqtts://host:8883`` -> (host, port, tls)."""
    parsed = urlparse(url)
    if parsed.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ValueError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://")
    tls = parsed.scheme in ("mqtts", "ssl")
    host = parsed.hostname or "127.0.0.1"
    port = parsed.port or (8883 if tls else 1883)
    return host, port, tls


def make_client(settings: MQTTSettings, client_id: str, manual_ack: bool = False) -> mqtt.Client:
    """A paho MQTT v5 client configured from settings (credentials, TLS)."""
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
        manual_ack=manual_ack,
    )
    if settings.username:
        client.username_pw_set(settings.username, settings.password)
    _, _, tls = parse_broker_url(settings.broker)
    if tls:
        ctx = ssl.create_default_context(cafile=settings.tls.ca)
        if settings.tls.cert:
            ctx.load_cert_chain(settings.tls.cert, settings.tls.key)
        client.tls_set_context(ctx)
    client.max_inflight_messages_set(1000)
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    return client


class Subscriber:
    def __init__(
        self,
        mqtt_settings: MQTTSettings,
        ingest_settings: IngestSettings,
        pipeline: IngestPipeline,
        metrics: ServiceMetrics,
    ) -> None:
        self.settings = mqtt_settings
        self.ingest = ingest_settings
        self.pipeline = pipeline
        self.metrics = metrics
        self.queue: queue.Queue[Message] = queue.Queue(maxsize=ingest_settings.queue_max_messages)
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._writer = threading.Thread(target=self._write_loop, name="ingest-writer", daemon=True)
        self.client = make_client(mqtt_settings, mqtt_settings.client_id, manual_ack=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    def topics(self) -> list[str]:
        group = self.settings.shared_group
        return [f"$share/{group}/{t}" if group else t for t in SUBSCRIPTIONS]

    def start(self) -> None:
        host, port, _ = parse_broker_url(self.settings.broker)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.settings.session_expiry_s
        props.ReceiveMaximum = 1000
        self._writer.start()
        self.client.connect_async(
            host, port, keepalive=self.settings.keepalive_s, clean_start=False, properties=props
        )
        self.client.loop_start()

    def stop(self, timeout: float = 10.0) -> None:
        """Drain what was received, ack it, then disconnect."""
        self._stop.set()
        self._writer.join(timeout)
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(
        self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object
    ) -> None:
        if getattr(rc, "is_failure", False):
            log.error("broker refused the connection: %s", rc)
            return
        log.info(
            "connected to %s (session present: %s)",
            self.settings.broker,
            getattr(flags, "session_present", None),
        )
        client.subscribe([(t, 1) for t in self.topics()])
        self.connected.set()
        self.metrics.broker_connected.set(1)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object
    ) -> None:
        if self.connected.is_set():
            log.warning("disconnected from broker: %s; reconnecting with backoff", rc)
            self.metrics.broker_disconnects.inc()
        self.connected.clear()
        self.metrics.broker_connected.set(0)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        mid, qos = msg.mid, msg.qos

        def ack() -> None:
            if qos > 0:
                client.ack(mid, qos)

        self.queue.put(Message(msg.topic, bytes(msg.payload), time.time_ns(), ack))
        self.metrics.queue_depth.set(self.queue.qsize())

    def _take_group(self) -> list[Message]:
        try:
            first = self.queue.get(timeout=0.2)
        except queue.Empty:
            return []
        group = [first]
        budget = self.ingest.write_batch_readings // 40 + 1  # ~40 readings per message
        deadline = time.monotonic() + self.ingest.write_max_delay_s
        while len(group) < budget:
            remaining = deadline - time.monotonic()
            try:
                group.append(
                    self.queue.get(timeout=max(remaining, 0))
                    if remaining > 0
                    else self.queue.get_nowait()
                )
            except queue.Empty:
                break
        return group

    def _write_loop(self) -> None:
        while True:
            group = self._take_group()
            if not group:
                if self._stop.is_set():
                    return
                continue
            self.metrics.queue_depth.set(self.queue.qsize())
            delay = 0.5
            while True:
                try:
                    self.pipeline.process(group)
                    break
                except Exception:
                    self.metrics.store_errors.inc()
                    log.exception(
                        "storing %d messages failed; retrying in %.1fs", len(group), delay
                    )
                    if self._stop.wait(delay):
                        return  # not acked: the broker redelivers after restart
                    delay = min(delay * 2, 30.0)
            for m in group:
                if m.ack is not None:
                    m.ack()
