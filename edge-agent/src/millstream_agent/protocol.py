"""Wire contract v1 (docs/protocol.md), the agent's side: topics and message encoding.

The cloud package implements the same contract independently; both are tested against
docs/schemas/ and the golden messages in tests/fixtures/protocol/.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, Dict, Iterable, Optional

from millstream_agent.collectors.base import Sample

VERSION = 1
TOPIC_ROOT = "millstream/v1"
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
METRIC_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,127}$")
CHANNELS = ("telemetry", "status", "config/desired", "config/reported")


def topic(site: str, device: str, channel: str) -> str:
    """``millstream/v1/<site>/<device>/<channel>``."""
    return f"{TOPIC_ROOT}/{site}/{device}/{channel}"


def format_ts(ts: float) -> str:
    """Epoch seconds as RFC 3339 UTC with millisecond precision and a ``Z`` suffix."""
    ms = round(ts * 1000.0)
    secs, millis = divmod(ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{millis:03d}Z"


def reading(sample: Sample) -> Dict[str, Any]:
    out: Dict[str, Any] = {
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
    readings: Iterable[Dict[str, Any]],
    sent_at: Optional[float] = None,
    clock_synced: bool = True,
) -> bytes:
    """A telemetry batch as JSON bytes; ``readings`` are dicts from :func:`reading`."""
    message: Dict[str, Any] = {"v": VERSION, "device": device, "seq": seq}
    if sent_at is not None:
        message["sent_at"] = format_ts(sent_at)
    if not clock_synced:
        message["clock"] = "unsynced"
    message["readings"] = list(readings)
    # allow_nan=False: NaN/Infinity are not JSON; a collector must not produce them.
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode()


def encode_status(
    device: str,
    state: str,
    reason: str,
    ts: Optional[float] = None,
    agent_version: Optional[str] = None,
    kind: Optional[str] = None,
) -> bytes:
    """A retained status message: birth (online/connected) or will (offline/...)."""
    message: Dict[str, Any] = {"v": VERSION, "device": device, "state": state, "reason": reason}
    if ts is not None:
        message["ts"] = format_ts(ts)
    if agent_version:
        message["agent_version"] = agent_version
    if kind:
        message["kind"] = kind
    return json.dumps(message, separators=(",", ":")).encode()
