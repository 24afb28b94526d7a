"""Maintenance windows: planned work on a machine, detected as usual and not alerted.

A machine stopped for a repair, a tool change or a cleaning sends readings that are true
and abnormal, and the detectors say so: that is right, and nobody needs to be told. A
window, set ahead or while the work goes on (as a maintenance period in Zabbix or a
downtime in Datadog), keeps its device's detectors running as usual (they follow the
machine through the stop, so they are in step when it starts again), and what they raise
in it is stored with the verdict ``expected`` instead of being handed to the alert engine.
A window is matched by the anomaly's own time, so an agent's backlog from the window,
replayed later, is treated alike. When the first reading after a window arrives, the
device's detectors are re-armed (``DetectionEngine.rearm``): what they found inside the
window and still find is reported again (a sensor left unplugged at once; an incident of
the device model once the stop's aftermath is over).

A window is the device's (``POST /api/v1/devices/{id}/detection/maintenance``) and is
kept, with the ones that ended in the last ``KEEP_ENDED_S`` (30 days), in a small JSON
file beside the detectors' state; a backtest leaves the anomalies in them out.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from millstream_cloud.model import Reading
from millstream_cloud.timeutil import rfc3339

log = logging.getLogger("millstream.maintenance")

NS = 1_000_000_000
# Ended windows are kept this long (what a backlog from the window, replayed after it,
# raises is still kept as expected, and a backtest of the last month leaves the window
# out; the API lists them), and a window may not be longer than MAX_SPAN_S: one set to
# end in 2099 by mistake would mute the device for good. A device may have
# MAX_PER_DEVICE windows that have not ended.
KEEP_ENDED_S = 30 * 86400
MAX_SPAN_S = 31 * 86400
MAX_PER_DEVICE = 100


class MaintenanceError(ValueError):
    """A window that cannot be set; ``field`` names the request field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(slots=True)
class MaintenanceWindow:
    id: str
    device: str
    site: str
    start_ns: int
    end_ns: int
    comment: str = ""
    author: str = ""
    created_ns: int = 0
    silence_id: str | None = None  # the alert silence set with it, if any
    anomalies: int = 0  # raised in it and kept as expected
    rearmed: bool = False  # the device's detectors were re-armed after it

    def state(self, now_ns: int) -> str:
        if now_ns < self.start_ns:
            return "scheduled"
        return "active" if now_ns < self.end_ns else "ended"

    def holds(self, time_ns: int) -> bool:
        return self.start_ns <= time_ns < self.end_ns

    def verdict(self, afterwards: bool = False) -> dict[str, str]:
        """The operator verdict an anomaly raised in the window is stored with
        (``afterwards``: raised before the window was set)."""
        why = f"raised in maintenance window {self.id}" + (", set afterwards" if afterwards else "")
        if self.comment:
            why += f": {self.comment}"
        return {"verdict": "expected", "comment": why, "author": self.author or "maintenance"}

    def to_json(self, now_ns: int) -> dict[str, Any]:
        return {
            "id": self.id,
            "device": self.device,
            "site": self.site,
            "start": rfc3339(self.start_ns),
            "end": rfc3339(self.end_ns),
            "state": self.state(now_ns),
            "comment": self.comment,
            "author": self.author,
            "created": rfc3339(self.created_ns),
            "silence_id": self.silence_id,
            "anomalies": self.anomalies,
        }


class MaintenanceWindows:
    """The windows of every device, thread-safe; saved to ``path`` on every change."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._by_device: dict[str, list[MaintenanceWindow]] = {}
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self._by_device)

    def add(
        self,
        device: str,
        site: str,
        start_ns: int,
        end_ns: int,
        comment: str = "",
        author: str = "",
        now_ns: int | None = None,
    ) -> MaintenanceWindow:
        now = time.time_ns() if now_ns is None else now_ns
        if end_ns <= start_ns:
            raise MaintenanceError(
                "end", f"{rfc3339(end_ns)} is not after the start, {rfc3339(start_ns)}"
            )
        if end_ns <= now:
            raise MaintenanceError("end", f"{rfc3339(end_ns)} has passed (now {rfc3339(now)})")
        if end_ns - start_ns > MAX_SPAN_S * NS:
            raise MaintenanceError(
                "end",
                f"a window of {(end_ns - start_ns) / NS / 86400:.1f} days; at most "
                f"{MAX_SPAN_S // 86400} (set another when it ends)",
            )
        with self._lock:
            self._prune(now)
            mine = self._by_device.setdefault(device, [])
            if sum(w.end_ns > now for w in mine) >= MAX_PER_DEVICE:
                raise MaintenanceError(
                    "device",
                    f"{device!r} has {MAX_PER_DEVICE} windows that have not ended, the most "
                    "it may have",
                )
            w = MaintenanceWindow(
                secrets.token_hex(8), device, site, start_ns, end_ns, comment, author, now
            )
            mine.append(w)
            mine.sort(key=lambda x: x.start_ns)
            self._write()
        return w

    def set_silence(self, window: MaintenanceWindow, silence_id: str | None) -> None:
        with self._lock:
            window.silence_id = silence_id
            self._write()

    def end(self, device: str, window_id: str, now_ns: int | None = None) -> MaintenanceWindow:
        """End a window now: an active one ends at ``now``, a scheduled one is dropped
        (returned with its end at its start), an ended one is left as it was.
        Raises KeyError for an unknown window."""
        now = time.time_ns() if now_ns is None else now_ns
        with self._lock:
            mine = self._by_device.get(device, [])
            w = next((x for x in mine if x.id == window_id), None)
            if w is None:
                raise KeyError(window_id)
            if w.start_ns > now:
                mine.remove(w)
                w.end_ns = w.start_ns
            elif w.end_ns > now:
                w.end_ns = now
            if not mine:
                self._by_device.pop(device, None)
            self._write()
        return w

    def of(self, device: str, now_ns: int | None = None) -> list[MaintenanceWindow]:
        """The device's windows, oldest start first (ended ones within KEEP_ENDED_S)."""
        now = time.time_ns() if now_ns is None else now_ns
        with self._lock:
            keep_from = now - KEEP_ENDED_S * NS
            return [w for w in self._by_device.get(device, []) if w.end_ns > keep_from]

    def holding(self, device: str, time_ns: int) -> MaintenanceWindow | None:
        """The window of ``device`` that ``time_ns`` falls in, if any."""
        with self._lock:
            return next((w for w in self._by_device.get(device, ()) if w.holds(time_ns)), None)

    def kept(self, window: MaintenanceWindow, n: int) -> None:
        """Count ``n`` anomalies raised in ``window`` and kept as expected."""
        with self._lock:
            window.anomalies += n
            self._write()

    def ending(self, readings: Sequence[Reading]) -> dict[str, int]:
        """For each device with a window not yet re-armed that ``readings`` pass the end
        of: the earliest such end. The windows ending then are marked re-armed (the caller
        re-arms the device's detectors at that time, and asks again for the readings
        after it: a later window may end among them too)."""
        if not self._by_device:
            return {}
        latest: dict[str, int] = {}
        for r in readings:
            if r.device in self._by_device and r.time_ns > latest.get(r.device, -1):
                latest[r.device] = r.time_ns
        ends: dict[str, int] = {}
        with self._lock:
            for device, t in latest.items():
                done = [
                    w
                    for w in self._by_device.get(device, ())
                    if not w.rearmed and w.start_ns < w.end_ns <= t
                ]
                if done:
                    ends[device] = end = min(w.end_ns for w in done)
                    for w in done:
                        w.rearmed = w.rearmed or w.end_ns == end
            if ends:
                self._write()
        return ends

    def _prune(self, now_ns: int) -> None:
        keep_from = now_ns - KEEP_ENDED_S * NS
        for device in list(self._by_device):
            left = [w for w in self._by_device[device] if w.end_ns > keep_from]
            if left:
                self._by_device[device] = left
            else:
                del self._by_device[device]

    def _write(self) -> None:
        """Save every window (called with the lock held). A failed write is logged: the
        windows still hold in this process, and are lost at its restart."""
        if self.path is None:
            return
        data = {d: [asdict(w) for w in ws] for d, ws in self._by_device.items()}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(data, indent=1))
            tmp.replace(self.path)
        except OSError:
            log.exception("saving the maintenance windows to %s failed", self.path)

    def load(self) -> None:
        """Read the saved windows. An unreadable file is kept aside for inspection
        (``maintenance.json.unreadable-<time>``), logged, and the windows start empty."""
        path = self.path
        if path is None or not path.exists():
            return
        try:
            raw = json.loads(path.read_text())
            loaded = {
                str(d): sorted((MaintenanceWindow(**w) for w in ws), key=lambda x: x.start_ns)
                for d, ws in raw.items()
            }
            for ws in loaded.values():
                for w in ws:
                    if not (isinstance(w.start_ns, int) and isinstance(w.end_ns, int)):
                        raise TypeError(f"window {w.id!r}: start_ns and end_ns must be integers")
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            aside = path.with_name(f"{path.name}.unreadable-{time.strftime('%Y%m%dT%H%M%S')}")
            try:
                path.replace(aside)
            except OSError:
                aside = path
            log.error(
                "detection: %s is unreadable (%s); kept as %s, no maintenance window holds",
                path,
                exc,
                aside.name,
            )
            return
        with self._lock:
            self._by_device = loaded
            self._prune(time.time_ns())
        if loaded:
            log.info(
                "detection: %d maintenance windows of %d devices loaded from %s",
                sum(len(ws) for ws in loaded.values()),
                len(loaded),
                path,
            )
