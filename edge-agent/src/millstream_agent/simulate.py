"""``millstream-agent simulate``: many simulated devices in one process.

Every device is a full agent minus the disk: its own MQTT session (client id
``millstream-<device>``, its own last will), its own in-memory store-and-forward queue
(or an on-disk one with ``--queue-dir``) and its own simulated machine. All sessions run
on one :class:`~millstream_agent.loop.EventLoop` (epoll), so a thousand devices need a
thousand sockets and one thread; the open-file limit is raised at start.

On exit (``--duration`` elapsed, SIGINT or SIGTERM) it stops generating, sends what is
queued, waits up to ``--drain-timeout`` seconds for the PUBACKs, publishes each device's
offline/shutdown status and prints, as its last stdout line,
``{"generated": N, "published": N, "acknowledged": N}`` counted in readings.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

from millstream_agent import protocol
from millstream_agent.collectors import collector_class
from millstream_agent.collectors.base import Collector
from millstream_agent.loop import EventLoop, raise_nofile_limit
from millstream_agent.queue import BaseQueue, MemoryQueue, SqliteQueue
from millstream_agent.session import DeviceSession, MqttSettings

log = logging.getLogger("millstream.simulate")

DRAIN_GRACE = 3.0  # seconds a disconnected device may take to reconnect while draining


@dataclass
class SimOptions:
    devices: int = 1
    rate: float = 1.0
    metrics: int = 10
    duration: float = 0.0
    broker: str = "mqtt://127.0.0.1:1883"
    site: str = "sim"
    prefix: Optional[str] = None
    kind: str = "motor"
    seed: int = 1
    queue_dir: Optional[str] = None
    queue_max_bytes: int = 8_000_000
    batch_size: int = 100
    batch_delay: float = 1.0
    max_inflight: int = 20
    drain_timeout: float = 30.0
    connect_spread: float = 1.0
    reconnect_max: float = 10.0
    username: Optional[str] = None
    password: Optional[str] = None
    ca: Optional[str] = None
    cert: Optional[str] = None
    key: Optional[str] = None
    server_hostname: Optional[str] = None
    faults: Optional[str] = None  # auto | none; None = the collector's default
    fault_rate: Optional[float] = None
    fault_types: Optional[list[str]] = None  # None = the collector's default (all types)
    fault_start_after: Optional[str] = None  # e.g. "150s"; None = the collector's, 5m
    ground_truth: Optional[str] = None
    # Seconds of each machine's healthy past sent before its live readings, one reading
    # every ``history_step`` seconds (back-dated, as an agent replays a backlog), so the
    # cloud's detectors have learned the fleet before its first fault. 0: none.
    history: float = 0.0
    history_step: float = 10.0
    # ... sent at most this many readings a second over the whole fleet (each device its
    # share, and at least twice its live rate): a cloud's detectors, young and sharing one
    # interpreter with its ingest, scored 3,000-4,000 a second on a 2-core machine (at
    # 5,000 the demo's were 155,000 of their queue's 200,000 behind); past that bound they
    # read the rest back from the store later, so the live faults would wait for it.
    history_rate: float = 4000.0


def default_prefix(site: str) -> str:
    """Device ids are unique across sites: ``sim-0001`` on site ``sim``, else ``<site>-0001``."""
    return "sim" if site == "sim" else site


class SimDevice:
    def __init__(
        self, loop: EventLoop, device: str, opts: SimOptions, settings: MqttSettings, seed: int
    ) -> None:
        self.loop = loop
        self.device = device
        self.generated = 0
        options: dict = {"kind": opts.kind, "metrics": opts.metrics, "seed": seed, "device": device}
        if opts.faults is not None:
            options["faults"] = opts.faults
        if opts.fault_rate is not None:
            options["fault_rate_per_hour"] = opts.fault_rate
        if opts.fault_types:
            options["fault_types"] = [t.strip() for t in opts.fault_types if t.strip()]
        if opts.fault_start_after is not None:
            options["fault_start_after"] = opts.fault_start_after
        if opts.ground_truth:
            options["ground_truth"] = opts.ground_truth
        cls = collector_class("simulated")
        spec = getattr(cls, "options_spec", {}) or {}
        options = {k: v for k, v in options.items() if k in spec or not spec}
        self.collector: Collector = cls("machine", options)
        self.collector.start()
        self.queue: BaseQueue
        if opts.queue_dir:
            self.queue = SqliteQueue(
                os.path.join(opts.queue_dir, f"{device}.db"),
                max_bytes=_queue_bound(opts),
                fsync="normal",
            )
        else:
            self.queue = MemoryQueue(max_bytes=_queue_bound(opts))
        self.session = DeviceSession(
            loop,
            device,
            opts.site,
            settings,
            self.queue,
            max_readings=opts.batch_size,
            max_delay=opts.batch_delay,
            kind=opts.kind,
        )
        self.period = 1.0 / opts.rate if opts.rate > 0 else 0.0
        self.history = 0  # collections of the machine's past queued (send_history)
        self.running = False
        self._next = 0.0
        self._timer: Any = None

    def send_history(self, seconds: float, step: float, until: float) -> None:
        """Queue the machine's healthy past, from ``until - seconds`` up to ``until``."""
        collector = self.collector
        past = getattr(collector, "past", None)
        if past is None or seconds <= 0 or step <= 0:
            return
        steps = int(seconds / step)
        for k in range(steps):
            texts = protocol.readings_json(past(until - (steps - k) * step))
            self.queue.append(texts)
            self.generated += len(texts)
        self.history = steps

    def start_generating(self, offset: float) -> None:
        if self.period <= 0:
            return
        self.running = True
        self._next = time.monotonic() + offset
        self._timer = self.loop.call_at(self._next, self._generate)

    def _generate(self) -> None:
        if not self.running:
            return
        samples = self.collector.collect(time.time())
        if samples:
            texts = protocol.readings_json(samples)
            self.queue.append(texts)
            self.generated += len(texts)
            self.session.pump()
        self._next += self.period
        now = time.monotonic()
        if self._next < now - 5 * self.period:
            self._next = now  # fell far behind (suspended?): do not burst to catch up
        self._timer = self.loop.call_at(self._next, self._generate)

    def stop_generating(self) -> None:
        self.running = False
        if self._timer is not None:
            self._timer.cancel()

    def close(self) -> None:
        self.collector.close()
        self.queue.close()


def run(opts: SimOptions, out: Any = None) -> int:
    out = out or sys.stdout
    soft, _hard = raise_nofile_limit(opts.devices * 2 + 256)
    if soft and soft < opts.devices + 64:
        log.warning("open-file limit %d is too low for %d devices", soft, opts.devices)
    if opts.queue_dir:
        os.makedirs(opts.queue_dir, exist_ok=True)
    prefix = opts.prefix or default_prefix(opts.site)
    settings = MqttSettings(
        broker=opts.broker,
        username=opts.username,
        password=opts.password,
        tls_ca=opts.ca,
        tls_cert=opts.cert,
        tls_key=opts.key,
        tls_server_hostname=opts.server_hostname,
        max_inflight=opts.max_inflight,
        reconnect_max=opts.reconnect_max,
        refused_retry=max(opts.reconnect_max, 10.0),
        replay_rate=_history_pace(opts),
    )
    loop = EventLoop()
    rng = random.Random(opts.seed)
    devices: list[SimDevice] = []
    for i in range(opts.devices):
        device_id = f"{prefix}-{i + 1:04d}"
        if not protocol.ID_PATTERN.match(device_id):
            log.error(
                "device id %r is not valid (pattern %s)", device_id, protocol.ID_PATTERN.pattern
            )
            return 2
        try:
            devices.append(SimDevice(loop, device_id, opts, settings, opts.seed))
        except ValueError as exc:  # the collector refused an option (--kind, --metrics, ...)
            log.error("simulated collector: %s", exc)
            return 2

    stop = {"requested": False}

    def on_signal(signum: int, frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        stop["requested"] = True
        loop.stop()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    started = time.monotonic()
    try:
        if opts.history > 0:
            now = time.time()
            for dev in devices:
                dev.send_history(opts.history, opts.history_step, now)
            log.info(
                "queued %gh of healthy history per device (a reading every %g s): %d readings",
                opts.history / 3600,
                opts.history_step,
                sum(d.generated for d in devices),
            )
        spread = opts.connect_spread if opts.devices > 1 else 0.0
        for i, dev in enumerate(devices):
            dev.session.start(spread * i / max(1, opts.devices))
            dev.start_generating(rng.uniform(0, dev.period) if dev.period else 0.0)

        def tick() -> None:
            for dev in devices:
                dev.session.tick()
            ticker[0] = loop.call_later(1.0, tick)

        ticker = [loop.call_later(1.0, tick)]
        report = [time.monotonic()]

        def done() -> bool:
            now = time.monotonic()
            if now - report[0] >= 10.0:
                report[0] = now
                _log_progress(devices)
            return stop["requested"] or (opts.duration > 0 and now - started >= opts.duration)

        log.info(
            "simulating %d devices (%s-0001..), %d metrics at %g Hz, broker %s",
            opts.devices,
            prefix,
            opts.metrics,
            opts.rate,
            opts.broker,
        )
        loop.run(until=done)
        for dev in devices:
            dev.stop_generating()
            dev.session.drain()
        drain_start = time.monotonic()
        deadline = drain_start + opts.drain_timeout

        def settled(dev: SimDevice) -> bool:
            # a device whose broker is gone cannot get PUBACKs: after a short grace for a
            # reconnect, do not hold the exit for it (the counts show what is missing)
            return dev.session.drained or (
                not dev.session.connected and time.monotonic() - drain_start > DRAIN_GRACE
            )

        stop["requested"] = False
        loop.run(
            until=lambda: (
                stop["requested"] or time.monotonic() > deadline or all(settled(d) for d in devices)
            )
        )
        for dev in devices:
            dev.session.say_goodbye()
        deadline = time.monotonic() + 5.0
        loop.run(
            until=lambda: (
                time.monotonic() > deadline or all(d.session.goodbye_done for d in devices)
            )
        )
        ticker[0].cancel()
        for dev in devices:
            dev.session.close()
        loop.run(timeout=0.1)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    counts = {
        "generated": sum(d.generated for d in devices),
        "published": sum(d.session.published for d in devices),
        "acknowledged": sum(d.session.acknowledged for d in devices),
    }
    dropped = sum(d.queue.dropped for d in devices)
    if dropped:
        log.warning("%d readings were dropped by the queue bound (--queue-max-bytes)", dropped)
    left = sum(d.queue.stats().depth for d in devices)
    if left:
        log.warning("%d readings were not acknowledged before exit", left)
    for dev in devices:
        dev.close()
    loop.close()
    out.write(json.dumps(counts) + "\n")
    out.flush()
    return 0


def _queue_bound(opts: SimOptions) -> int:
    """A device's queue bound: ``queue_max_bytes``, raised to hold its whole past (about
    100 bytes a reading, counted at 160 with the queue's overhead) so none is dropped."""
    past = int(opts.history / opts.history_step) * opts.metrics if opts.history > 0 else 0
    return max(opts.queue_max_bytes, 160 * past)


def _history_pace(opts: SimOptions) -> float:
    """Readings a second each device may send (0: no limit): its share of
    ``history_rate`` while it has a past to send, never below twice its live rate."""
    if opts.history <= 0 or opts.history_rate <= 0:
        return 0.0
    return max(opts.history_rate / opts.devices, 2.0 * opts.rate * opts.metrics)


def _log_progress(devices: list[SimDevice]) -> None:
    connected = sum(1 for d in devices if d.session.connected)
    log.info(
        "devices connected %d/%d, generated %d, published %d, acknowledged %d",
        connected,
        len(devices),
        sum(d.generated for d in devices),
        sum(d.session.published for d in devices),
        sum(d.session.acknowledged for d in devices),
    )
