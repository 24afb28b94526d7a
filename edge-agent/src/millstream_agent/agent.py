"""``millstream-agent run``: collectors → disk queue → MQTT, for one device.

Threads: collectors run on their own thread and only ever write to the disk queue, so a
slow broker, a TLS handshake or a reconnect never delays a reading. Everything MQTT
(session, remote config, commands, self-monitoring) runs on the event loop in the main
thread. The queue (SQLite, WAL) is the only thing they share.
"""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

from millstream_agent import __version__, protocol
from millstream_agent.clock import ClockWatch
from millstream_agent.collectors import CollectorError, collector_class
from millstream_agent.collectors.base import Collector, Sample
from millstream_agent.config import AgentConfig, resolve_queue_path
from millstream_agent.loop import EventLoop, Timer
from millstream_agent.queue import SqliteQueue
from millstream_agent.remote import Remote, RemoteState
from millstream_agent.session import DeviceSession, MqttSettings
from millstream_agent.systemd import SystemdNotifier

log = logging.getLogger("millstream.agent")

DRAIN_ON_EXIT = 5.0  # seconds to wait for PUBACKs at shutdown; the rest stays queued
# A collector read this long (and three of its intervals) without returning is stuck:
# the built-in ones time out far sooner (Modbus, OPC UA), so it is a hang, and under
# systemd's watchdog the agent stops answering it and is restarted.
STUCK_AFTER = 60.0
# How often systemd hears the status line when no watchdog asks for more.
STATUS_EVERY = 10.0


@dataclass
class _Entry:
    block: dict[str, Any]
    collector: Optional[Collector]
    due: float
    failures: int = 0


class CollectorRunner:
    """Runs the enabled collectors on one thread, each at its interval, into the queue."""

    def __init__(self, queue: SqliteQueue, clock: ClockWatch, on_data: Any) -> None:
        self.queue = queue
        self.clock = clock
        self.on_data = on_data
        self._entries: dict[str, _Entry] = {}
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="collectors", daemon=True)
        self.collected = 0
        self.write_errors = 0
        # The collector being read and since when (monotonic): a read that never returns
        # holds every collector, which the watchdog reports (``stuck``).
        self._busy: Optional[tuple[str, float, float]] = None

    def configure(self, blocks: list[dict[str, Any]]) -> None:
        """Replace the collector set; unchanged blocks keep running undisturbed."""
        with self._cond:
            wanted = {b["name"]: b for b in blocks if b.get("enabled", True)}
            for name in list(self._entries):
                entry = self._entries[name]
                if name not in wanted or wanted[name] != entry.block:
                    self._close(entry)
                    del self._entries[name]
            for name, block in wanted.items():
                if name not in self._entries:
                    self._entries[name] = _Entry(block, self._open(block), time.monotonic())
            self._cond.notify_all()

    def restart(self, name: str) -> bool:
        with self._cond:
            entry = self._entries.get(name)
            if entry is None:
                return False
            self._close(entry)
            entry.collector = self._open(entry.block)
            entry.failures = 0
            entry.due = time.monotonic()
            self._cond.notify_all()
            return True

    @property
    def names(self) -> list[str]:
        with self._cond:
            return sorted(self._entries)

    def _open(self, block: dict[str, Any]) -> Optional[Collector]:
        try:
            collector = collector_class(block["type"])(block["name"], dict(block["options"]))
            collector.start()
            log.info(
                "collector %s (%s) started, every %gs",
                block["name"],
                block["type"],
                block["interval"],
            )
            return collector
        except Exception as exc:
            log.error("collector %s (%s) could not start: %s", block["name"], block["type"], exc)
            return None

    @staticmethod
    def _close(entry: _Entry) -> None:
        if entry.collector is not None:
            try:
                entry.collector.close()
            except Exception:
                log.exception("collector %s close failed", entry.block["name"])
            entry.collector = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=10)
        with self._cond:
            for entry in self._entries.values():
                self._close(entry)

    def stuck(self, now: float) -> Optional[str]:
        """Why the collectors no longer run, or None: the thread died, or one read has
        taken longer than STUCK_AFTER (and three of its intervals)."""
        if self._thread.ident is not None and not self._thread.is_alive() and not self._stop:
            return "the collector thread has died"
        busy = self._busy
        if busy is not None:
            name, since, interval = busy
            if now - since > max(STUCK_AFTER, 3 * interval):
                return f"collector {name} has not returned for {now - since:.0f} s"
        return None

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stop:
                    return
                now = time.monotonic()
                due = [e for e in self._entries.values() if e.due <= now]
                if not due:
                    wait = min((e.due for e in self._entries.values()), default=now + 1.0) - now
                    self._cond.wait(timeout=max(0.001, min(wait, 1.0)))
                    continue
                work: list[tuple[_Entry, Optional[Collector]]] = []
                for entry in due:
                    interval = float(entry.block["interval"])
                    entry.due += interval
                    if entry.due < now - interval:
                        entry.due = now + interval  # fell behind: skip, do not burst
                    if entry.collector is None:
                        entry.collector = self._open(entry.block)
                    work.append((entry, entry.collector))
            samples: list[Sample] = []
            for entry, collector in work:
                if collector is None:
                    continue
                name = entry.block["name"]
                self._busy = (name, time.monotonic(), float(entry.block["interval"]))
                try:
                    samples.extend(collector.collect(time.time()))
                    if entry.failures:
                        log.info("collector %s recovered", name)
                    entry.failures = 0
                except CollectorError as exc:
                    entry.failures += 1
                    if entry.failures <= 3 or entry.failures % 60 == 0:
                        log.warning(
                            "collector %s: %s (failure %d)",
                            name,
                            exc,
                            entry.failures,
                        )
                except Exception:
                    entry.failures += 1
                    if entry.failures <= 3 or entry.failures % 60 == 0:
                        log.exception("collector %s failed", name)
                finally:
                    self._busy = None
            if samples:
                texts = protocol.readings_json(samples)
                if texts:
                    try:
                        self.queue.append(texts, clock_ok=self.clock.synced())
                    except sqlite3.Error as exc:
                        # disk full, I/O error: count the loss, keep the thread alive
                        self.queue.count_lost(len(texts))
                        self.write_errors += 1
                        if self.write_errors <= 3 or self.write_errors % 60 == 0:
                            log.error(
                                "queue %s: cannot store %d readings: %s (%d lost so far)",
                                self.queue.path,
                                len(texts),
                                exc,
                                self.queue.dropped,
                            )
                        continue
                    self.write_errors = 0
                    self.collected += len(texts)
                    self.on_data()


def open_queue(path: str, **kwargs: Any) -> SqliteQueue:
    """Open the queue; a file SQLite cannot read (e.g. after a power cut with fsync off,
    or a failing SD card) is moved aside and a new queue started, instead of failing every
    restart forever."""
    try:
        return SqliteQueue(path, **kwargs)
    except sqlite3.DatabaseError as exc:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        log.error(
            "queue %s is unreadable (%s); moving it to %s.corrupt-%s and starting a new one",
            path,
            exc,
            path,
            stamp,
        )
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.replace(path + suffix, f"{path}.corrupt-{stamp}{suffix}")
        return SqliteQueue(path, **kwargs)


def _rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except Exception:
        return None


def mqtt_settings(config: AgentConfig) -> MqttSettings:
    mq, q = config["mqtt"], config["queue"]
    return MqttSettings(
        broker=mq["broker"],
        client_id=mq["client_id"],
        username=mq["username"],
        password=mq["password"],
        tls_ca=mq["tls"]["ca"],
        tls_cert=mq["tls"]["cert"],
        tls_key=mq["tls"]["key"],
        tls_server_hostname=mq["tls"]["server_hostname"],
        keepalive=round(mq["keepalive"]),
        qos=mq["qos"],
        max_inflight=mq["max_inflight"],
        connect_timeout=mq["connect_timeout"],
        reconnect_min=mq["reconnect_min"],
        reconnect_max=mq["reconnect_max"],
        refused_retry=mq["refused_retry"],
        replay_rate=float(q["replay_rate"]),
    )


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.file_config = config
        dev = config["device"]
        self.device, self.site = dev["id"], dev["site"]
        qcfg = config["queue"]
        self.queue_path = resolve_queue_path(config)
        self.queue = open_queue(
            self.queue_path,
            max_bytes=qcfg["max_bytes"],
            max_age=qcfg["max_age"],
            fsync=qcfg["fsync"],
        )
        self.loop = EventLoop()
        self.clock = ClockWatch(config["clock"]["min_year"], config["clock"]["settle"])
        state_path = config["remote"]["state"] or os.path.join(
            os.path.dirname(os.path.abspath(self.queue_path)), "remote-config.json"
        )
        self.remote = Remote(
            config,
            RemoteState(state_path),
            self.apply,
            self._publish_control,
            {
                "ping": self._cmd_ping,
                "restart-collector": self._cmd_restart,
                "flush": self._cmd_flush,
            },
        )
        self.config = self.remote.restore()
        self.session = DeviceSession(
            self.loop,
            self.device,
            self.site,
            mqtt_settings(config),
            self.queue,
            max_readings=self.config["batch"]["max_readings"],
            max_delay=self.config["batch"]["max_delay"],
            kind=dev["kind"],
            on_message=self.remote.on_message if config["remote"]["enabled"] else None,
        )
        self.runner = CollectorRunner(self.queue, self.clock, self._wake)
        self.started = time.time()
        self._monitor_timer: Optional[Timer] = None
        self._stop_requested = False
        self.systemd = SystemdNotifier()
        self._stuck: Optional[str] = None
        self._watchdog_timer: Optional[Timer] = None

    # wiring -----------------------------------------------------------------
    def _wake(self) -> None:
        self.loop.call_soon_threadsafe(self.session.pump)

    def _publish_control(self, channel: str, payload: bytes, retain: bool) -> None:
        self.session.publish_control(channel, payload, retain)

    def apply(self, config: AgentConfig) -> None:
        """Apply the remotely changeable sections (batch, collectors, self_monitoring)."""
        self.config = config
        self.session.max_readings = config["batch"]["max_readings"]
        self.session.max_delay = config["batch"]["max_delay"]
        self.runner.configure(config["collectors"])
        self._schedule_monitor()

    # commands ---------------------------------------------------------------
    def _cmd_ping(self, args: dict[str, Any]) -> tuple[bool, Any]:
        stats = self.queue.stats()
        return True, {
            "pong": True,
            "agent_version": __version__,
            "ts": protocol.format_ts(time.time()),
            "uptime": round(time.time() - self.started, 3),
            "queue_depth": stats.depth,
            "config_revision": self.remote.revision,
        }

    def _cmd_restart(self, args: dict[str, Any]) -> tuple[bool, Any]:
        name = args.get("name")
        if not isinstance(name, str):
            return (
                False,
                f"args.name: expected a collector name, one of: {', '.join(self.runner.names)}",
            )
        if not self.runner.restart(name):
            return False, f"no collector named {name!r}; running: {', '.join(self.runner.names)}"
        return True, {"restarted": name}

    def _cmd_flush(self, args: dict[str, Any]) -> tuple[bool, Any]:
        pending = self.queue.pending
        self.session.pump(force_seal=True)
        return True, {
            "sealed_readings": pending - self.queue.pending,
            "queue_depth": self.queue.stats().depth,
        }

    # self-monitoring ---------------------------------------------------------
    def _schedule_monitor(self) -> None:
        if self._monitor_timer is not None:
            self._monitor_timer.cancel()
            self._monitor_timer = None
        sm = self.config["self_monitoring"]
        if sm["enabled"]:
            self._monitor_timer = self.loop.call_later(sm["interval"], self._monitor)

    def _monitor(self) -> None:
        self._monitor_timer = None
        now = time.time()
        stats = self.queue.stats()
        values: list[tuple[str, float, Optional[str]]] = [
            ("agent.queue_depth", stats.depth, None),
            ("agent.queue_oldest_age", round(stats.oldest_age, 3), "s"),
            ("agent.dropped", stats.dropped, None),
            ("agent.reconnects", self.session.reconnects, None),
            ("agent.connected", 1 if self.session.connected else 0, None),
        ]
        latency = self.session.take_latency()
        if latency is not None:
            values.append(("agent.publish_latency", round(latency * 1000.0, 3), "ms"))
        rss = _rss_bytes()
        if rss is not None:
            values.append(("agent.rss", rss, "B"))
        samples = [Sample(now, name, float(v), unit) for name, v, unit in values]
        self.queue.append(protocol.readings_json(samples), clock_ok=self.clock.synced())
        self.session.pump()
        self._schedule_monitor()

    # systemd -------------------------------------------------------------------
    def status_line(self) -> str:
        """One line for ``systemctl status``: the link, then what is queued."""
        s = self.session
        stats = self.queue.stats()
        if s.connected:
            link = f"connected to {s.settings.broker}"
        else:
            link = f"not connected to {s.settings.broker}"
            if s.last_error:
                link += f" ({s.last_error})"
        queued = f"{stats.depth} readings queued"
        if stats.depth:
            queued += f", oldest {stats.oldest_age:.0f} s"
        line = f"{link}; {queued}; {s.acknowledged} sent since start"
        if stats.dropped:
            line += f"; {stats.dropped} dropped in total"
        return f"{self._stuck}; {line}" if self._stuck else line

    def _watchdog(self) -> None:
        """Tell systemd the agent is alive, and how it is, while both its threads work:
        this runs on the event loop, so a hung loop stops it too; a hung collector
        (``CollectorRunner.stuck``) withholds it. Either way systemd restarts the agent."""
        stuck = self.runner.stuck(time.monotonic())
        if stuck and stuck != self._stuck:
            log.error("%s: no longer telling systemd's watchdog the agent is alive", stuck)
        self._stuck = stuck
        fields = {"STATUS": self.status_line()}
        if self.systemd.watchdog_s and not stuck:
            fields["WATCHDOG"] = "1"
        self.systemd.notify(fields)
        every = min(STATUS_EVERY, self.systemd.watchdog_s / 2) if self.systemd.watchdog_s else None
        self._watchdog_timer = self.loop.call_later(every or STATUS_EVERY, self._watchdog)

    # running -----------------------------------------------------------------
    def request_stop(self, *_: Any) -> None:
        self._stop_requested = True
        self.loop.stop()

    def run(self) -> int:
        log.info(
            "millstream-agent %s: device=%s site=%s broker=%s queue=%s (%d readings buffered)",
            __version__,
            self.device,
            self.site,
            self.session.settings.broker,
            self.queue_path,
            self.queue.stats().depth,
        )
        old = {s: signal.signal(s, self.request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.runner.configure(self.config["collectors"])
            self.runner.start()
            self.session.start()

            def tick() -> None:
                self.session.tick()
                timers[0] = self.loop.call_later(1.0, tick)

            def enforce() -> None:
                self.queue.enforce()
                timers[1] = self.loop.call_later(60.0, enforce)

            timers = [self.loop.call_later(1.0, tick), self.loop.call_later(60.0, enforce)]
            self._schedule_monitor()
            if self.systemd.enabled:
                self.systemd.notify({"READY": "1", "STATUS": self.status_line()})
                self._watchdog_timer = self.loop.call_later(0.0, self._watchdog)
            self.loop.run(until=lambda: self._stop_requested)
            log.info("stopping: collectors, then up to %gs for outstanding PUBACKs", DRAIN_ON_EXIT)
            self.systemd.notify(
                {"STOPPING": "1", "STATUS": f"stopping: up to {DRAIN_ON_EXIT:g} s for PUBACKs"}
            )
            if self._watchdog_timer is not None:
                self._watchdog_timer.cancel()
            self.runner.stop()
            for t in timers:
                t.cancel()
            if self._monitor_timer is not None:
                self._monitor_timer.cancel()
            if self.session.connected:
                self.session.drain()
                deadline = time.monotonic() + DRAIN_ON_EXIT
                self._stop_requested = False
                self.loop.run(
                    until=lambda: (
                        self._stop_requested
                        or self.session.drained
                        or not self.session.connected
                        or time.monotonic() > deadline
                    )
                )
                self.session.say_goodbye()
                deadline = time.monotonic() + 2.0
                self.loop.run(
                    until=lambda: self.session.goodbye_done or time.monotonic() > deadline
                )
            self.session.close()
            stats = self.queue.stats()
            log.info(
                "stopped: collected %d readings in this run, %d stay queued for the next start, "
                "%d dropped in total",
                self.runner.collected,
                stats.depth,
                stats.dropped,
            )
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            self.queue.close()
            self.loop.close()
            self.systemd.close()
        return 0


def run_agent(config: AgentConfig) -> int:
    level = config["log"]["level"].upper()
    logging.getLogger().setLevel(getattr(logging, level, logging.INFO))
    try:
        agent = Agent(config)
    except Exception as exc:
        log.error("cannot start: %s", exc)
        return 1
    return agent.run()
