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

Planned work often recurs (a cleaning every night, a tool change every Monday): a
``MaintenanceSchedule`` repeats a window daily or weekly at the same wall-clock time in
its time zone (as a recurring downtime in Datadog or a periodic maintenance in Zabbix),
until a date or for good. Each occurrence is an ordinary window, set one period ahead
(``MaintenanceWindows.due``, called by the detection thread), so everything above holds
for it, and the API lists the next one before it begins. A schedule is changed from now
on (``change_schedule``: its occurrences' length, comment, until); the occurrence under
way keeps its times.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dateutil.rrule import rrule, rrulestr

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
# A schedule's days between occurrences, by its ``repeat``; any other ``repeat`` is an
# RFC 5545 recurrence rule (as Datadog's recurring downtimes take one), ``monthly`` short
# for the simplest: "FREQ=MONTHLY;BYDAY=1MO" is the first Monday of every month. A rule
# recurs daily at the most often (a few times a day with BYHOUR), so its occurrences over
# years stay a few thousand.
REPEATS = {"daily": 1, "weekly": 7}
RULES = {"monthly": "FREQ=MONTHLY"}
RULE_FREQS = ("DAILY", "WEEKLY", "MONTHLY", "YEARLY")
# A rule's occurrence is set as a window its shortest gap ahead (a month's at most), as a
# daily or weekly one is set a period ahead; the gap is measured over its first GAP_SEEN.
MAX_AHEAD_S = 31 * 86400
GAP_SEEN = 60


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
    schedule: str | None = None  # the schedule it is an occurrence of, if any
    group: str | None = None  # set with its site's other devices' (the site's API)

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
        return _json(self, self.state(now_ns), self.silence_id, self.anomalies) | {
            "schedule": self.schedule
        }


@dataclass(slots=True)
class MaintenanceSchedule:
    """A window that recurs ``repeat`` (daily, weekly) from its first occurrence
    (``start_ns`` to ``end_ns``), at the same wall-clock time in ``timezone`` across
    daylight-saving changes, each lasting as long as the first; none starts at or after
    ``until_ns``. ``next`` is the index of the next occurrence to set as a window."""

    id: str
    device: str
    site: str
    start_ns: int
    end_ns: int
    repeat: str
    timezone: str = "UTC"
    until_ns: int | None = None
    comment: str = ""
    author: str = ""
    created_ns: int = 0
    silence_alerts: bool = True
    next: int = 0
    stopped_ns: int | None = None  # stopped through the API
    windows: list[str] = field(default_factory=list)  # ids of its occurrences, oldest first
    group: str | None = None  # set with its site's other devices' (the site's API)

    def occurrence(self, k: int) -> tuple[int, int]:
        """The ``k``-th occurrence (0: the first) as (start_ns, end_ns). A rule's first is
        its first instance from ``start_ns`` (which is one only if it matches the rule);
        IndexError past a rule's last (COUNT, UNTIL)."""
        seconds, rest = divmod(self.start_ns, NS)
        if self.repeat in REPEATS:
            first = datetime.fromtimestamp(seconds, ZoneInfo(self.timezone))
            # Aware arithmetic keeps the wall-clock time (06:00 stays 06:00 after a DST change).
            at = first + timedelta(days=k * REPEATS[self.repeat])
        else:
            at = _rule(self.repeat, seconds, self.timezone)[k]
        start = int(at.timestamp()) * NS + rest
        return start, start + self.end_ns - self.start_ns

    def has(self, k: int) -> bool:
        """Whether there is a ``k``-th occurrence (a rule's may run out)."""
        if self.repeat in REPEATS:
            return True
        try:
            _rule(self.repeat, self.start_ns // NS, self.timezone)[k]
        except IndexError:
            return False
        return True

    def period_ns(self) -> int:
        """The time between occurrences (a rule's shortest): an occurrence must be
        shorter, and each is set as a window this long before it begins."""
        return _period_ns(self.repeat, self.start_ns, self.timezone)

    def over(self, now_ns: int) -> bool:
        """Stopped, or no occurrence left to begin."""
        if self.stopped_ns is not None or not self.has(self.next):
            return True
        return self.until_ns is not None and self.occurrence(self.next)[0] >= self.until_ns

    def to_json(self, now_ns: int, occurrences: Sequence[MaintenanceWindow]) -> dict[str, Any]:
        """As a window's JSON (the first occurrence's start and end, the anomalies of
        every occurrence kept), with ``repeat``, ``timezone``, ``until`` and ``next``:
        the occurrence under way or next to begin, if any."""
        coming = [w for w in occurrences if w.end_ns > now_ns]
        nxt = coming[0] if coming else None
        state = "ended" if self.over(now_ns) and nxt is None else "recurring"
        silence_id = nxt.silence_id if nxt else None
        return _json(self, state, silence_id, sum(w.anomalies for w in occurrences)) | {
            "repeat": self.repeat,
            "timezone": self.timezone,
            "until": rfc3339(self.until_ns) if self.until_ns is not None else None,
            "silence_alerts": self.silence_alerts,
            "next": nxt.to_json(now_ns) if nxt else None,
        }


@dataclass(slots=True)
class SiteMaintenance:
    """A window or schedule set on a whole site as ``group`` (the site's API): every device
    of the site known then took its own, and a device first heard from while it holds (a
    machine installed during a shutdown, or in the months a nightly site schedule runs)
    takes one too (``AnomalySink``). ``members``: the devices given it, so a device whose
    window was ended on its own is not given another."""

    group: str
    site: str
    start_ns: int
    end_ns: int
    repeat: str | None = None
    timezone: str = "UTC"
    until_ns: int | None = None
    comment: str = ""
    author: str = ""
    silence_alerts: bool = True
    created_ns: int = 0
    members: list[str] = field(default_factory=list)
    ended_ns: int | None = None  # ended through the API

    def holds(self, now_ns: int) -> bool:
        """Whether a device joining the site now takes it."""
        if self.ended_ns is not None:
            return False
        if self.repeat is None:
            return now_ns < self.end_ns
        return self.until_ns is None or now_ns < self.until_ns

    def over_since(self) -> int | None:
        """When it stopped holding for good (None: it still may)."""
        if self.ended_ns is not None:
            return self.ended_ns
        return self.end_ns if self.repeat is None else self.until_ns

    def to_json(self, now_ns: int) -> dict[str, Any]:
        return {
            "group": self.group,
            "site": self.site,
            "start": rfc3339(self.start_ns),
            "end": rfc3339(self.end_ns),
            "repeat": self.repeat,
            "timezone": self.timezone,
            "until": rfc3339(self.until_ns) if self.until_ns is not None else None,
            "comment": self.comment,
            "author": self.author,
            "silence_alerts": self.silence_alerts,
            "created": rfc3339(self.created_ns),
            "state": "holding" if self.holds(now_ns) else "ended",
            "devices": len(self.members),
        }


def _json(
    x: MaintenanceWindow | MaintenanceSchedule, state: str, silence_id: str | None, anomalies: int
) -> dict[str, Any]:
    """The keys a window and a schedule share (the API answers with either)."""
    return {
        "id": x.id,
        "device": x.device,
        "site": x.site,
        "start": rfc3339(x.start_ns),
        "end": rfc3339(x.end_ns),
        "state": state,
        "comment": x.comment,
        "author": x.author,
        "created": rfc3339(x.created_ns),
        "silence_id": silence_id,
        "anomalies": anomalies,
        "group": x.group,
    }


class MaintenanceWindows:
    """The windows of every device, thread-safe; saved to ``path`` on every change."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._by_device: dict[str, list[MaintenanceWindow]] = {}
        self._schedules: dict[str, MaintenanceSchedule] = {}  # by id
        self._sites: dict[str, SiteMaintenance] = {}  # by group
        self._lock = threading.RLock()  # stop_schedule ends windows under it
        self._deferred = 0  # inside saved_once: writes wait for its end
        self._unsaved = False

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
        group: str | None = None,
    ) -> MaintenanceWindow:
        now = time.time_ns() if now_ns is None else now_ns
        _check_span(start_ns, end_ns)
        if end_ns <= now:
            raise MaintenanceError("end", f"{rfc3339(end_ns)} has passed (now {rfc3339(now)})")
        with self._lock:
            self._prune(now)
            self._check_room(device, now)
            w = MaintenanceWindow(
                secrets.token_hex(8), device, site, start_ns, end_ns, comment, author, now,
                group=group,
            )  # fmt: skip
            self._insert(w)
            self._write()
        return w

    def add_schedule(
        self,
        device: str,
        site: str,
        start_ns: int,
        end_ns: int,
        repeat: str,
        timezone: str = "UTC",
        until_ns: int | None = None,
        comment: str = "",
        author: str = "",
        silence_alerts: bool = True,
        now_ns: int | None = None,
        group: str | None = None,
    ) -> MaintenanceSchedule:
        """A window repeated ``repeat`` from ``start_ns``..``end_ns`` (which may have
        passed: "Mondays 06:00 to 08:00 from last Monday"). Its occurrences are set as
        windows by ``due``, the first ones at once."""
        now = time.time_ns() if now_ns is None else now_ns
        try:
            ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            raise MaintenanceError(
                "timezone", f"{timezone!r} is not a time zone (an IANA name: Europe/Berlin, UTC)"
            ) from None
        if repeat not in REPEATS:
            _check_rule(repeat, start_ns // NS, timezone)
        _check_span(start_ns, end_ns)
        sched = MaintenanceSchedule(
            secrets.token_hex(8), device, site, start_ns, end_ns, repeat, timezone, until_ns,
            comment, author, now, silence_alerts, group=group,
        )  # fmt: skip
        _check_period(end_ns - start_ns, repeat, start_ns, timezone)
        while sched.has(sched.next) and sched.occurrence(sched.next)[1] <= now:
            sched.next += 1  # from the first one not over
        if not sched.has(sched.next):
            raise MaintenanceError("repeat", f"{repeat!r} has no occurrence after now")
        if sched.over(now):
            raise MaintenanceError(
                "until",
                f"{rfc3339(until_ns or 0)} leaves no occurrence to come "
                f"(the next would start {rfc3339(sched.occurrence(sched.next)[0])})",
            )
        with self._lock:
            self._prune(now)
            self._check_room(device, now)
            self._schedules[sched.id] = sched
            self._write()
        return sched

    def due(self, now_ns: int | None = None) -> list[MaintenanceWindow]:
        """Set, as windows, the schedules' occurrences that begin within one period
        from now (so the next is listed, and its alerts silenced, before it begins),
        and those missed while the service was down that ended in the last
        KEEP_ENDED_S (an agent's backlog from them is still held). Returns the new ones."""
        now = time.time_ns() if now_ns is None else now_ns
        new: list[MaintenanceWindow] = []
        with self._lock:
            for sched in self._schedules.values():
                ahead = now + min(sched.period_ns(), MAX_AHEAD_S * NS)
                while not sched.over(now):
                    start, end = sched.occurrence(sched.next)
                    if start > ahead:
                        break
                    sched.next += 1
                    if end <= now - KEEP_ENDED_S * NS:
                        continue
                    w = MaintenanceWindow(
                        f"{sched.id}-{sched.next - 1}", sched.device, sched.site, start, end,
                        sched.comment, sched.author, now, schedule=sched.id,
                    )  # fmt: skip
                    self._insert(w)
                    sched.windows.append(w.id)
                    new.append(w)
            if new:
                self._write()
        return new

    def stop_schedule(
        self, device: str, schedule_id: str, now_ns: int | None = None
    ) -> tuple[MaintenanceSchedule, list[MaintenanceWindow]]:
        """Stop a schedule: no occurrence after now; the one under way ends now and the
        one set ahead is cancelled. Returns it with the occurrences this ended or
        cancelled (as ``end`` returns them). Raises KeyError for an unknown schedule."""
        now = time.time_ns() if now_ns is None else now_ns
        with self._lock:
            sched = self.schedule(device, schedule_id)
            if sched is None:
                raise KeyError(schedule_id)
            if sched.stopped_ns is None:
                sched.stopped_ns = now
            touched = [self.end(device, w.id, now) for w in self.occurrences(sched)]
            touched = [w for w in touched if w.end_ns in (now, w.start_ns)]
            self._write()
        return sched, touched

    def change_schedule(
        self,
        device: str,
        schedule_id: str,
        comment: str | None = None,
        duration_ns: int | None = None,
        until_ns: int | None = None,
        set_until: bool = False,
        now_ns: int | None = None,
    ) -> tuple[MaintenanceSchedule, list[MaintenanceWindow], list[MaintenanceWindow]]:
        """Change a schedule from now on, as a recurring downtime is edited in Datadog:
        ``duration_ns`` is each occurrence's length (the ones not begun, the one set ahead
        among them; the one under way keeps its end, moved by its window's id),
        ``comment`` its own and its occurrences' not ended, and with ``set_until`` its
        ``until_ns`` (None: for good), the occurrences set ahead that start at or after it
        cancelled. Returns it with the occurrences changed and those cancelled (as ``end``
        returns them). Raises KeyError for an unknown schedule and MaintenanceError for a
        change that cannot be made (a stopped schedule, an until passed, an occurrence as
        long as the period)."""
        now = time.time_ns() if now_ns is None else now_ns
        with self._lock:
            sched = self.schedule(device, schedule_id)
            if sched is None:
                raise KeyError(schedule_id)
            if sched.stopped_ns is not None:
                raise MaintenanceError(
                    "id", f"schedule {sched.id} was stopped at {rfc3339(sched.stopped_ns)}; "
                    "set another",
                )  # fmt: skip
            if duration_ns is not None:
                _check_span(0, duration_ns)
                _check_period(duration_ns, sched.repeat, sched.start_ns, sched.timezone)
            if set_until and until_ns is not None and until_ns <= now:
                raise MaintenanceError(
                    "until", f"{rfc3339(until_ns)} has passed (to stop the schedule now, DELETE it)"
                )
            was_over = sched.over(now)
            ahead = [w for w in self.occurrences(sched) if w.start_ns > now]
            changed: dict[str, MaintenanceWindow] = {}
            if duration_ns is not None:
                sched.end_ns = sched.start_ns + duration_ns
                for w in ahead:
                    w.end_ns = w.start_ns + duration_ns
                    changed[w.id] = w
            if comment is not None:
                sched.comment = comment
                for w in self.occurrences(sched):
                    if w.end_ns > now:
                        w.comment = comment
                        changed[w.id] = w
            cancelled: list[MaintenanceWindow] = []
            if set_until:
                sched.until_ns = until_ns
                for w in ahead:
                    if until_ns is not None and w.start_ns >= until_ns:
                        cancelled.append(self.end(device, w.id, now))
                        changed.pop(w.id, None)
                        # Set again if a later change takes the until back.
                        sched.next = min(sched.next, int(w.id.rsplit("-", 1)[1]))
                if was_over:  # taken up again: from the first occurrence not over
                    while sched.has(sched.next) and sched.occurrence(sched.next)[1] <= now:
                        sched.next += 1
            self._write()
        return sched, list(changed.values()), cancelled

    def occurrences(self, sched: MaintenanceSchedule) -> list[MaintenanceWindow]:
        """The schedule's occurrences still kept, oldest first (cancelled ones not)."""
        with self._lock:
            mine = {w.id: w for w in self._by_device.get(sched.device, ())}
        return [mine[i] for i in sched.windows if i in mine]

    def schedule(self, device: str, schedule_id: str) -> MaintenanceSchedule | None:
        s = self._schedules.get(schedule_id)
        return s if s is not None and s.device == device else None

    def grouped(self, site: str, group: str) -> list[tuple[str, str]]:
        """(device, id) of the windows and schedules set together on ``site`` as ``group``
        (a schedule's occurrences go with their schedule)."""
        with self._lock:
            items: list[MaintenanceWindow | MaintenanceSchedule] = [
                w for ws in self._by_device.values() for w in ws
            ]
            items += self._schedules.values()
            return [(x.device, x.id) for x in items if x.group == group and x.site == site]

    def add_site(self, rec: SiteMaintenance) -> None:
        """Remember a site's window or schedule, for the devices that join the site."""
        with self._lock:
            self._sites[rec.group] = rec
            self._write()

    def sites(self, site: str | None = None) -> list[SiteMaintenance]:
        """The sites' windows and schedules (of ``site``), oldest first."""
        with self._lock:
            return sorted(
                (r for r in self._sites.values() if site is None or r.site == site),
                key=lambda r: (r.created_ns, r.group),
            )

    def sites_holding(self, now_ns: int) -> bool:
        """Whether any site's window or schedule would be given to a joining device."""
        with self._lock:
            return any(r.holds(now_ns) for r in self._sites.values())

    def joining(self, device: str, site: str, now_ns: int) -> list[SiteMaintenance]:
        """The site's windows and schedules holding now that ``device`` has not been
        given; marked as given (saved), as the caller sets them."""
        with self._lock:
            out = [
                r
                for r in self._sites.values()
                if r.site == site and device not in r.members and r.holds(now_ns)
            ]
            for r in out:
                r.members.append(device)
            if out:
                self._write()
            return out

    def end_site(self, site: str, group: str, now_ns: int) -> bool:
        """Stop giving ``group`` to devices joining ``site``; whether it was there."""
        with self._lock:
            rec = self._sites.get(group)
            if rec is None or rec.site != site:
                return False
            if rec.ended_ns is None:
                rec.ended_ns = now_ns
                self._write()
            return True

    def change_site(
        self,
        site: str,
        group: str,
        end_ns: int | None,
        comment: str | None,
        duration_ns: int | None,
        until_ns: int | None,
        set_until: bool,
        now_ns: int,
    ) -> SiteMaintenance | None:
        """Change what ``group`` gives the devices joining ``site`` as its devices' windows
        or schedules are changed (the site's API): checked as they are, so a change none of
        them could take is refused before any is made. None if the group was set before
        sites kept theirs. Raises MaintenanceError for a change that cannot be made."""
        with self._lock:
            rec = self._sites.get(group)
            if rec is None or rec.site != site:
                return None
            if rec.ended_ns is not None:
                raise MaintenanceError(
                    "group", f"group {group} was ended at {rfc3339(rec.ended_ns)}; set another"
                )
            if rec.repeat is None:
                if set_until:
                    raise MaintenanceError("until", f"group {group} is a window, not a schedule")
                if duration_ns is not None:
                    end_ns = rec.start_ns + duration_ns
                if end_ns is not None:
                    if end_ns <= now_ns:
                        raise MaintenanceError("end", f"{rfc3339(end_ns)} has passed")
                    _check_span(rec.start_ns, end_ns)
            else:
                if end_ns is not None:
                    raise MaintenanceError(
                        "end", f"group {group} is a schedule: give each occurrence's duration"
                    )
                if duration_ns is not None:
                    _check_span(0, duration_ns)
                    _check_period(duration_ns, rec.repeat, rec.start_ns, rec.timezone)
                    end_ns = rec.start_ns + duration_ns
                if set_until and until_ns is not None and until_ns <= now_ns:
                    raise MaintenanceError("until", f"{rfc3339(until_ns)} has passed")
            if end_ns is not None:
                rec.end_ns = end_ns
            if comment is not None:
                rec.comment = comment
            if set_until:
                rec.until_ns = until_ns
            self._write()
            return rec

    def schedules_of(self, device: str) -> list[MaintenanceSchedule]:
        """The device's schedules, oldest first (stopped or over ones for KEEP_ENDED_S)."""
        with self._lock:
            return sorted(
                (s for s in self._schedules.values() if s.device == device),
                key=lambda s: s.created_ns,
            )

    def _check_room(self, device: str, now_ns: int) -> None:
        """Refuse a device's window or schedule past MAX_PER_DEVICE of them not ended."""
        n = sum(w.end_ns > now_ns for w in self._by_device.get(device, ()))
        n += sum(s.device == device and not s.over(now_ns) for s in self._schedules.values())
        if n >= MAX_PER_DEVICE:
            raise MaintenanceError(
                "device",
                f"{device!r} has {MAX_PER_DEVICE} windows and schedules that have not ended, "
                "the most it may have",
            )

    def _insert(self, w: MaintenanceWindow) -> None:
        mine = self._by_device.setdefault(w.device, [])
        mine.append(w)
        mine.sort(key=lambda x: x.start_ns)

    def silence(self, window: MaintenanceWindow, create: Callable[[], str]) -> None:
        """Set the window's alert silence (``create`` makes it, and returns its id) if the
        window is still to hold: under the lock ``end`` takes, so a window ended meanwhile
        gets none, and one ended afterwards finds the id to expire it by."""
        with self._lock:
            mine = self._by_device.get(window.device, ())
            if window.end_ns > time.time_ns() and any(w is window for w in mine):
                window.silence_id = create()
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

    def change(
        self,
        device: str,
        window_id: str,
        end_ns: int | None,
        comment: str | None,
        now_ns: int | None = None,
        duration_ns: int | None = None,
    ) -> MaintenanceWindow:
        """Move a window's end (``end_ns``, or ``duration_ns`` from its start: the work
        takes longer, or less long) or change its comment, while it has not ended. Raises
        KeyError for an unknown window and MaintenanceError for a change that cannot be
        made."""
        now = time.time_ns() if now_ns is None else now_ns
        with self._lock:
            w = next((x for x in self._by_device.get(device, ()) if x.id == window_id), None)
            if w is None:
                raise KeyError(window_id)
            if w.end_ns <= now:
                raise MaintenanceError(
                    "end", f"window {w.id} ended at {rfc3339(w.end_ns)}; set another"
                )
            if duration_ns is not None:
                end_ns = w.start_ns + duration_ns
            if end_ns is not None:
                if end_ns <= now:
                    raise MaintenanceError(
                        "end", f"{rfc3339(end_ns)} has passed (to end the window now, DELETE it)"
                    )
                _check_span(w.start_ns, end_ns)
                w.end_ns = end_ns
            if comment is not None:
                w.comment = comment
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
        for sid, sched in list(self._schedules.items()):
            kept = {w.id for w in self._by_device.get(sched.device, ())}
            sched.windows = [i for i in sched.windows if i in kept]
            stopped_long_ago = (sched.stopped_ns or 0) <= keep_from
            if sched.over(now_ns) and not sched.windows and stopped_long_ago:
                del self._schedules[sid]  # stopped or over, its last occurrence gone
        for group, rec in list(self._sites.items()):
            over = rec.over_since()
            if over is not None and over <= keep_from:
                del self._sites[group]

    @contextlib.contextmanager
    def saved_once(self) -> Iterator[None]:
        """Changes made inside are saved once, at the end (a site's hundreds of windows set
        or ended together: one write of the file, not one per window)."""
        with self._lock:
            self._deferred += 1
        try:
            yield
        finally:
            with self._lock:
                self._deferred -= 1
                if not self._deferred and self._unsaved:
                    self._write()

    def _write(self) -> None:
        """Save every window (called with the lock held). A failed write is logged: the
        windows still hold in this process, and are lost at its restart."""
        if self.path is None:
            return
        self._unsaved = bool(self._deferred)
        if self._unsaved:
            return
        data = {
            "version": 2,
            "windows": {d: [asdict(w) for w in ws] for d, ws in self._by_device.items()},
            "schedules": [asdict(x) for x in self._schedules.values()],
            "sites": [asdict(r) for r in self._sites.values()],
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(data, indent=1))
            tmp.replace(self.path)
        except OSError:
            log.exception("saving the maintenance windows to %s failed", self.path)

    def load(self, others: Sequence[Path] = (), owns: Callable[[str], bool] | None = None) -> None:
        """Read the saved windows and schedules. An unreadable file is kept aside for
        inspection (``maintenance.json.unreadable-<time>``), logged, and the windows start
        empty. With ``detection.shards`` each worker saves its own file: ``others`` are the
        other layouts' files, read too for the devices this worker ``owns``, so a window
        set before the shards changed still holds (the newest file's copy of a window
        wins); they are left as they are."""
        path = self.path
        found: list[tuple[float, _Saved]] = []
        if path is not None and path.exists():
            try:
                found.append((path.stat().st_mtime, _read(path)))
            except (OSError, ValueError, TypeError, AttributeError, KeyError) as exc:
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
        for other in others:
            try:
                found.append((other.stat().st_mtime, _read(other)))
            except (OSError, ValueError, TypeError, AttributeError, KeyError) as exc:
                log.warning("detection: %s is unreadable (%s); not read", other, exc)
        windows: dict[str, MaintenanceWindow] = {}
        schedules: dict[str, MaintenanceSchedule] = {}
        sites: dict[str, SiteMaintenance] = {}
        for _, (ws, ss, rs) in sorted(found, key=lambda f: f[0]):  # the newest copy last
            windows.update((w.id, w) for w in ws if owns is None or owns(w.device))
            schedules.update((x.id, x) for x in ss if owns is None or owns(x.device))
            for r in rs:  # every layout's devices given it
                if r.group in sites:
                    r.members = sorted(set(r.members) | set(sites[r.group].members))
                sites[r.group] = r
        loaded: dict[str, list[MaintenanceWindow]] = {}
        for w in sorted(windows.values(), key=lambda x: x.start_ns):
            loaded.setdefault(w.device, []).append(w)
        with self._lock:
            self._by_device = loaded
            self._schedules = schedules
            self._sites = sites
            self._prune(time.time_ns())
            if len(found) > 1:
                self._write()  # now the newest
        if loaded or schedules:
            log.info(
                "detection: %d maintenance windows of %d devices and %d schedules loaded from %s",
                len(windows),
                len(loaded),
                len(schedules),
                ", ".join(str(p) for p in [path, *others] if p is not None and p.exists()),
            )


_Saved = tuple[list[MaintenanceWindow], list[MaintenanceSchedule], list[SiteMaintenance]]


def _read(path: Path) -> _Saved:
    """The windows and schedules saved in ``path``; raises for a file that is not one."""
    raw = json.loads(path.read_text())
    if raw.get("version") != 2:  # the first format: the windows by device
        raw = {"windows": raw, "schedules": []}
    windows = [MaintenanceWindow(**w) for ws in raw["windows"].values() for w in ws]
    schedules = [MaintenanceSchedule(**x) for x in raw["schedules"]]
    sites = [SiteMaintenance(**r) for r in raw.get("sites", ())]
    spans = [(w.id, w.start_ns, w.end_ns) for w in windows]
    spans += [(x.id, x.start_ns, x.end_ns) for x in schedules]
    for wid, start, end in spans:
        if not (isinstance(start, int) and isinstance(end, int)):
            raise TypeError(f"window {wid!r}: start_ns and end_ns must be integers")
    for x in schedules:
        x.period_ns()  # an unknown repeat, rule or time zone
    return windows, schedules, sites


def _check_span(start_ns: int, end_ns: int) -> None:
    if end_ns <= start_ns:
        raise MaintenanceError(
            "end", f"{rfc3339(end_ns)} is not after the start, {rfc3339(start_ns)}"
        )
    if end_ns - start_ns > MAX_SPAN_S * NS:
        raise MaintenanceError(
            "end",
            f"a window of {(end_ns - start_ns) / NS / 86400:.1f} days; at most "
            f"{MAX_SPAN_S // 86400} (set another when it ends)",
        )


def _period_ns(repeat: str, start_ns: int, timezone: str) -> int:
    """The time between a schedule's occurrences (a rule's shortest)."""
    if repeat in REPEATS:
        return REPEATS[repeat] * 86400 * NS
    return _gap_s(repeat, start_ns // NS, timezone) * NS


def _check_period(span_ns: int, repeat: str, start_ns: int, timezone: str) -> None:
    """A recurring window must end before its next occurrence begins."""
    period_ns = _period_ns(repeat, start_ns, timezone)
    if span_ns >= period_ns:
        raise MaintenanceError(
            "end",
            f"a window of {span_ns / NS / 3600:g} h repeated {repeat}: it must "
            f"be shorter than {period_ns / NS / 3600:g} h (or it never ends)",
        )


@functools.lru_cache(maxsize=4096)
def _rule(repeat: str, start_s: int, timezone: str) -> rrule:
    """``repeat`` (a rule, or ``monthly``) from ``start_s`` at its wall-clock time in
    ``timezone``; its instances are cached as they are read. Raises ValueError."""
    first = datetime.fromtimestamp(start_s, ZoneInfo(timezone))
    text = RULES.get(repeat, repeat)
    if "\n" in text or "DTSTART" in text.upper():
        raise ValueError("one RRULE line, without DTSTART (the window's start is its start)")
    rule = rrulestr(text, dtstart=first, cache=True)
    if not isinstance(rule, rrule):
        raise ValueError("one RRULE line")
    return rule


@functools.lru_cache(maxsize=4096)
def _gap_s(repeat: str, start_s: int, timezone: str) -> int:
    """The shortest time between a rule's occurrences (over its first GAP_SEEN; a
    rule of one occurrence: MAX_SPAN_S, the longest a window may be, and then some)."""
    at = [int(t.timestamp()) for t in itertools.islice(_rule(repeat, start_s, timezone), GAP_SEEN)]
    gaps = [b - a for a, b in itertools.pairwise(at)]
    return min(gaps) if gaps else MAX_SPAN_S + 1


def _check_rule(repeat: str, start_s: int, timezone: str) -> None:
    """Refuse a ``repeat`` that is not daily, weekly, monthly or a rule of RULE_FREQS."""
    known = ", ".join([*REPEATS, *RULES])
    text = RULES.get(repeat, repeat).upper().removeprefix("RRULE:")
    if "\n" in text or "DTSTART" in text:
        raise MaintenanceError(
            "repeat",
            f"{repeat!r}: one RRULE line, without DTSTART (the window's start is its start)",
        )
    freq = next((p[5:] for p in text.split(";") if p.startswith("FREQ=")), None)
    if freq is None:
        raise MaintenanceError(
            "repeat", f"{repeat!r} is not one of {known} nor an RFC 5545 RRULE (FREQ=...)"
        )
    if freq not in RULE_FREQS:
        raise MaintenanceError(
            "repeat", f"{repeat!r}: FREQ={freq}; a rule recurs {', '.join(RULE_FREQS)}"
        )
    try:
        _rule(repeat, start_s, timezone)
    except (ValueError, TypeError) as exc:
        raise MaintenanceError("repeat", f"{repeat!r} is not a recurrence rule: {exc}") from None
