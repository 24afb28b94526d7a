"""One device's MQTT session, driven by an :class:`~millstream_agent.loop.EventLoop`.

It owns the paho client (MQTT 3.1.1, ``clean_session=False`` so the broker keeps the
subscriptions and the QoS 1 commands sent while the device was away), the retained birth
and last-will messages, reconnects with exponential backoff and jitter (slowly when the
broker *refuses* us: bad credentials or not authorised, so a misconfigured device does not
hammer the broker), and the publish window over the store-and-forward queue.

Delivery: messages are sent from the queue in sequence order, at most ``max_inflight``
awaiting PUBACK at a time, paced by a token bucket of ``replay_rate`` readings per second.
A message leaves the queue only on its PUBACK. On a lost connection paho's own copies are
dropped and everything unacknowledged is resent from the queue after reconnecting, with
its original sequence number; the sequence order on the wire is therefore always the
order of the readings.
"""

from __future__ import annotations

import contextlib
import logging
import random
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from millstream_agent import __version__, protocol
from millstream_agent.loop import EventLoop, Timer
from millstream_agent.queue import BaseQueue

log = logging.getLogger("millstream.mqtt")


class BrokerURLError(ValueError):
    pass


def parse_broker_url(url: str) -> tuple[str, str, int]:
    """``mqtt://host[:1883]`` or ``mqtts://host[:8883]`` → (scheme, host, port)."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise BrokerURLError(f"expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT], got {url!r}")
    try:
        port = parts.port
    except ValueError as exc:
        raise BrokerURLError(f"bad port in {url!r}") from exc
    return parts.scheme, parts.hostname, port or (8883 if parts.scheme == "mqtts" else 1883)


@dataclass
class MqttSettings:
    broker: str = "mqtt://127.0.0.1:1883"
    client_id: Optional[str] = None
    username: Optional[str] = None
    password: Optional[str] = None
    tls_ca: Optional[str] = None
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    tls_server_hostname: Optional[str] = None
    keepalive: int = 30
    qos: int = 1
    max_inflight: int = 20
    connect_timeout: float = 5.0
    reconnect_min: float = 1.0
    reconnect_max: float = 30.0
    refused_retry: float = 60.0
    replay_rate: float = 5000.0  # readings/s; 0 = unlimited
    extra: dict[str, Any] = field(default_factory=dict)


class _HostnameContext(ssl.SSLContext):
    """An SSL context that checks the broker certificate against a fixed host name.

    paho passes the host it connects to as ``server_hostname``; a broker reached by IP
    address or through a tunnel often has a certificate for another name.
    """

    override: Optional[str] = None

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> Any:
        if self.override:
            kwargs["server_hostname"] = self.override
        return super().wrap_socket(sock, *args, **kwargs)


def tls_context(settings: MqttSettings) -> ssl.SSLContext:
    """TLS client context: system CAs or ``tls_ca``; a client certificate for mutual TLS."""
    ctx = _HostnameContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.tls_ca:
        ctx.load_verify_locations(cafile=settings.tls_ca)
    else:
        ctx.load_default_certs()
    if settings.tls_cert:
        ctx.load_cert_chain(settings.tls_cert, settings.tls_key or None)
    ctx.override = settings.tls_server_hostname
    return ctx


class DeviceSession:
    """The MQTT side of one device: connection, status, telemetry window, inbound messages."""

    def __init__(
        self,
        loop: EventLoop,
        device: str,
        site: str,
        settings: MqttSettings,
        queue: BaseQueue,
        max_readings: int = 100,
        max_delay: float = 1.0,
        kind: Optional[str] = None,
        on_message: Optional[Callable[[str, bytes], None]] = None,
        clock_synced: Optional[Callable[[], bool]] = None,
    ) -> None:
        self.loop = loop
        self.device = device
        self.site = site
        self.settings = settings
        self.queue = queue
        self.max_readings = max_readings
        self.max_delay = max_delay
        self.kind = kind
        self.on_message = on_message
        self._clock_synced = clock_synced
        self.scheme, self.host, self.port = parse_broker_url(settings.broker)
        self.topic_telemetry = protocol.topic(site, device, "telemetry")
        self.topic_status = protocol.topic(site, device, "status")
        self.topic_prefix = protocol.topic(site, device, "")

        self.connected = False
        self.closed = False
        self.draining = False
        self.reconnects = 0
        self.connects = 0
        self.attempts = 0
        self.published = 0  # readings, each counted once even when resent
        self.acknowledged = 0
        self.last_error: Optional[str] = None
        self._latency_sum = 0.0
        self._latency_n = 0
        self._failures = 0
        self._refused: Optional[str] = None
        self._inflight: dict[int, tuple[int, int, float]] = {}  # mid -> (seq, n, sent)
        self._acked: list[int] = []
        self._last_sent: Optional[int] = None
        self._max_sent = -1
        self._retry: Optional[Timer] = None
        self._connack_timer: Optional[Timer] = None
        self._seal_timer: Optional[Timer] = None
        self._pump_timer: Optional[Timer] = None
        self._tokens = max(float(settings.replay_rate), float(max_readings))
        self._tokens_at = time.monotonic()
        self._goodbye_mid: Optional[int] = None
        self._goodbye_acked = False
        self._control_mids: dict[int, float] = {}

        client_id = settings.client_id or f"millstream-{device}"
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
        )
        self.client.max_inflight_messages_set(0)  # the window is ours (max_inflight)
        self.client.max_queued_messages_set(0)
        self.client.connect_timeout = settings.connect_timeout
        if settings.username is not None:
            self.client.username_pw_set(settings.username, settings.password)
        if self.scheme == "mqtts" or settings.tls_ca or settings.tls_cert:
            self.client.tls_set_context(tls_context(settings))
        self.client.will_set(
            self.topic_status,
            protocol.encode_status(device, "offline", protocol.STATUS_CONNECTION_LOST, kind=kind),
            qos=1,
            retain=True,
        )
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message_cb
        self.client.on_socket_open = self._on_socket_open
        self.client.on_socket_close = self._on_socket_close
        self.client.on_socket_register_write = self._on_register_write
        self.client.on_socket_unregister_write = self._on_unregister_write
        self.client.connect_async(self.host, self.port, settings.keepalive)

    # connection -----------------------------------------------------------
    def start(self, delay: float = 0.0) -> None:
        self._retry = self.loop.call_later(delay, self._attempt)

    def _attempt(self) -> None:
        self._retry = None
        if self.closed:
            return
        self.attempts += 1
        self._refused = None
        self._cancel_connack_timer()
        try:
            self.client.reconnect()
            # a broker that accepts TCP but never answers CONNECT must not stall us forever
            wait = max(3.0, 2 * self.settings.connect_timeout)
            self._connack_timer = self.loop.call_later(wait, self._connack_overdue)
        except ssl.SSLCertVerificationError as exc:
            self._refused = (
                f"TLS: broker certificate not trusted ({exc.verify_message}); check mqtt.tls.ca"
                " and mqtt.tls.server_hostname"
            )
            self._fail(self._refused)
        except ssl.SSLError as exc:
            self._refused = f"TLS handshake failed: {exc}"
            self._fail(self._refused)
        except (OSError, ValueError) as exc:
            self._fail(f"cannot connect to {self.host}:{self.port}: {exc}")

    def _cancel_connack_timer(self) -> None:
        if self._connack_timer is not None:
            self._connack_timer.cancel()
            self._connack_timer = None

    def _connack_overdue(self) -> None:
        self._connack_timer = None
        if self.connected or self.closed or self.client.socket() is None:
            return
        self._fail(f"no CONNACK from {self.host}:{self.port} within the timeout")

    def _fail(self, why: str) -> None:
        self._close_socket_quietly()
        self._schedule_retry(why)

    def _close_socket_quietly(self) -> None:
        sock = self.client.socket()
        if sock is not None:
            self.loop.remove_socket(sock)
            with contextlib.suppress(OSError):
                sock.close()

    def _schedule_retry(self, why: str) -> None:
        if self.closed or self._retry is not None:
            return
        s = self.settings
        if self._refused:
            # Refused (credentials, authorisation, TLS trust): retrying fast cannot help.
            delay = s.refused_retry * random.uniform(0.8, 1.0)
            log.error(
                "device=%s broker=%s:%d connection refused: %s; retrying in %.0fs",
                self.device,
                self.host,
                self.port,
                self._refused,
                delay,
            )
        else:
            base = min(s.reconnect_max, s.reconnect_min * (2 ** min(self._failures, 20)))
            delay = base * random.uniform(0.5, 1.0)
            level = (
                logging.WARNING if self._failures < 3 or self._failures % 10 == 0 else logging.DEBUG
            )
            log.log(level, "device=%s %s; retrying in %.1fs", self.device, why, delay)
        self.last_error = self._refused or why
        self._failures += 1
        self._retry = self.loop.call_later(delay, self._attempt)

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        if rc.is_failure:
            hint = ""
            if str(rc) in ("Bad user name or password", "Not authorized"):
                hint = (
                    " (check mqtt.username, mqtt.password or MILLSTREAM_MQTT_PASSWORD,"
                    " and the broker ACL)"
                )
            self._refused = f"broker refused the connection: {rc}{hint}"
            return  # paho closes the socket next and calls _on_disconnect
        self.connected = True
        self.connects += 1
        self._cancel_connack_timer()
        if self.connects > 1:
            self.reconnects += 1
        self._failures = 0
        self.last_error = None
        client.drop_out_messages()
        self._inflight.clear()
        self._control_mids.clear()
        self._last_sent = None
        log.info(
            "device=%s connected to %s:%d (session present: %s)",
            self.device,
            self.host,
            self.port,
            flags.session_present,
        )
        client.publish(
            self.topic_status,
            protocol.encode_status(
                self.device,
                "online",
                protocol.STATUS_CONNECTED,
                ts=time.time(),
                agent_version=__version__,
                kind=self.kind,
            ),
            qos=1,
            retain=True,
        )
        if self.on_message is not None:
            client.subscribe(
                [(self.topic_prefix + "config/desired", 1), (self.topic_prefix + "cmd/+", 1)]
            )
        self.pump()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        was = self.connected
        self.connected = False
        self._cancel_connack_timer()
        client.drop_out_messages()
        self._inflight.clear()
        if self.closed:
            return
        if was:
            log.warning("device=%s connection lost (%s)", self.device, rc)
        self._schedule_retry(f"disconnected ({rc})")

    # sockets --------------------------------------------------------------
    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self.loop.add_socket(sock, self._on_readable, self._on_writable)

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self.loop.remove_socket(sock)

    def _on_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self.loop.set_writable(sock, True)

    def _on_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self.loop.set_writable(sock, False)

    def _on_readable(self) -> None:
        self.client.loop_read()
        sock: Any = self.client.socket()
        # TLS may hold decrypted bytes the selector cannot see
        while sock is not None and getattr(sock, "pending", None) and sock.pending():
            self.client.loop_read()
            sock = self.client.socket()
        self._after_io()

    def _on_writable(self) -> None:
        self.client.loop_write()

    def _after_io(self) -> None:
        if self._acked:
            acked, self._acked = self._acked, []
            self.queue.ack(acked)
        self.pump()

    def tick(self) -> None:
        """Call about once a second: keepalive, batching by time, acks."""
        if self.client.socket() is not None:
            self.client.loop_misc()
        self._after_io()

    # publishing -----------------------------------------------------------
    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, rc: Any, props: Any
    ) -> None:
        entry = self._inflight.pop(mid, None)
        if entry is not None:
            seq, n, sent = entry
            self._acked.append(seq)
            self.acknowledged += n
            self._latency_sum += time.monotonic() - sent
            self._latency_n += 1
        elif mid == self._goodbye_mid:
            self._goodbye_acked = True
        else:
            self._control_mids.pop(mid, None)

    def take_latency(self) -> Optional[float]:
        """Mean seconds from publish to PUBACK since the last call, or None."""
        if not self._latency_n:
            return None
        mean = self._latency_sum / self._latency_n
        self._latency_sum, self._latency_n = 0.0, 0
        return mean

    def pump(self, force_seal: bool = False) -> None:
        """Send what the window and the rate allow, sealing batches just in time."""
        if not self.connected or self.closed:
            return
        room = self.settings.max_inflight - len(self._inflight)
        if room <= 0:
            return
        msgs = self.queue.unacked(self._last_sent, room)
        if len(msgs) < room and self.queue.pending:
            sealed = self.queue.seal(
                self.max_readings,
                self.max_delay,
                force=force_seal or self.draining,
                max_messages=room - len(msgs),
            )
            if sealed:
                msgs = self.queue.unacked(self._last_sent, room)
            elif self._seal_timer is None and self.queue.pending:
                # not due yet: come back when the oldest pending reading is max_delay old
                self._seal_timer = self.loop.call_later(self.max_delay, self._seal_later)
        if not msgs:
            return
        rate = self.settings.replay_rate
        now = time.monotonic()
        if rate > 0:
            burst = max(rate, float(self.max_readings))
            self._tokens = min(burst, self._tokens + (now - self._tokens_at) * rate)
            self._tokens_at = now
        synced = True
        for m in msgs:
            if rate > 0 and self._tokens < m.n:
                if self._pump_timer is None:
                    wait = (m.n - self._tokens) / rate
                    self._pump_timer = self.loop.call_later(wait, self._pump_later)
                break
            if rate > 0:
                self._tokens -= m.n
            synced = m.clock_ok
            payload = protocol.encode_telemetry_raw(
                self.device, m.seq, m.body, sent_at=time.time(), clock_synced=synced
            )
            info = self.client.publish(self.topic_telemetry, payload, qos=self.settings.qos)
            if info.rc != mqtt.MQTT_ERR_SUCCESS and info.rc != mqtt.MQTT_ERR_NO_CONN:
                log.warning("device=%s publish failed: %s", self.device, mqtt.error_string(info.rc))
                break
            self._inflight[info.mid] = (m.seq, m.n, now)
            self._last_sent = m.seq
            if m.seq > self._max_sent:
                self._max_sent = m.seq
                self.published += m.n

    def _seal_later(self) -> None:
        self._seal_timer = None
        self.pump()

    def _pump_later(self) -> None:
        self._pump_timer = None
        self.pump()

    def publish_control(self, channel: str, payload: bytes, retain: bool = False) -> None:
        """A non-telemetry message (config/reported, cmd results) at QoS 1."""
        info = self.client.publish(self.topic_prefix + channel, payload, qos=1, retain=retain)
        self._control_mids[info.mid] = time.monotonic()

    def _on_message_cb(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if self.on_message is None or not msg.topic.startswith(self.topic_prefix):
            return
        channel = msg.topic[len(self.topic_prefix) :]
        try:
            self.on_message(channel, bytes(msg.payload))
        except Exception:
            log.exception("device=%s handling %s failed", self.device, msg.topic)

    # shutdown ---------------------------------------------------------------
    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def drain(self) -> None:
        """Stop batching by time: seal and send everything left."""
        self.draining = True
        self.pump(force_seal=True)

    @property
    def drained(self) -> bool:
        return self.queue.pending == 0 and not self._inflight and not self.queue.unacked(None, 1)

    def say_goodbye(self) -> None:
        """Publish the retained offline/shutdown status (the broker then drops the will)."""
        if not self.connected:
            self._goodbye_acked = True
            return
        info = self.client.publish(
            self.topic_status,
            protocol.encode_status(
                self.device,
                "offline",
                protocol.STATUS_SHUTDOWN,
                ts=time.time(),
                agent_version=__version__,
                kind=self.kind,
            ),
            qos=1,
            retain=True,
        )
        self._goodbye_mid = info.mid

    @property
    def goodbye_done(self) -> bool:
        return self._goodbye_acked or not self.connected

    def close(self) -> None:
        """Disconnect cleanly (no last will) and stop reconnecting."""
        self.closed = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._pump_timer is not None:
            self._pump_timer.cancel()
        self._cancel_connack_timer()
        if self._seal_timer is not None:
            self._seal_timer.cancel()
        if self.client.socket() is not None:
            try:
                self.client.disconnect()
                self.client.loop_write()
            except Exception:
                pass
            self._close_socket_quietly()
        self.connected = False
