"""Routing and grouping: Alertmanager's route tree, aggregation groups and their timers.

An alert walks the route tree (depth first; the first matching child wins unless it has
``continue: true``) to one or more routes. At each route it joins the group of alerts that
share its ``group_by`` labels. A new group notifies after ``group_wait``; after that it is
looked at every ``group_interval`` and notifies when something changed (a new firing
alert, a resolution) or when ``repeat_interval`` passed since the last notification.
Silenced and inhibited alerts are left out at that moment. A route's
``mute_time_intervals`` (and the times outside its ``active_time_intervals``) hold back
its groups' notifications; they go out at the first flush after, resolutions included.

What each integration was last told about each group is the notification log (nflog,
persisted), so decisions survive a restart.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from millstream_cloud.alerts.labels import Matcher, match_all, parse_duration, parse_matchers
from millstream_cloud.alerts.notifiers.base import AlertSnapshot, Notification
from millstream_cloud.alerts.settings import RouteConfig
from millstream_cloud.alerts.store import Alert, NflogEntry
from millstream_cloud.alerts.timeintervals import TimeInterval, holding

log = logging.getLogger("millstream.alerts.routing")

DEFAULTS = {"group_wait": "30s", "group_interval": "5m", "repeat_interval": "4h"}


@dataclass
class Route:
    key: str
    receiver: str
    matchers: list[Matcher]
    group_by: list[str]
    group_wait: int
    group_interval: int
    repeat_interval: int
    continue_: bool = False
    routes: list[Route] = field(default_factory=list)
    # Names of time intervals (not inherited, as Alertmanager).
    mute_time_intervals: list[str] = field(default_factory=list)
    active_time_intervals: list[str] = field(default_factory=list)

    def muted_at(self, intervals: Mapping[str, Sequence[TimeInterval]], now: int) -> str | None:
        """Why the route sends nothing at ``now`` (a time interval), or None."""
        name = holding(self.mute_time_intervals, intervals, now)
        if name is not None:
            return name
        if self.active_time_intervals and not holding(self.active_time_intervals, intervals, now):
            return "outside " + ",".join(self.active_time_intervals)
        return None

    @classmethod
    def build(cls, cfg: RouteConfig, parent: Route | None = None) -> Route:
        matchers = parse_matchers(cfg.matchers)
        key = (
            (parent.key if parent else "")
            + ("/" if parent else "")
            + ("{" + ",".join(str(m) for m in matchers) + "}")
        )

        def inherit(name: str) -> int:
            own = getattr(cfg, name)
            if own is not None:
                return parse_duration(own)
            return getattr(parent, name) if parent else parse_duration(DEFAULTS[name])

        route = cls(
            key=key,
            receiver=cfg.receiver or (parent.receiver if parent else ""),
            matchers=matchers,
            group_by=list(cfg.group_by)
            if cfg.group_by is not None
            else (parent.group_by if parent else []),
            group_wait=inherit("group_wait"),
            group_interval=inherit("group_interval"),
            repeat_interval=inherit("repeat_interval"),
            continue_=cfg.continue_,
            mute_time_intervals=list(cfg.mute_time_intervals),
            active_time_intervals=list(cfg.active_time_intervals),
        )
        seen: dict[str, int] = {}
        for child in cfg.routes:
            r = cls.build(child, route)
            # Two siblings with the same matchers would share group keys; number them.
            n = seen.get(r.key, 0)
            seen[r.key] = n + 1
            if n:
                r.key += f"#{n}"
            route.routes.append(r)
        return route

    def match(self, labels: Mapping[str, str]) -> list[Route]:
        if not match_all(self.matchers, labels):
            return []
        found: list[Route] = []
        for child in self.routes:
            hits = child.match(labels)
            found.extend(hits)
            if hits and not child.continue_:
                break
        return found or [self]

    def group_labels(self, labels: Mapping[str, str]) -> dict[str, str]:
        if "..." in self.group_by:
            return dict(labels)
        return {k: labels[k] for k in self.group_by if k in labels}


def group_key(route: Route, group_labels: Mapping[str, str]) -> str:
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(group_labels.items()))
    return f"{route.key}:{{{inner}}}"


@dataclass
class Group:
    key: str
    route: Route
    labels: dict[str, str]
    alerts: dict[str, Alert] = field(default_factory=dict)
    next_flush: int = 0
    flushed: bool = False


@dataclass
class Integration:
    """What the dispatcher needs of a delivery worker."""

    id: str  # receiver/kind[i]
    receiver: str
    send_resolved: bool
    submit: Callable[[Notification, Callable[[bool | None], None]], None]


MuteCheck = Callable[[Alert, int], bool]


def needs_update(
    entry: NflogEntry | None,
    firing: frozenset[str],
    resolved: frozenset[str],
    send_resolved: bool,
    repeat_ns: int,
    now: int,
    all_acked: bool,
) -> bool:
    """Alertmanager's deduplication decision, plus acknowledgement (no reminders)."""
    if entry is None:
        return bool(firing)
    if not firing <= entry.firing:
        return True
    if not firing:
        return bool(entry.firing)
    if send_resolved and not resolved <= entry.resolved:
        return True
    if all_acked:
        return False
    return entry.ts + repeat_ns <= now


class Dispatcher:
    def __init__(
        self,
        root: Route,
        integrations: Mapping[str, list[Integration]],
        nflog: dict[tuple[str, str], NflogEntry],
        save_nflog: Callable[[str, str, NflogEntry], None],
        muted: MuteCheck,
        external_url: str,
        on_notify: Callable[[Notification, str], None] | None = None,
        lock: threading.RLock | None = None,
        lookup: Callable[[str], Alert | None] | None = None,
        intervals: Mapping[str, Sequence[TimeInterval]] | None = None,
        on_time_muted: Callable[[Route, str], None] | None = None,
    ) -> None:
        self.lookup = lookup
        self.intervals = intervals or {}
        self.on_time_muted = on_time_muted
        self.lock = lock or threading.RLock()
        self.root = root
        self.integrations = integrations
        self.groups: dict[str, Group] = {}
        self._due: set[str] = set()
        # What was last handed to each integration (moves at submit) and what was last
        # delivered (moves on success, persisted): a failed delivery falls back to it.
        self.sent: dict[tuple[str, str], NflogEntry] = dict(nflog)
        self.delivered: dict[tuple[str, str], NflogEntry] = dict(nflog)
        self.save_nflog = save_nflog
        self.muted = muted
        self.external_url = external_url
        self.on_notify = on_notify

    def insert(self, alert: Alert, now: int) -> None:
        """An alert fired, changed or resolved: put it in its groups (see ``flush_due``)."""
        for route in self.root.match(alert.labels):
            labels = route.group_labels(alert.labels)
            key = group_key(route, labels)
            group = self.groups.get(key)
            if group is None:
                if alert.state != "firing" and not self._announced(key, alert.fingerprint):
                    continue  # a resolution nobody was told about the firing of
                group = Group(key, route, labels, next_flush=now + route.group_wait)
                self.groups[key] = group
            group.alerts[alert.fingerprint] = alert
            if now >= group.next_flush:
                self._due.add(key)

    def flush_due(self, now: int) -> None:
        """Flush the groups that became due by inserts. Called after a whole evaluation, so
        alerts raised together (a site and its devices) are seen together by inhibition."""
        due, self._due = self._due, set()
        for key in due:
            group = self.groups.get(key)
            if group is not None and group.next_flush <= now:
                self.flush(group, now)

    def remove(self, fingerprints: Iterable[str]) -> None:
        fps = set(fingerprints)
        for key in list(self.groups):
            group = self.groups[key]
            timed = group.route.mute_time_intervals or group.route.active_time_intervals
            for fp in fps & group.alerts.keys():
                if timed and group.alerts[fp].state == "resolved" and self._announced(key, fp):
                    continue  # a resolution its route's time intervals hold back: kept for it
                del group.alerts[fp]
            if not group.alerts:
                del self.groups[key]

    def _announced(self, key: str, fp: str) -> bool:
        return any(fp in entry.firing for (gk, _), entry in self.sent.items() if gk == key)

    def tick(self, now: int) -> None:
        self._due.clear()
        for group in [g for g in self.groups.values() if g.next_flush <= now]:
            self.flush(group, now)

    def flush(self, group: Group, now: int) -> None:
        route = group.route
        why = route.muted_at(self.intervals, now) if self.intervals else None
        if why is not None:  # held back, resolutions too, for the first flush after
            group.next_flush = now + route.group_interval
            if self.on_time_muted:
                self.on_time_muted(route, why)
            return
        alerts = list(group.alerts.values())
        kept = [a for a in alerts if not self.muted(a, now)]
        firing = frozenset(a.fingerprint for a in kept if a.state == "firing")
        all_acked = all(group.alerts[fp].acked_by for fp in firing) if firing else False
        for integ in self.integrations.get(route.receiver, []):
            ikey = (group.key, integ.id)
            entry = self.sent.get(ikey)
            announced = entry.firing if entry else frozenset()
            resolved = frozenset(
                a.fingerprint for a in kept if a.state == "resolved" and a.fingerprint in announced
            )
            if not kept or not needs_update(
                entry, firing, resolved, integ.send_resolved, route.repeat_interval, now, all_acked
            ):
                continue
            new = NflogEntry(firing, resolved, now)
            self.sent[ikey] = new
            snapshots = [
                self._snapshot(a)
                for a in kept
                if a.fingerprint in firing or (integ.send_resolved and a.fingerprint in resolved)
            ]
            if not snapshots:
                self._record(ikey, new, True)
                continue
            note = Notification(
                receiver=integ.receiver,
                group_key=group.key,
                group_labels=dict(group.labels),
                alerts=snapshots,
                external_url=self.external_url,
                created_ns=now,
            )
            if self.on_notify:
                self.on_notify(note, integ.id)
            integ.submit(note, self._callback(ikey, new))
        # A resolution, once handed out, leaves the group; an empty group ends.
        for a in alerts:
            if a.state == "resolved":
                del group.alerts[a.fingerprint]
        group.flushed = True
        group.next_flush = now + route.group_interval
        if not group.alerts:
            del self.groups[group.key]

    def _callback(self, ikey: tuple[str, str], entry: NflogEntry) -> Callable[[bool | None], None]:
        return lambda ok: self._done(ikey, entry, ok)

    def _done(self, ikey: tuple[str, str], entry: NflogEntry, ok: bool | None) -> None:
        if ok is None:
            return
        with self.lock:
            self._record(ikey, entry, ok)

    def _record(self, ikey: tuple[str, str], entry: NflogEntry, ok: bool) -> None:
        if ok:
            self.delivered[ikey] = entry
            self.save_nflog(ikey[0], ikey[1], entry)
        elif self.sent.get(ikey) is entry:
            # Gave up: forget that we told it, so the next flush of the group tries again.
            previous = self.delivered.get(ikey)
            if previous is None:
                self.sent.pop(ikey, None)
            else:
                self.sent[ikey] = previous
            # Resolutions left their group when handed out; put them back so the next
            # flush carries them again.
            for fp in entry.resolved:
                alert = self.lookup(fp) if self.lookup else None
                if alert is not None and alert.state == "resolved":
                    self.insert(alert, entry.ts)

    def _snapshot(self, a: Alert) -> AlertSnapshot:
        return AlertSnapshot(
            fingerprint=a.fingerprint,
            status=a.state,
            labels=dict(a.labels),
            annotations=dict(a.annotations),
            starts_at=a.starts_at or a.active_at,
            ends_at=a.ends_at if a.state == "resolved" else None,
            generator_url=f"{self.external_url.rstrip('/')}/api/v1/alerts/{a.fingerprint}"
            if self.external_url
            else "",
        )
