"""Wire contract v1 (docs/protocol.md), the agent's side: topics and message encoding.

The cloud package implements the same contract independently; both are tested against
docs/schemas/ and the golden messages in tests/fixtures/protocol/.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable
from typing import Any, Optional

from millstream_agent.collectors.base import Sample

VERSION = 1
TOPIC_ROOT = "millstream/v1"
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
METRIC_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,127}$")
log = logging.getLogger("millstream.protocol")
CHANNELS = ("telemetry", "status", "config/desired", "config/reported")
STATUS_CONNECTED = "connected"
STATUS_SHUTDOWN = "shutdown"
STATUS_CONNECTION_LOST = "connection-lost"


def topic(site: str, device: str, channel: str) -> str:
    """``millstream/v1/<site>/<device>/<channel>``."""
    return f"{TOPIC_ROOT}/{site}/{device}/{channel}"


def format_ts(ts: float) -> str:
    """Epoch seconds as RFC 3339 UTC with millisecond precision and a ``Z`` suffix."""
    ms = round(ts * 1000.0)
    secs, millis = divmod(ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{millis:03d}Z"


def reading(sample: Sample) -> dict[str, Any]:
    out: dict[str, Any] = {
        "ts": format_ts(sample.ts),
        "metric": sample.metric,
        "value": sample.value,
    }
    if sample.unit:
        out["unit"] = sample.unit
    if sample.quality != "good":
        out["quality"] = sample.quality
    return out


def encode_telemetry(
    device: str,
    seq: int,
    readings: Iterable[dict[str, Any]],
    sent_at: Optional[float] = None,
    clock_synced: bool = True,
) -> bytes:
    """A telemetry batch as JSON bytes; ``readings`` are dicts from :func:`reading`."""
    message: dict[str, Any] = {"v": VERSION, "device": device, "seq": seq}
    if sent_at is not None:
        message["sent_at"] = format_ts(sent_at)
    if not clock_synced:
        message["clock"] = "unsynced"
    message["readings"] = list(readings)
    # allow_nan=False: NaN/Infinity are not JSON; a collector must not produce them.
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode()


def reading_json(sample: Sample) -> str:
    """One reading as compact JSON text, the unit the store-and-forward queue keeps."""
    return json.dumps(reading(sample), separators=(",", ":"), allow_nan=False)


_GOOD_METRICS: set = set()
_WARNED: set = set()
QUALITIES = ("good", "uncertain", "bad")


def _refuse(key: str, why: str) -> None:
    if key not in _WARNED and len(_WARNED) < 1000:
        _WARNED.add(key)
        log.warning("reading dropped: %s (logged once)", why)


def readings_json(samples: Iterable[Sample]) -> list:
    """JSON texts of readings from one collection: the fast path for many devices.

    Readings the contract would reject are dropped here, with one warning per metric,
    instead of making the cloud reject whole batches: non-finite values (JSON has no NaN),
    metric names not matching :data:`METRIC_PATTERN`, unknown quality. A unit longer than
    32 characters is left out. The timestamp is formatted once per distinct ``ts``.
    """
    out = []
    last_ts: Optional[float] = None
    ts_text = ""
    for s in samples:
        metric = s.metric
        if metric not in _GOOD_METRICS:
            if not isinstance(metric, str) or not METRIC_PATTERN.match(metric):
                _refuse(
                    f"m:{metric!r}",
                    f"metric name {metric!r} does not match {METRIC_PATTERN.pattern}",
                )
                continue
            _GOOD_METRICS.add(metric)
        value = s.value
        if isinstance(value, bool):
            text = "true" if value else "false"
        else:
            if not isinstance(value, (int, float)):
                _refuse(f"v:{metric}", f"{metric}: value {value!r} is not a number")
                continue
            if value != value or value in (float("inf"), float("-inf")):
                continue
            text = repr(float(value)) if isinstance(value, float) else str(int(value))
        if s.ts != last_ts:
            last_ts, ts_text = s.ts, format_ts(s.ts)
        item = f'{{"ts":"{ts_text}","metric":"{metric}","value":{text}'
        if s.unit and len(s.unit) <= 32:
            item += ',"unit":' + json.dumps(s.unit)
        if s.quality != "good":
            if s.quality not in QUALITIES:
                _refuse(f"q:{metric}", f"{metric}: quality {s.quality!r} is not one of {QUALITIES}")
                continue
            item += f',"quality":"{s.quality}"'
        out.append(item + "}")
    return out


def encode_telemetry_raw(
    device: str,
    seq: int,
    readings_json: str,
    sent_at: Optional[float] = None,
    clock_synced: bool = True,
) -> bytes:
    """Like :func:`encode_telemetry`, with the readings already a JSON array text.

    The queue stores readings as JSON; splicing the array in avoids decoding and
    re-encoding every reading on the way out (the simulator sends 10,000 a second).
    """
    head = f'{{"v":{VERSION},"device":{json.dumps(device)},"seq":{int(seq)}'
    if sent_at is not None:
        head += f',"sent_at":"{format_ts(sent_at)}"'
    if not clock_synced:
        head += ',"clock":"unsynced"'
    return (head + ',"readings":' + readings_json + "}").encode()


def encode_config_reported(
    revision: int,
    status: str,
    reason: Optional[str] = None,
    config: Optional[dict[str, Any]] = None,
    ts: Optional[float] = None,
) -> bytes:
    """``config/reported``: the result of applying a ``config/desired`` revision."""
    message: dict[str, Any] = {"v": VERSION, "revision": revision, "status": status}
    if reason:
        message["reason"] = reason
    if config is not None:
        message["config"] = config
    if ts is not None:
        message["ts"] = format_ts(ts)
    return json.dumps(message, separators=(",", ":")).encode()


def encode_command_result(
    command_id: str, ok: bool, result: Any = None, error: Optional[str] = None
) -> bytes:
    """``cmd/<name>/result``: the answer to one command."""
    message: dict[str, Any] = {"v": VERSION, "id": command_id, "ok": ok}
    if result is not None:
        message["result"] = result
    if error:
        message["error"] = error
    return json.dumps(message, separators=(",", ":")).encode()


def encode_status(
    device: str,
    state: str,
    reason: str,
    ts: Optional[float] = None,
    agent_version: Optional[str] = None,
    kind: Optional[str] = None,
) -> bytes:
    """A retained status message: birth (online/connected) or will (offline/...)."""
    message: dict[str, Any] = {"v": VERSION, "device": device, "state": state, "reason": reason}
    if ts is not None:
        message["ts"] = format_ts(ts)
    if agent_version:
        message["agent_version"] = agent_version
    if kind:
        message["kind"] = kind
    return json.dumps(message, separators=(",", ":")).encode()
