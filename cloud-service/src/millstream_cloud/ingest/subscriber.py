"""The MQTT side of ingest: a persistent session, a shared subscription, manual acks.

paho's network thread only enqueues (a bounded queue: when storage is slow the queue
fills, ``on_message`` blocks, and the broker stops sending once our in-flight window is
full: backpressure instead of unbounded memory). A writer thread takes groups of messages,
runs the pipeline, and acknowledges each message only after it is stored.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from millstream_cloud.ingest.pipeline import IngestPipeline, Message
from millstream_cloud.metrics import ServiceMetrics
from millstream_cloud.security.tls import client_context
from millstream_cloud.settings import IngestSettings, MQTTSettings

log = logging.getLogger("millstream.subscriber")

# One level catches telemetry, status and unknown channels (dead-lettered), but not what
# the cloud itself publishes (config/desired, cmd/<name>). Command results are taken by
# the remote-config service on its own, non-shared subscription: the worker waiting for
# a result must see it, whichever worker the shared group would have chosen.
SUBSCRIPTIONS = (
    "millstream/v1/+/+/+",
    "millstream/v1/+/+/config/reported",
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


def make_client(
    settings: MQTTSettings, client_id: str, manual_ack: bool = False, clean: bool = False
) -> mqtt.Client:
    """A paho MQTT client configured from settings (version, credentials, TLS). ``clean``:
    an MQTT 3.1.1 client that discards its stored session (MQTT 5 says so on connect)."""
    if settings.protocol == "3.1.1":
        # A persistent session is the 3.1.1 way to keep our queue while we are away.
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=clean,
            manual_ack=manual_ack,
        )
    else:
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
        t = settings.tls
        client.tls_set_context(client_context(t.ca, t.cert, t.key, t.server_hostname))
    client.max_inflight_messages_set(1000)
    client.reconnect_delay_set(min_delay=1, max_delay=30)  # exponential backoff, capped
    return client


def connect_persistent(client: mqtt.Client, settings: MQTTSettings) -> None:
    """Connect ``client`` in the background, resuming its persistent session (queued
    messages wait for it while it is away), and start its network loop."""
    host, port, _ = parse_broker_url(settings.broker)
    if settings.protocol == "3.1.1":  # the session: clean_session=False (make_client)
        client.connect_async(host, port, keepalive=settings.keepalive_s)
    else:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = settings.session_expiry_s
        # How many unacknowledged messages the broker may send us (MQTT 5 Receive
        # Maximum; for MQTT 3.1.1 clients Mosquitto uses its max_inflight_messages).
        props.ReceiveMaximum = settings.receive_maximum
        client.connect_async(
            host, port, keepalive=settings.keepalive_s, clean_start=False, properties=props
        )
    client.loop_start()


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
        metrics.queue_capacity.set(ingest_settings.queue_max_messages)
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._stopping = False
        self._retiring = False
        self._last_message = time.monotonic()
        self._arrivals: deque[float] = deque(maxlen=self.BUSY_MESSAGES)  # latest arrival times
        self._writer = threading.Thread(target=self._write_loop, name="ingest-writer", daemon=True)
        # A PUBACK names a packet id, which is only meaningful on the connection that
        # delivered the message: after a reconnect the broker redelivers whatever was not
        # acknowledged (possibly reusing ids), so acks of an older connection are dropped.
        self._generation = 0
        self._unacked = 0
        self._count_lock = threading.Lock()
        self._down_since: float | None = None
        self._ever_connected = False
        self._rate_window: list[tuple[float, int]] = []
        # Received and not yet processed, in payload bytes: the memory bound that holds
        # even when the broker ignores our receive maximum (see docs/cloud.md).
        self._held_bytes = 0
        self._room = threading.Condition()
        self.client = make_client(mqtt_settings, mqtt_settings.client_id, manual_ack=True)
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    # Ingest counts as busy (and detection paces itself, AnomalySink) while messages wait
    # to be written or arrive faster than BUSY_MESSAGES in ``within_s``: above 100 a
    # second. A fleet's live trickle (10 devices, one message a second each) left
    # detection paced all the time when any message within 0.2 s counted: it then scored
    # about 1,400 readings/s, and an agent's replayed backlog was mostly skipped.
    BUSY_MESSAGES = 20

    def receiving(self, within_s: float = 0.2) -> bool:
        """True while ingest has messages waiting or they arrive faster than
        ``BUSY_MESSAGES`` in ``within_s`` seconds."""
        if not self.queue.empty():
            return True
        arrivals = self._arrivals
        return len(arrivals) == arrivals.maxlen and time.monotonic() - arrivals[0] < within_s

    def topics(self) -> list[str]:
        group = self.settings.shared_group
        return [f"$share/{group}/{t}" if self.settings.shared else t for t in SUBSCRIPTIONS]

    def start(self) -> None:
        self._writer.start()
        connect_persistent(self.client, self.settings)

    def stop(self, timeout: float = 10.0) -> None:
        """Store and ack what was received, then disconnect; later messages stay queued
        at the broker for this session."""
        self._stopping = True
        self._stop.set()
        if self._writer.ident is not None:  # started
            self._writer.join(timeout)
        self.client.disconnect()
        self.client.loop_stop()

    def retire(self, idle_s: float = 3.0, timeout: float = 600.0) -> int:
        """Leave the shared group for good: resume this worker's session, unsubscribe,
        store and ack what the broker still had queued for it, then disconnect with
        session expiry 0 so the broker deletes the session. Returns messages drained."""
        self._retiring = True
        self.start()
        if not self.connected.wait(30):
            raise RuntimeError(f"cannot connect to {self.settings.broker}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(0.2)
            idle = time.monotonic() - self._last_message
            if idle >= idle_s and self.queue.empty() and self._unacked == 0:
                break
        drained = self.pipeline.messages_total
        self._stopping = True
        self._stop.set()
        self._writer.join(30)
        if self.settings.protocol == "3.1.1":
            self.client.disconnect()  # 3.1.1 has no session expiry: see docs/cloud.md
        else:
            props = Properties(PacketTypes.DISCONNECT)
            props.SessionExpiryInterval = 0
            self.client.disconnect(properties=props)
        self.client.loop_stop()
        return drained

    def _on_connect(
        self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object
    ) -> None:
        if getattr(rc, "is_failure", False):
            log.error("broker %s refused the connection: %s", self.settings.broker, rc)
            self.metrics.broker_connect_failures.inc()
            return
        with self._count_lock:
            self._generation += 1
            self._unacked = 0
        if self._down_since is not None:
            outage = time.monotonic() - self._down_since
            self.metrics.broker_outage_seconds.inc(outage)
            log.warning("reconnected to %s after %.1fs", self.settings.broker, outage)
            self._down_since = None
        log.info(
            "connected to %s as %s (session present: %s)",
            self.settings.broker,
            self.settings.client_id,
            getattr(flags, "session_present", None),
        )
        self._ever_connected = True
        if self._retiring:
            client.unsubscribe(self.topics())
        else:
            client.subscribe([(t, 1) for t in self.topics()])
        self.connected.set()
        self.metrics.broker_connected.set(1)

    def _on_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        self.metrics.broker_connect_failures.inc()
        if self._ever_connected and self._down_since is None:
            self._down_since = time.monotonic()
        log.warning("cannot reach broker %s; retrying with backoff", self.settings.broker)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object
    ) -> None:
        if self.connected.is_set() and not self._stopping:
            log.warning(
                "disconnected from broker %s: %s; reconnecting with backoff",
                self.settings.broker,
                rc,
            )
            self.metrics.broker_disconnects.inc()
            self._down_since = time.monotonic()
        self.connected.clear()
        self.metrics.broker_connected.set(0)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        if self._stopping:
            return  # not acked: the broker keeps it for this session
        mid, qos, generation = msg.mid, msg.qos, self._generation

        def ack() -> None:
            if qos > 0 and generation == self._generation:
                client.ack(mid, qos)

        self._last_message = time.monotonic()
        self._arrivals.append(self._last_message)
        with self._count_lock:
            self._unacked += 1
        # Blocks when the writer is behind (queue full, or too many bytes held): paho's
        # network thread then stops reading the socket and TCP flow control holds the
        # broker back (backpressure, bounded memory); the backlog waits at the broker.
        size = len(msg.payload)
        limit = self.ingest.queue_max_bytes
        with self._room:
            while self._held_bytes and self._held_bytes + size > limit and not self._stopping:
                self._room.wait(0.5)
            self._held_bytes += size
        self.queue.put(Message(msg.topic, msg.payload, time.time_ns(), ack))

    def _take_group(self) -> list[Message]:
        try:
            first = self.queue.get(timeout=0.2)
        except queue.Empty:
            return []
        group = [first]
        budget = self.settings.ack_batch
        deadline = time.monotonic() + self.ingest.write_max_delay_s
        while len(group) < budget:
            try:
                group.append(self.queue.get_nowait())
                continue
            except queue.Empty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                group.append(self.queue.get(timeout=remaining))
            except queue.Empty:
                break
        return group

    def _note_rate(self, stored: int) -> None:
        now = time.monotonic()
        window = self._rate_window
        window.append((now, stored))
        while window and window[0][0] < now - 10:
            window.pop(0)
        span = max(now - window[0][0], 1.0)
        self.metrics.ingest_rate.set(sum(n for _, n in window) / span)

    def _write_loop(self) -> None:
        while True:
            group = self._take_group()
            self.metrics.queue_depth.set(self.queue.qsize())
            if not group:
                if self._stop.is_set():
                    return
                self._note_rate(0)
                continue
            delay = 0.5
            while True:
                try:
                    result = self.pipeline.process(group)
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
            with self._count_lock:
                self._unacked = max(self._unacked - len(group), 0)
                self.metrics.inflight.set(self._unacked)
            with self._room:
                self._held_bytes -= sum(len(m.payload) for m in group)
                self.metrics.queue_bytes.set(self._held_bytes)
                self._room.notify_all()
            self.metrics.groups.inc()
            self._note_rate(result.stored)
