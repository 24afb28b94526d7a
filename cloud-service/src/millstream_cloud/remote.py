"""Remote configuration and commands: the cloud's side of config/* and cmd/* (wire v1).

* Desired config: ``PUT`` stores a new revision (one more than the last, per device) and
  publishes ``{"v":1,"revision":N,"config":{...}}`` retained at QoS 1 on
  ``config/desired``, so an agent that is offline gets it when it connects.
* Reported config: the agent answers on ``config/reported``; the ingest pipeline hands
  those messages here (through the shared subscription, acked after they are recorded).
* Commands: ``cmd/<name>`` carries ``{"v":1,"id":..,"args":{..}}``; the agent answers on
  ``cmd/<name>/result``. The worker that sent a command waits for the result, so results
  are received on this service's own, non-shared subscription: every worker sees every
  result and picks its own by id.

State lives in ``remote.db`` in the data dir, shared by the workers on that data dir.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import paho.mqtt.client as mqtt

from millstream_cloud.ingest.decode import DecodeError
from millstream_cloud.ingest.subscriber import make_client, parse_broker_url
from millstream_cloud.protocol import (
    ID_PATTERN,
    WireCommandResult,
    WireConfigReported,
    parse_topic,
    topic,
)
from millstream_cloud.settings import Settings
from millstream_cloud.timeutil import rfc3339

log = logging.getLogger("millstream.remote")

RESULT_SUBSCRIPTION = "millstream/v1/+/+/cmd/+/result"

_reported_decoder = msgspec.json.Decoder(WireConfigReported)
_result_decoder = msgspec.json.Decoder(WireCommandResult)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS remote_config (
  device TEXT PRIMARY KEY,
  site TEXT NOT NULL,
  revision INTEGER NOT NULL DEFAULT 0,
  desired TEXT,
  desired_ns INTEGER,
  reported_revision INTEGER,
  reported_status TEXT,
  reported_reason TEXT,
  reported_config TEXT,
  reported_ns INTEGER
)
"""


class RemoteError(RuntimeError):
    """The broker cannot be reached now (the API answers 503)."""


class RemoteService:
    def __init__(self, settings: Settings, path: str | Path) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=60000")
        self._db.execute(_SCHEMA)
        self._waiters: dict[
            str, tuple[asyncio.AbstractEventLoop, asyncio.Future[dict[str, Any]]]
        ] = {}
        self.connected = threading.Event()
        self.client = make_client(settings.mqtt, f"{settings.mqtt.client_id}-remote")
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    # -- MQTT --

    def start(self) -> None:
        host, port, _ = parse_broker_url(self.settings.mqtt.broker)
        self.client.connect_async(host, port, keepalive=self.settings.mqtt.keepalive_s)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        with self._lock:
            self._db.close()

    def _on_connect(
        self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object
    ) -> None:
        if getattr(rc, "is_failure", False):
            log.error("remote: broker refused the connection: %s", rc)
            return
        client.subscribe(RESULT_SUBSCRIPTION, qos=1)
        self.connected.set()

    def _on_disconnect(self, *args: object) -> None:
        self.connected.clear()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        try:
            self.handle(msg.topic, msg.payload, time.time_ns())
        except DecodeError as exc:
            log.warning("remote: ignored message on %s: %s", msg.topic, exc)

    def _publish(self, topic_name: str, payload: bytes, retain: bool) -> None:
        if not self.client.is_connected():
            raise RemoteError(f"not connected to broker {self.settings.mqtt.broker}")
        info = self.client.publish(topic_name, payload, qos=1, retain=retain)
        info.wait_for_publish(timeout=10)
        if not info.is_published():
            raise RemoteError(f"broker did not acknowledge the publish on {topic_name}")

    # -- messages from devices --

    def handle(self, topic_name: str, payload: bytes, arrival_ns: int) -> None:
        """A config/reported or cmd/<name>/result message; DecodeError when invalid."""
        where = parse_topic(topic_name)
        if where is None:
            raise DecodeError("bad_topic", f"topic {topic_name!r} is not a millstream topic")
        if where.channel == "config/reported":
            try:
                rep = _reported_decoder.decode(payload)
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                raise DecodeError("schema", f"config/reported: {exc}") from None
            with self._lock:
                self._db.execute(
                    "INSERT INTO remote_config (device, site, reported_revision, reported_status, "
                    "reported_reason, reported_config, reported_ns) VALUES (?,?,?,?,?,?,?) "
                    "ON CONFLICT (device) DO UPDATE SET reported_revision = excluded.reported_revision, "
                    "reported_status = excluded.reported_status, reported_reason = excluded.reported_reason, "
                    "reported_config = excluded.reported_config, reported_ns = excluded.reported_ns",
                    (
                        where.device,
                        where.site,
                        rep.revision,
                        rep.status,
                        rep.reason,
                        json.dumps(rep.config) if rep.config is not None else None,
                        arrival_ns,
                    ),
                )
            log.info(
                "device %s reported config revision %d %s%s",
                where.device,
                rep.revision,
                rep.status,
                f" ({rep.reason})" if rep.reason else "",
            )
        elif where.channel.startswith("cmd/") and where.channel.endswith("/result"):
            try:
                res = _result_decoder.decode(payload)
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                raise DecodeError("schema", f"command result: {exc}") from None
            waiter = self._waiters.get(res.id)
            if waiter is not None:
                loop, fut = waiter
                body = {"v": 1, "id": res.id, "ok": res.ok}
                if res.result is not None:
                    body["result"] = res.result
                if res.error is not None:
                    body["error"] = res.error
                loop.call_soon_threadsafe(_resolve, fut, body)

    # -- desired config --

    def config(self, device: str) -> dict[str, Any]:
        with self._lock:
            row = self._db.execute(
                "SELECT revision, desired, desired_ns, reported_revision, reported_status, "
                "reported_reason, reported_config, reported_ns FROM remote_config WHERE device = ?",
                (device,),
            ).fetchone()
        out: dict[str, Any] = {"device": device, "desired": None, "reported": None}
        if row is None:
            return out
        if row[1] is not None:
            out["desired"] = {
                "revision": row[0],
                "config": json.loads(row[1]),
                "time": rfc3339(row[2]),
            }
        if row[3] is not None:
            rep: dict[str, Any] = {"revision": row[3], "status": row[4], "time": rfc3339(row[7])}
            if row[5] is not None:
                rep["reason"] = row[5]
            if row[6] is not None:
                rep["config"] = json.loads(row[6])
            out["reported"] = rep
            desired_rev = out["desired"]["revision"] if out["desired"] else 0
            out["in_sync"] = row[4] == "accepted" and row[3] == desired_rev
        return out

    def set_desired(self, device: str, site: str, config: dict[str, Any]) -> dict[str, Any]:
        """Store the next revision and publish it retained; the revision is kept only when
        the broker acknowledged it."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT revision FROM remote_config WHERE device = ?", (device,)
                ).fetchone()
                revision = (row[0] if row else 0) + 1
                now = time.time_ns()
                self._db.execute(
                    "INSERT INTO remote_config (device, site, revision, desired, desired_ns) "
                    "VALUES (?,?,?,?,?) ON CONFLICT (device) DO UPDATE SET site = excluded.site, "
                    "revision = excluded.revision, desired = excluded.desired, "
                    "desired_ns = excluded.desired_ns",
                    (device, site, revision, json.dumps(config), now),
                )
                payload = json.dumps(
                    {"v": 1, "revision": revision, "config": config}, separators=(",", ":")
                ).encode()
                self._publish(topic(site, device, "config/desired"), payload, retain=True)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        log.info("device %s: desired config revision %d published", device, revision)
        return self.config(device)

    # -- commands --

    async def command(
        self, device: str, site: str, name: str, args: dict[str, Any], timeout: float
    ) -> tuple[str, dict[str, Any] | None]:
        """Send ``cmd/<name>`` and wait for its result: (command id, result or None on timeout)."""
        if not ID_PATTERN.match(name):
            raise ValueError(f"command name {name!r} must match {ID_PATTERN.pattern}")
        cmd_id = uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._waiters[cmd_id] = (loop, fut)
        try:
            payload = json.dumps(
                {"v": 1, "id": cmd_id, "args": args}, separators=(",", ":")
            ).encode()
            await asyncio.to_thread(
                self._publish, topic(site, device, f"cmd/{name}"), payload, False
            )
            try:
                return cmd_id, await asyncio.wait_for(fut, timeout)
            except asyncio.TimeoutError:
                log.warning(
                    "device %s: command %s (%s) timed out after %.1fs",
                    device,
                    name,
                    cmd_id,
                    timeout,
                )
                return cmd_id, None
        finally:
            self._waiters.pop(cmd_id, None)


def _resolve(fut: asyncio.Future[dict[str, Any]], body: dict[str, Any]) -> None:
    if not fut.done():
        fut.set_result(body)
