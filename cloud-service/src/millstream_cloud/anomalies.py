"""Anomaly records: what the detectors found, stored beside the telemetry and handed on.

Detectors run on every stored group of readings (a pipeline hook); whatever they return is
written to the ``anomalies`` measurement of the configured storage (so InfluxDB and
Grafana see it too), counted in ``/metrics``, and passed to every subscriber (the alert
engine, Grafana annotations). Listed, each carries the operator's verdict on it, if any
(:mod:`millstream_cloud.feedback` records them).
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from prometheus_client import Counter, Gauge

from millstream_cloud.maintenance import (
    MaintenanceError,
    MaintenanceSchedule,
    MaintenanceWindow,
    MaintenanceWindows,
    SiteMaintenance,
)
from millstream_cloud.metrics import ServiceMetrics
from millstream_cloud.model import Anomaly, Reading
from millstream_cloud.storage.base import (
    ANOMALIES,
    ANOMALY_FEEDBACK,
    DETECTION_EVENTS,
    Point,
    SeriesQuery,
    Storage,
    device_readings,
    row_batches,
)
from millstream_cloud.timeutil import rfc3339

log = logging.getLogger("millstream.anomalies")

FIELDS = ("score", "likelihood", "explanation", "contributions")
FEEDBACK_FIELDS = ("verdict", "comment", "author")
# What an operator can say of an anomaly. ``expected``: a real change with a known cause
# (maintenance, a planned stop, a recipe change), so the detector was right to see it.
VERDICTS = ("confirmed", "expected", "false_alarm")


AnomalyHook = Callable[[Sequence[Anomaly]], None]


class Silencer(Protocol):
    """What the sink asks of the alert engine: a silence for each maintenance window that
    silences its device's alerts (``AlertService`` sets itself as ``sink.silencer``)."""

    def create_silence(
        self,
        matchers: list[Any],
        created_by: str,
        comment: str,
        starts_at: int | None = None,
        ends_at: int | None = None,
        silence_id: str | None = None,
    ) -> Any: ...

    def expire_silence(self, silence_id: str) -> Any: ...


class Detector(Protocol):
    """What the live path needs of a detection engine."""

    def observe(self, readings: Sequence[Reading]) -> list[Anomaly]: ...


@runtime_checkable
class DescribesDevices(Protocol):
    """A detection engine that can say what it does for a device (the API's
    ``/devices/{id}/detection``): one engine, or one spread over processes."""

    def describe(self, device: str, kind: str | None, metrics: Iterable[str]) -> dict[str, Any]: ...


def anomaly_point(a: Anomaly) -> Point:
    tags = {"site": a.site, "device": a.device, "detector": a.detector}
    if a.metric:
        tags["metric"] = a.metric
    contributions = [
        {"metric": c.metric, "value": c.value, "expected": c.expected, "sigma": round(c.sigma, 2)}
        for c in a.contributions
    ]
    return Point(
        ANOMALIES,
        tags,
        {
            "score": float(a.score),
            "likelihood": float(a.likelihood),
            "explanation": a.explanation,
            "contributions": json.dumps(contributions, separators=(",", ":")),
        },
        a.time_ns,
    )


@dataclass(slots=True)
class Behind:
    """A device whose readings wait in the store for the detectors: they came while the
    detection queue was full (an agent's replayed backlog, a fleet reconnecting)."""

    site: str
    start_ns: int  # the oldest reading not scored yet
    end_ns: int  # the newest reading set aside
    readings: int  # set aside and not read back yet (sizes the pages read back)
    read: bool = False  # read back from ``start_ns`` on at least once


class AnomalySink:
    """Runs the detector on stored readings and records what it finds.

    Started, it scores on its own thread behind a bounded queue, so a slow model never
    holds up the acknowledgement of stored messages. When the queue is full, the devices
    of a batch fall *behind*: their readings, this batch's and every later one's, are
    left in the store and read back from it, in time order, once the queue is empty
    (``millstream_detection_deferred_readings_total``); a device's detectors see its
    readings in order, and a fault in an agent's replayed backlog is still found. Where
    each device stands is saved with the detectors' state (``behind_path``), so a restart
    reads on from there; without a saved state what is still behind at shutdown is not
    scored (counted as skipped). Not started (tests, tools), it scores inline.
    """

    def __init__(
        self,
        storage: Storage,
        metrics: ServiceMetrics,
        detector: Detector | None = None,
        queue_max_readings: int = 200_000,
        save: Callable[[AbstractContextManager[Any]], None] | None = None,
        save_interval_s: float = 300.0,
    ) -> None:
        self.storage = storage
        self.detector = detector
        # Why there is no detector, for the API's answers (404) when there is none.
        self.off_reason = "detection.enabled: false"
        self.hooks: list[AnomalyHook] = []
        self.recent: deque[Anomaly] = deque(maxlen=1000)
        self.queue_max_readings = queue_max_readings
        self.save = save
        self.save_interval_s = save_interval_s
        self.busy: Callable[[], bool] | None = None  # True while ingest is busy
        # Whether this worker scores a device (detection.shards: the others score theirs).
        self.owns: Callable[[str], bool] | None = None
        self._queue: queue.Queue[Sequence[Reading]] = queue.Queue()
        self._queued = 0
        self.behind: dict[str, Behind] = {}  # by device; guarded by _lock
        self.behind_path: Path | None = None  # saved with the detectors' state
        self._behind_saved = False  # the last save wrote every span still behind
        self._read_back_retry = 0.0  # monotonic time of the next try after a failed read
        self._read_back_wait = 0.0
        # Planned work on a device: what its detectors raise then is kept as expected, not
        # alerted (the API sets them; services.py gives them their file beside the state).
        self.maintenance = MaintenanceWindows()
        self._heard: set[str] = set()  # devices checked for the sites' windows to join
        self.silencer: Silencer | None = None  # the alert engine, if any
        # (device, metric) the detectors hold out of line, refreshed by the detection
        # thread every HOLD_EVERY_S: their anomaly alerts stay firing (``holds``).
        self.out_of_line: frozenset[tuple[str, str]] = frozenset()
        self._next_hold = 0.0
        self._next_due = 0.0  # monotonic time to set the schedules' next occurrences
        self._lock = threading.Lock()
        self._engine_lock = threading.Lock()  # observe and save vs. relearn from the API
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        r = metrics.registry
        self.counter = Counter(
            "millstream_anomalies",
            "Anomalies raised by the detectors, by detector",
            ["detector"],
            registry=r,
        )
        self.skipped = Counter(
            "millstream_detection_skipped_readings",
            "Readings not scored because the detectors were behind",
            registry=r,
        )
        self.scored = Counter("millstream_detection_scored_readings", "Readings scored", registry=r)
        self.maintenance_anomalies = Counter(
            "millstream_detection_maintenance_anomalies",
            "Anomalies raised in their device's maintenance window: stored with the "
            "verdict expected, not handed to the alert engine",
            registry=r,
        )
        self.deferred = Counter(
            "millstream_detection_deferred_readings",
            "Readings left in the store while the detection queue was full, to be read "
            "back and scored in order once it is empty",
            registry=r,
        )
        self.read_back = Counter(
            "millstream_detection_read_back_readings",
            "Readings read back from the store and scored (see deferred)",
            registry=r,
        )
        Gauge(
            "millstream_detection_queued_readings",
            "Readings waiting in the detection queue (detection.queue_max_readings at most)",
            registry=r,
        ).set_function(lambda: self._queued)
        Gauge(
            "millstream_detection_behind_devices",
            "Devices whose readings wait in the store for the detectors",
            registry=r,
        ).set_function(lambda: len(self.behind))
        Gauge(
            "millstream_detection_behind_seconds",
            "How far the detectors trail the newest reading set aside, for the device "
            "furthest behind (0 when none is)",
            registry=r,
        ).set_function(self.behind_seconds)
        self.seconds = Counter(
            "millstream_detection_seconds", "Time spent scoring readings", registry=r
        )
        self.failed = Counter(
            "millstream_detection_failed_readings",
            "Readings not scored because their device's detectors failed (the error is "
            "logged and shown at GET /api/v1/devices/{id}/detection)",
            registry=r,
        )
        self.verdicts = Counter(
            "millstream_anomaly_feedback",
            "Operator verdicts recorded on anomalies, by verdict",
            ["verdict"],
            registry=r,
        )

    def on_readings(self, readings: Sequence[Reading]) -> None:
        """Pipeline hook: score one stored group of readings (queued when started)."""
        if self.detector is None or not readings:
            return
        if self.owns is not None:
            readings = [r for r in readings if self.owns(r.device)]
            if not readings:
                return
        if self._thread is None:
            self.process(readings)
            return
        with self._lock:
            if self.behind:  # a device behind stays behind until it is read back
                readings = self._set_aside(readings, only_behind=True)
            if not readings:
                return
            if self._queued + len(readings) > self.queue_max_readings:
                self._set_aside(readings)
                return
            self._queued += len(readings)
        self._queue.put(readings)

    def _set_aside(self, readings: Sequence[Reading], only_behind: bool = False) -> list[Reading]:
        """Leave readings in the store for reading back (with ``only_behind``, those of
        devices already behind); the rest. Called with ``_lock`` held."""
        rest: list[Reading] = []
        n = late = 0
        for r in readings:
            b = self.behind.get(r.device)
            if b is None:
                if only_behind:
                    rest.append(r)
                    continue
                b = self.behind[r.device] = Behind(r.site, r.time_ns, r.time_ns, 0)
            elif r.time_ns < b.start_ns and b.read:
                # A late message from before the span's read-back (what lies after it may
                # be scored already): queued as any late reading is, or, with the queue
                # full, not scored.
                if only_behind:
                    rest.append(r)
                else:
                    late += 1
                continue
            b.start_ns = min(b.start_ns, r.time_ns)
            b.end_ns = max(b.end_ns, r.time_ns)
            b.readings += 1
            n += 1
        if n:
            self.deferred.inc(n)
        if late:
            self.skipped.inc(late)
        return rest

    def behind_of(self, device: str) -> dict[str, Any] | None:
        """Whether ``device`` waits in the store for the detectors, and from when (the API)."""
        with self._lock:
            b = self.behind.get(device)
            if b is None:
                return None
            return {
                "since": rfc3339(b.start_ns),
                "until": rfc3339(b.end_ns),
                "readings": b.readings,
            }

    def behind_seconds(self) -> float:
        with self._lock:
            return max(((b.end_ns - b.start_ns) / 1e9 for b in self.behind.values()), default=0.0)

    def process(self, readings: Sequence[Reading]) -> None:
        if self.detector is None:
            return
        self._join_sites(readings)
        # A device's readings up to the end of its maintenance window, then its detectors
        # re-armed, then the rest (each device's readings stay in order), which may pass
        # the end of another window.
        while ends := self.maintenance.ending(readings):
            past = [r.time_ns >= ends.get(r.device, r.time_ns + 1) for r in readings]
            self._observe([r for r, p in zip(readings, past, strict=True) if not p])
            self._rearm(ends)
            readings = [r for r, p in zip(readings, past, strict=True) if p]
        self._observe(readings)

    def _observe(self, readings: Sequence[Reading]) -> None:
        if not readings or self.detector is None:
            return
        t0 = time.perf_counter()
        failed_before = getattr(self.detector, "failed_readings", 0)
        with self._engine_lock:
            found = self.detector.observe(readings)
        self.failed.inc(getattr(self.detector, "failed_readings", 0) - failed_before)
        self.seconds.inc(time.perf_counter() - t0)
        self.scored.inc(len(readings))
        if found:
            self.record(found)

    def _rearm(self, ends: dict[str, int]) -> None:
        """After a device's maintenance window: its detectors report again what they
        found in it and still find (``DetectionEngine.rearm``)."""
        rearm = getattr(self.detector, "rearm", None)
        if rearm is None:
            return
        for device in ends:
            try:
                with self._engine_lock:
                    done = rearm(device)
            except Exception:  # its detectors failing is counted where they score
                log.exception("re-arming the detectors of %s after maintenance failed", device)
                continue
            log.info("detection: maintenance of %s over; detectors re-armed (%s)", device, done)

    def relearn(self, device: str, site: str = "") -> dict[str, int]:
        """Make the detection engine learn ``device`` afresh (see ``DetectionEngine.relearn``),
        save the state and record the moment in ``detection_events`` (a Grafana annotation
        on the device's graphs). Waits for the batch being scored, so it never runs beside
        ``observe``."""
        relearn = getattr(self.detector, "relearn", None)
        if relearn is None:
            raise LookupError("the detector in use cannot relearn")
        with self._engine_lock:
            result: dict[str, int] = relearn(device)
        log.info("detection relearns %s: %s", device, result)
        self._save()  # so a restart does not bring the old baseline back
        event = Point(
            DETECTION_EVENTS,
            {"site": site, "device": device, "event": "relearn"},
            {
                "explanation": "detection re-baselined: learning this device's normal afresh",
                "metric_detectors": result.get("metric_detectors", 0),
            },
            time.time_ns(),
        )
        try:
            self.storage.write_points([event])
        except Exception:  # the relearn itself has happened; the marker is a convenience
            log.exception("recording the relearn of %s failed", device)
        return result

    def start_maintenance(
        self,
        device: str,
        site: str,
        start_ns: int,
        end_ns: int,
        comment: str,
        author: str,
        silence_alerts: bool = False,
        group: str | None = None,
    ) -> MaintenanceWindow:
        """Set a maintenance window on ``device`` (see :mod:`millstream_cloud.maintenance`),
        mark its start in ``detection_events`` (an annotation on the device's graphs) and,
        with ``silence_alerts``, silence the device's alerts for it.
        Raises MaintenanceError for a window that cannot be set."""
        w = self.maintenance.add(device, site, start_ns, end_ns, comment, author, group=group)
        self._begin(w, silence_alerts)
        return w

    def _join_sites(self, readings: Sequence[Reading]) -> None:
        """A device first heard from (by this process) while a window or schedule set on
        its whole site holds takes its own, as the site's devices did when it was set."""
        now = time.time_ns()
        if not self.maintenance.sites_holding(now):
            return
        heard = self._heard
        new = {r.device: r.site for r in readings if r.device not in heard}
        for device, site in new.items():
            heard.add(device)
            for rec in self.maintenance.joining(device, site, now):
                try:
                    self._join(device, rec)
                except MaintenanceError as exc:  # at its limit of windows: logged
                    log.warning(
                        "detection: %s joined site %s during maintenance group %s, not set: %s",
                        device,
                        site,
                        rec.group,
                        exc,
                    )

    def _join(self, device: str, rec: SiteMaintenance) -> None:
        log.info("detection: %s joins site %s's maintenance %s", device, rec.site, rec.group)
        if rec.repeat is None:
            self.start_maintenance(
                device, rec.site, rec.start_ns, rec.end_ns, rec.comment, rec.author,
                rec.silence_alerts, rec.group,
            )  # fmt: skip
        else:
            self.schedule_maintenance(
                device, rec.site, rec.start_ns, rec.end_ns, rec.repeat, rec.timezone,
                rec.until_ns, rec.comment, rec.author, rec.silence_alerts, rec.group,
            )  # fmt: skip

    def schedule_maintenance(
        self,
        device: str,
        site: str,
        start_ns: int,
        end_ns: int,
        repeat: str,
        timezone: str,
        until_ns: int | None,
        comment: str,
        author: str,
        silence_alerts: bool = False,
        group: str | None = None,
    ) -> MaintenanceSchedule:
        """Set a recurring maintenance window; its first occurrences are set at once, the
        later ones by the detection thread (``tick_maintenance``).
        Raises MaintenanceError for a schedule that cannot be set."""
        sched = self.maintenance.add_schedule(
            device, site, start_ns, end_ns, repeat, timezone, until_ns, comment, author,
            silence_alerts, group=group,
        )  # fmt: skip
        log.info(
            "detection: maintenance of %s %s from %s (%s), %s",
            device,
            repeat,
            rfc3339(start_ns),
            timezone,
            comment or "no comment",
        )
        self.tick_maintenance()
        return sched

    def tick_maintenance(self, now_ns: int | None = None) -> list[MaintenanceWindow]:
        """Set the schedules' occurrences that are due as windows (each marked and
        silenced as one set through the API). Returns them."""
        new = self.maintenance.due(now_ns)
        for w in new:
            sched = self.maintenance.schedule(w.device, w.schedule or "")
            self._begin(w, sched is not None and sched.silence_alerts)
        return new

    def _begin(self, w: MaintenanceWindow, silence_alerts: bool) -> None:
        log.info(
            "detection: maintenance of %s from %s to %s (%s)",
            w.device,
            rfc3339(w.start_ns),
            rfc3339(w.end_ns),
            w.comment or "no comment",
        )
        self._event(w, w.start_ns, "maintenance", _until(w.end_ns), w.end_ns)
        self._judge_past(w)
        if silence_alerts:
            self._silence(w)

    def _silence(self, w: MaintenanceWindow, replaces: str | None = None) -> None:
        """Silence the device's alerts for the window (``replaces``: the silence set for
        it before a change, replaced as Alertmanager updates a silence)."""
        silencer = self.silencer
        if silencer is None:
            return

        def create() -> str:
            silence = silencer.create_silence(
                [f'site="{w.site}"', f'device="{w.device}"'],
                created_by=w.author or "maintenance",
                comment=f"maintenance window {w.id}" + (f": {w.comment}" if w.comment else ""),
                starts_at=w.start_ns,
                ends_at=w.end_ns,
                silence_id=replaces,
            )
            return str(silence.id)

        try:
            self.maintenance.silence(w, create)
        except ValueError:  # the window holds (its anomalies are not alerted)
            log.exception("silencing the alerts of %s for maintenance failed", w.device)

    def _judge_past(self, w: MaintenanceWindow) -> None:
        """A window set after its start: the anomalies already raised in it that nobody
        has judged get the verdict ``expected`` too (they were alerted; a verdict an
        operator gave is left as it is)."""
        now = time.time_ns()
        if w.start_ns >= now:
            return
        try:
            tags = tag_filters(device=w.device, site=w.site)
            span = (w.start_ns, min(w.end_ns, now))
            raised = rows_by_key(self.storage, ANOMALIES, ("score",), tags, *span)
            judged = rows_by_key(self.storage, ANOMALY_FEEDBACK, ("verdict",), tags, *span)
            verdict = w.verdict(afterwards=True)
            points = [
                Point(ANOMALY_FEEDBACK, dict(key_tags), verdict, t)
                for key_tags, t in raised
                if not judged.get((key_tags, t), {}).get("verdict")
            ]
            if points:
                self.storage.write_points(points)
                self.maintenance.kept(w, len(points))
        except Exception:  # the window holds from now on; the verdicts are a convenience
            log.exception("judging the anomalies already in the maintenance of %s failed", w.device)

    def end_maintenance(
        self, device: str, window_id: str
    ) -> MaintenanceWindow | MaintenanceSchedule:
        """End a window now (drop it if it has not begun), or stop a schedule (its
        occurrence under way ends now, the one set ahead is cancelled); the alert
        silences they set are expired. Raises KeyError if unknown."""
        now = time.time_ns()
        if self.maintenance.schedule(device, window_id) is not None:
            sched, touched = self.maintenance.stop_schedule(device, window_id, now)
            log.info("detection: maintenance schedule %s of %s stopped", window_id, device)
            for w in touched:
                self._ended(w, now)
            return sched
        w = self.maintenance.end(device, window_id, now)
        log.info("detection: maintenance of %s ended (window %s)", device, window_id)
        self._ended(w, now)
        return w

    def change_maintenance(
        self,
        device: str,
        window_id: str,
        end_ns: int | None,
        comment: str | None,
        duration_ns: int | None = None,
        until_ns: int | None = None,
        set_until: bool = False,
    ) -> MaintenanceWindow | MaintenanceSchedule:
        """Move a window's end or change its comment (``MaintenanceWindows.change``), or
        change a schedule from now on (``MaintenanceWindows.change_schedule``: each
        occurrence's ``duration_ns``, the comment, with ``set_until`` its ``until_ns``);
        the annotations are rewritten and the alert silences replaced to match, and the
        occurrences a shorter schedule drops are cancelled. Raises KeyError if unknown,
        MaintenanceError for a change that cannot be made."""
        if self.maintenance.schedule(device, window_id) is not None:
            if end_ns is not None:
                raise MaintenanceError(
                    "end",
                    f"{window_id} is a schedule: give each occurrence's duration (from its "
                    "start), or move one occurrence's end by its window's id",
                )
            now = time.time_ns()
            sched, changed, cancelled = self.maintenance.change_schedule(
                device, window_id, comment, duration_ns, until_ns, set_until, now
            )
            log.info("detection: maintenance schedule %s of %s changed", window_id, device)
            for w in changed:
                self._changed(w)
            for w in cancelled:
                self._ended(w, now)
            self.tick_maintenance()  # a later until: an occurrence may be due now
            return sched
        if set_until:
            raise MaintenanceError("until", f"{window_id} is a window, not a schedule")
        w = self.maintenance.change(device, window_id, end_ns, comment, None, duration_ns)
        log.info("detection: maintenance of %s now until %s", device, rfc3339(w.end_ns))
        self._changed(w)
        return w

    def _changed(self, w: MaintenanceWindow) -> None:
        self._event(w, w.start_ns, "maintenance", _until(w.end_ns), w.end_ns)
        if w.silence_id:
            self._silence(w, replaces=w.silence_id)

    def end_group(self, site: str, group: str) -> list[MaintenanceWindow | MaintenanceSchedule]:
        """End the windows and stop the schedules set together on ``site`` (the site's
        API), and give it to no device joining the site. Raises KeyError if there are
        none."""
        members = self.maintenance.grouped(site, group)
        known = self.maintenance.end_site(site, group, time.time_ns())
        if not members and not known:
            raise KeyError(group)
        with self.maintenance.saved_once():
            return [self.end_maintenance(device, item) for device, item in members]

    def change_group(
        self,
        site: str,
        group: str,
        end_ns: int | None,
        comment: str | None,
        duration_ns: int | None = None,
        until_ns: int | None = None,
        set_until: bool = False,
    ) -> tuple[list[MaintenanceWindow | MaintenanceSchedule], dict[str, str]]:
        """Change the windows or schedules set together on ``site`` (the site's API) as
        ``change_maintenance`` changes one, and what the group gives a device joining the
        site. Returns those changed and, by device, why one was not (a window ended on its
        own). Raises KeyError if there are none, MaintenanceError for a change none of
        them could take (nothing changed)."""
        members = self.maintenance.grouped(site, group)
        known = self.maintenance.change_site(
            site, group, end_ns, comment, duration_ns, until_ns, set_until, time.time_ns()
        )
        if not members and known is None:
            raise KeyError(group)
        changed: list[MaintenanceWindow | MaintenanceSchedule] = []
        refused: dict[str, str] = {}
        with self.maintenance.saved_once():
            for device, item in members:
                try:
                    changed.append(
                        self.change_maintenance(
                            device, item, end_ns, comment, duration_ns, until_ns, set_until
                        )
                    )
                except MaintenanceError as exc:
                    refused[device] = str(exc)
        return changed, refused

    def refresh_out_of_line(self) -> None:
        """Read what the detectors hold out of line now (``DetectionEngine.out_of_line``);
        on failure the last answer stands (logged)."""
        read = getattr(self.detector, "out_of_line", None)
        if read is None:
            return
        try:
            with self._engine_lock:
                self.out_of_line = frozenset(read())
        except Exception:
            log.exception("reading what the detectors hold out of line failed")

    def holds(self, device: str, metric: str) -> bool:
        """Whether the detectors still hold ``metric`` of ``device`` out of line (an
        anomaly they reported once, a stuck sensor or a device model's incident): its
        anomaly alert stays firing meanwhile."""
        return (device, metric) in self.out_of_line

    def _ended(self, w: MaintenanceWindow, now: int) -> None:
        # The start marker (same time and tags: rewritten) says what became of the window.
        if w.end_ns == w.start_ns:  # never began
            self._event(w, w.start_ns, "maintenance", "maintenance window cancelled", w.start_ns)
        elif w.end_ns == now:
            self._event(w, w.start_ns, "maintenance", _until(now, early=True), now)
            self._event(w, now, "maintenance_end", "maintenance ended: anomalies alerted again")
        if w.silence_id and self.silencer is not None:
            # Expired or removed meanwhile through the alerts API: nothing left to do.
            with contextlib.suppress(KeyError, ValueError):
                self.silencer.expire_silence(w.silence_id)

    def _event(
        self, w: MaintenanceWindow, at_ns: int, event: str, text: str, end_ns: int | None = None
    ) -> None:
        """A point in ``detection_events``; ``end_ns`` makes it a span (``end_ms``: Grafana
        draws the window as a region on the device's graphs)."""
        fields: dict[str, Any] = {"explanation": f"{text} ({w.comment})" if w.comment else text}
        if w.author:
            fields["author"] = w.author
        if end_ns is not None:
            fields["end_ms"] = end_ns // 1_000_000
        tags = {"site": w.site, "device": w.device, "event": event}
        try:
            self.storage.write_points([Point(DETECTION_EVENTS, tags, fields, at_ns)])
        except Exception:  # the window holds; the marker is a convenience
            log.exception("recording the maintenance of %s failed", w.device)

    def start(self) -> None:
        if self.detector is None or self._thread is not None:
            return
        self._load_behind()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="detection", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout)
            self._thread = None
        self._behind_saved = False
        if self.save is not None and self.detector is not None:
            self._save()
        with self._lock:
            left, self.behind = self.behind, {}
        if not left:
            return
        n = sum(b.readings for b in left.values())
        if self._behind_saved:
            log.info(
                "detection: %d readings of %d devices wait in the store for the detectors; "
                "they are read back after the restart (%s)",
                n,
                len(left),
                self.behind_path,
            )
            return
        self.skipped.inc(n)
        log.warning(
            "detection: %d readings of %d devices were still waiting in the store for "
            "the detectors at shutdown; they are not scored",
            n,
            len(left),
        )

    def _save(self) -> None:
        if self.save is None:
            return
        try:
            # Given the lock scoring and relearning run under, to hold while it reads
            # the state (device by device: scoring does not wait for the whole write).
            self.save(self._engine_lock)
        except Exception:
            log.exception("saving detector state failed")
            return
        self._save_behind()

    def _save_behind(self) -> None:
        """Where each device behind stands, beside the detectors' state just saved."""
        path = self.behind_path
        if path is None:
            return
        with self._lock:
            spans = {device: asdict(b) for device, b in self.behind.items()}
        try:
            if spans:
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text(json.dumps(spans))
                tmp.replace(path)
            else:
                path.unlink(missing_ok=True)
        except OSError:
            log.exception("saving the devices behind to %s failed", path)
            self._behind_saved = False
            return
        self._behind_saved = True

    def _load_behind(self) -> None:
        path = self.behind_path
        if path is None or not path.exists():
            return
        try:
            spans = {device: Behind(**b) for device, b in json.loads(path.read_text()).items()}
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            aside = path.with_name(f"{path.name}.unreadable-{time.strftime('%Y%m%dT%H%M%S')}")
            try:
                path.replace(aside)  # kept for inspection; the next save starts afresh
            except OSError:
                aside = path
            log.error(
                "detection: %s is unreadable (%s); kept as %s, the readings it named are "
                "not scored",
                path,
                exc,
                aside.name,
            )
            return
        with self._lock:
            self.behind.update(spans)
        log.info(
            "detection: %d devices wait in the store from before the restart (%d readings); "
            "reading them back",
            len(spans),
            sum(b.readings for b in spans.values()),
        )

    # Scoring goes in small chunks, and while ingest is busy (Subscriber.receiving: messages
    # waiting, or arriving faster than 100 a second), each chunk is followed by
    # a pause of PACE times what the chunk took: detection shares one interpreter (GIL)
    # with ingest, so this caps it at about 1/(1+PACE) of it. Under a burst the detectors
    # fall behind and, past the queue bound, read the rest back from the store afterwards.
    CHUNK = 500
    PACE = 4.0
    # Readings of a device behind read back per query (its span cut by the rate at which
    # they were set aside), and the longest wait between tries after a failed read.
    PAGE = 20_000
    RETRY_MAX_S = 30.0
    # How often the schedules' next occurrences are set (each one period ahead).
    DUE_EVERY_S = 60.0
    # How often what the detectors hold out of line is read for the alert engine.
    HOLD_EVERY_S = 10.0

    def _pace(self, spent_s: float) -> None:
        if self.busy is not None and self.busy():
            self._stop.wait(spent_s * self.PACE)

    def _run(self) -> None:
        next_save = time.monotonic() + self.save_interval_s
        while not (self._stop.is_set() and self._queue.empty()):
            readings = self._next()
            if readings is not None:
                for chunk in self._chunks(readings):
                    self._score(chunk)
                    with self._lock:
                        self._queued -= len(chunk)
            elif self.behind and not self._stop.is_set():
                self._read_back_page()
            if time.monotonic() >= next_save:
                self._save()
                next_save = time.monotonic() + self.save_interval_s
            if time.monotonic() >= self._next_hold:
                self._next_hold = time.monotonic() + self.HOLD_EVERY_S
                self.refresh_out_of_line()
            if time.monotonic() >= self._next_due:
                self._next_due = time.monotonic() + self.DUE_EVERY_S
                try:
                    self.tick_maintenance()
                except Exception:  # the windows already set still hold
                    log.exception("setting the next maintenance occurrences failed")

    def _next(self) -> Sequence[Reading] | None:
        """The next queued batch; None after a short wait (at once while devices wait in
        the store and can be read back now)."""
        try:
            if self.behind and time.monotonic() >= self._read_back_retry:
                return self._queue.get_nowait()
            return self._queue.get(timeout=0.2)
        except queue.Empty:
            return None

    def _score(self, chunk: Sequence[Reading]) -> None:
        t0 = time.monotonic()
        try:
            self.process(chunk)
        except Exception:
            log.exception("detector failed on a batch of %d readings", len(chunk))
            self.failed.inc(len(chunk))
        self._pace(time.monotonic() - t0)

    def _read_back_page(self) -> None:
        """Score the next page of the device furthest behind, read from the store; once a
        device's page reaches its newest reading set aside, its readings queue again."""
        if time.monotonic() < self._read_back_retry:
            return
        with self._lock:
            device, b = min(self.behind.items(), key=lambda kv: kv[1].start_ns)
            start, end, pending, site = b.start_ns, b.end_ns, b.readings, b.site
            b.read = True
        stop = end + 1
        if pending > self.PAGE:  # a time span of about PAGE readings, at least a second
            stop = min(stop, start + max((end - start) * self.PAGE // pending, 10**9))
        try:
            readings = device_readings(self.storage, device, site, start, stop)
        except Exception:
            wait = min(max(2 * (self._read_back_wait or 0.5), 1.0), self.RETRY_MAX_S)
            self._read_back_wait = wait
            self._read_back_retry = time.monotonic() + wait
            log.exception(
                "detection: reading %s back from the store failed; again in %.0f s", device, wait
            )
            return
        self._read_back_wait = 0.0
        done = 0
        for batch in row_batches(readings, self._call_size()):
            if self._stop.is_set():  # shutting down: the rest is read again after it
                stop = batch[0].time_ns
                break
            self._score(batch)
            done += len(batch)
        self.read_back.inc(done)
        with self._lock:
            span = self.behind.get(device)
            if span is None:  # stopped meanwhile (stop() took the spans)
                return
            span.start_ns = stop
            span.readings = max(span.readings - done, 0)
            if span.start_ns > span.end_ns:
                del self.behind[device]
                log.info("detection: %s caught up (read back from the store)", device)

    def _call_size(self) -> int:
        """Readings per ``observe`` call: the detector's ``batch_readings``, else CHUNK."""
        return int(getattr(self.detector, "batch_readings", self.CHUNK))

    def _chunks(self, first: Sequence[Reading]) -> list[Sequence[Reading]]:
        """What to score next, in calls of about CHUNK readings (the detector's
        ``batch_readings`` if it has one): a large batch split, a small one together with
        the batches queued behind it (until that is reached; the
        last may pass it by one batch). A message often carries a few dozen readings, and
        each ``observe`` has a fixed cost (a round trip to every process with
        ``detection.processes``)."""
        # Scored in other processes, a larger call holds no lock ingest needs, and the
        # engine's per-call costs (a matrix call per device model) weigh less.
        chunk = self._call_size()
        if len(first) >= chunk:
            return [first[i : i + chunk] for i in range(0, len(first), chunk)]
        out = list(first)
        while len(out) < chunk:
            try:
                out.extend(self._queue.get_nowait())
            except queue.Empty:
                break
        return [out]

    def record(self, anomalies: Sequence[Anomaly]) -> None:
        """Store anomalies and hand them on; those raised in their device's maintenance
        window are stored with the verdict ``expected`` and not handed on."""
        points = [anomaly_point(a) for a in anomalies]
        verdicts: list[Point] = []
        live: list[Anomaly] = []
        held: dict[str, tuple[MaintenanceWindow, int]] = {}  # by window id: how many
        for a, p in zip(anomalies, points, strict=True):
            w = self.maintenance.holding(a.device, a.time_ns) if self.maintenance else None
            if w is None:
                live.append(a)
                continue
            verdicts.append(Point(ANOMALY_FEEDBACK, p.tags, w.verdict(), p.time_ns))
            held[w.id] = (w, held.get(w.id, (w, 0))[1] + 1)
        self.storage.write_points(points + verdicts)
        for w, n in held.values():  # one save of the windows' file per window, not per anomaly
            self.maintenance.kept(w, n)
            self.maintenance_anomalies.inc(n)
        with self._lock:
            self.recent.extend(anomalies)
        alerted = {id(a) for a in live}
        for a in anomalies:
            self.counter.labels(a.detector).inc()
            kept = "" if id(a) in alerted else " (in a maintenance window: kept as expected)"
            log.info("anomaly on %s/%s: %s%s", a.device, a.metric or "*", a.explanation, kept)
        if not live:
            return
        for hook in self.hooks:
            try:
                hook(live)
            except Exception:
                log.exception("anomaly hook %r failed", hook)


def _until(end_ns: int, early: bool = False) -> str:
    """A maintenance window's start marker."""
    ended = " (ended early)" if early else ""
    return f"maintenance until {rfc3339(end_ns)}{ended}: anomalies kept as expected, not alerted"


_Key = tuple[tuple[tuple[str, str], ...], int]  # (sorted tag pairs, time_ns)


def rows_by_key(
    storage: Storage,
    measurement: str,
    fields: Sequence[str],
    tags: dict[str, str],
    start_ns: int | None,
    end_ns: int | None,
) -> dict[_Key, dict[str, Any]]:
    """One dict of fields per stored point, keyed by its tags and time."""
    series = storage.query(
        SeriesQuery(
            measurement,
            fields,
            tags,
            start_ns,
            end_ns,
            group_by=("site", "device", "metric", "detector"),
        )
    )
    rows: dict[_Key, dict[str, Any]] = {}
    for s in series:
        key_tags = tuple(sorted((k, v) for k, v in s.tags.items() if v))
        for t, v in s.points:
            rows.setdefault((key_tags, t), {})[s.field] = v
    return rows


def tag_filters(**tags: str | None) -> dict[str, str]:
    return {k: v for k, v in tags.items() if v}


def list_anomalies(
    storage: Storage,
    device: str | None = None,
    metric: str | None = None,
    site: str | None = None,
    start_ns: int | None = None,
    end_ns: int | None = None,
    limit: int | None = 1000,
    verdict: str | None = None,
) -> list[dict[str, Any]]:
    """Stored anomalies, newest first, as the API returns them, each with the operator's
    verdict (``feedback``, null while nobody has judged it). ``verdict`` keeps only those
    with that verdict, or ``judged`` / ``unjudged``."""
    tags = tag_filters(device=device, metric=metric, site=site)
    rows = rows_by_key(storage, ANOMALIES, FIELDS, tags, start_ns, end_ns)
    verdicts = rows_by_key(storage, ANOMALY_FEEDBACK, FEEDBACK_FIELDS, tags, start_ns, end_ns)
    out = []
    for key, fields in rows.items():
        key_tags, t = key
        tags_d = dict(key_tags)
        fb = verdicts.get(key)
        feedback = (
            {name: fb.get(name) or None for name in FEEDBACK_FIELDS}
            if fb and fb.get("verdict")
            else None
        )
        if not _verdict_matches(feedback, verdict):
            continue
        contributions = fields.get("contributions")
        out.append(
            {
                "time": rfc3339(t),
                "time_ns": t,
                "site": tags_d.get("site"),
                "device": tags_d.get("device"),
                "metric": tags_d.get("metric"),
                "detector": tags_d.get("detector"),
                "score": fields.get("score"),
                "likelihood": fields.get("likelihood"),
                "explanation": fields.get("explanation", ""),
                "contributions": json.loads(contributions)
                if isinstance(contributions, str)
                else [],
                "feedback": feedback,
            }
        )
    out.sort(key=lambda r: r["time_ns"], reverse=True)
    for r in out:
        del r["time_ns"]
    return out if limit is None else out[:limit]


def _verdict_matches(feedback: dict[str, Any] | None, wanted: str | None) -> bool:
    if wanted is None:
        return True
    if wanted == "judged":
        return feedback is not None
    if wanted == "unjudged":
        return feedback is None
    return feedback is not None and feedback["verdict"] == wanted
