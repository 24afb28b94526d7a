"""The alerting service: rules, engine, dispatcher, silences and notifiers wired together.

One instance per cloud service (``Services`` owns it). Inputs come in three ways:
``observe_readings`` (an ingest pipeline hook), ``observe_anomalies`` (from the
detectors) and ``tick`` (time: offline, no data, ``for``, group timers), which a
background thread calls every ``tick_interval_s`` once ``start()`` ran. Everything the
API needs is a method here. One lock orders all state changes; notifications leave
through per-integration worker threads, so no receiver can slow the engine down.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from millstream_cloud.alerts.clock import Clock, SystemClock
from millstream_cloud.alerts.engine import AlertEngine, DeviceLike
from millstream_cloud.alerts.inhibit import Inhibitor, InhibitRule
from millstream_cloud.alerts.labels import match_all, parse_duration, parse_matchers
from millstream_cloud.alerts.metrics import AlertMetrics
from millstream_cloud.alerts.notifiers.base import Notification, NotifierContext, notifier_types
from millstream_cloud.alerts.notifiers.delivery import IntegrationWorker, RetryPolicy
from millstream_cloud.alerts.routing import Dispatcher, Integration, Route
from millstream_cloud.alerts.rules import AnyRule, RuleError, load_rule_files, parse_rule
from millstream_cloud.alerts.settings import AlertSettings
from millstream_cloud.alerts.silences import Silence, Silences
from millstream_cloud.alerts.store import Alert, AlertStore
from millstream_cloud.alerts.timeintervals import parse_interval
from millstream_cloud.model import Anomaly, Reading
from millstream_cloud.storage.base import ALERTS, Point, Storage

log = logging.getLogger("millstream.alerts")


def alert_point(event: Mapping[str, Any]) -> Point:
    """One alert transition in the ``alerts`` measurement (what the dashboards query):
    tags alertname, site, device, metric, severity, state; fields value, summary,
    fingerprint."""
    labels = event["labels"]
    tags = {"alertname": labels.get("alertname", ""), "state": event["state"]}
    for key in ("site", "device", "metric", "severity"):
        if labels.get(key):
            tags[key] = labels[key]
    value = event.get("value")
    fields: dict[str, Any] = {
        "value": float(value) if isinstance(value, (int, float)) else 1.0,
        "summary": event["annotations"].get("summary", ""),
        "fingerprint": event["fingerprint"],
    }
    return Point(ALERTS, tags, fields, event["time_ns"])


class RuleConflict(Exception):
    """A rule name that exists (create) or does not (update), or a file-defined rule."""


class AlertService:
    def __init__(
        self,
        settings: AlertSettings,
        data_dir: str | Path,
        devices: Callable[[], Iterable[DeviceLike]] | None = None,
        metrics_registry: CollectorRegistry | None = None,
        clock: Clock | None = None,
        config_dir: str | Path | None = None,
        storage: Storage | None = None,
    ) -> None:
        self.settings = settings
        self.storage = storage
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self._events: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=100_000)
        self._event_thread = threading.Thread(
            target=self._event_loop, name="alerts-events", daemon=True
        )
        # First, so a bad rules file stops the start before any thread or file is opened.
        self.file_rules = load_rule_files(
            settings.rule_files, Path(config_dir) if config_dir else None
        )
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.devices = devices or (lambda: ())
        self.clock = clock or SystemClock()
        self.metrics = AlertMetrics(metrics_registry)
        self.lock = threading.RLock()
        self.store = AlertStore(self.data_dir / "alerts.db", settings.history_max)
        self.silences = Silences(self.store)
        self.inhibitor = Inhibitor(InhibitRule.from_config(c) for c in settings.inhibit_rules)
        self.resolved_retention_ns = parse_duration(settings.resolved_retention)
        self.workers: list[IntegrationWorker] = []
        self.notified: list[tuple[str, Notification]] = []  # the last few, for a summary
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        integrations = self._integrations()
        self.engine = AlertEngine(
            self.store,
            self.metrics,
            on_change=self._on_change,
            resolved_retention_ns=self.resolved_retention_ns,
            on_forget=self._on_forget,
            grafana_url=settings.grafana_url,
        )
        self.dispatcher = Dispatcher(
            Route.build(settings.route),
            integrations,
            self.store.load_nflog(),
            self.store.save_nflog,
            self._muted,
            settings.external_url,
            on_notify=self._on_notify,
            lock=self.lock,
            lookup=lambda fp: self.engine.alerts.get(fp),
            intervals={
                t.name: [parse_interval(i.model_dump()) for i in t.time_intervals]
                for t in settings.time_intervals
            },
            on_time_muted=lambda route, why: self.metrics.time_muted.labels(
                route.receiver, why
            ).inc(),
        )
        self.api_rules: dict[str, AnyRule] = {}
        for body in self.store.load_rules():
            try:
                rule = parse_rule(body)
            except RuleError as exc:
                log.error("stored rule %r is no longer valid, skipped: %s", body.get("name"), exc)
                continue
            if rule.name in self.file_rules:
                log.warning("rule %r from the API is shadowed by a rule file", rule.name)
                continue
            self.api_rules[rule.name] = rule
        now = self.clock.now_ns()
        with self.lock:
            self.engine.set_rules(self._all_rules(), now)
            self._restore(now)
            with self.store.transaction():  # after the engine's commit
                self.dispatcher.flush_due(now)
        self._event_thread.start()

    @classmethod
    def for_services(
        cls, services: Any, settings: AlertSettings, clock: Clock | None = None
    ) -> AlertService:
        """Build one for a ``Services`` and hook it in: readings from the ingest pipeline,
        anomalies from the anomaly sink, devices from the registry, metrics and the
        ``alerts`` measurement into the service's registry and storage; reachable as
        ``services.alerts`` (when Services has that field) and ``services.extras["alerts"]``."""
        svc = cls(
            settings,
            services.settings.data_path,
            devices=services.registry.all,
            metrics_registry=services.metrics.registry,
            clock=clock,
            storage=getattr(services, "storage", None),
        )
        services.pipeline.hooks.append(svc.observe_readings)
        anomalies = getattr(services, "anomalies", None)
        if anomalies is not None and hasattr(anomalies, "hooks"):
            anomalies.hooks.append(svc.observe_anomalies)
            anomalies.silencer = svc  # maintenance windows silence their device's alerts
            if hasattr(anomalies, "holds"):  # anomaly alerts fire while still out of line
                svc.engine.held = anomalies.holds
        services.extras["alerts"] = svc
        if hasattr(services, "alerts"):
            services.alerts = svc
        return svc

    # wiring
    def _integrations(self) -> dict[str, list[Integration]]:
        types = notifier_types()
        policy = RetryPolicy(
            self.settings.delivery.max_attempts,
            self.settings.delivery.backoff_initial_s,
            self.settings.delivery.backoff_max_s,
        )
        context = NotifierContext(self.data_dir, self.settings.delivery.timeout_s)
        out: dict[str, list[Integration]] = {}
        for receiver in self.settings.receivers:
            counts: dict[str, int] = {}
            for kind, raw in receiver.integrations():
                cls = types[kind]
                config = cls.Config.model_validate(raw)
                i = counts.get(kind, 0)
                counts[kind] = i + 1
                worker = IntegrationWorker(
                    receiver.name, f"{kind}[{i}]", cls(config, context), policy, self.metrics
                )
                self.workers.append(worker)
                out.setdefault(receiver.name, []).append(
                    Integration(worker.id, receiver.name, config.send_resolved, worker.submit)
                )
        if self.settings.webhook:
            name = self.settings.route.receiver or ""
            config = types["webhook"].Config.model_validate({"url": self.settings.webhook})
            worker = IntegrationWorker(
                name, "webhook[shortcut]", types["webhook"](config, context), policy, self.metrics
            )
            self.workers.append(worker)
            out.setdefault(name, []).append(Integration(worker.id, name, True, worker.submit))
        return out

    def _all_rules(self) -> dict[str, AnyRule]:
        rules = {name: rule for name, (rule, _) in self.file_rules.items()}
        rules.update(self.api_rules)
        return rules

    def _restore(self, now: int) -> None:
        """After a restart: put firing and recently resolved alerts back into groups."""
        for alert in sorted(self.engine.alerts.values(), key=lambda a: a.active_at):
            if alert.state in ("firing", "resolved"):
                self.dispatcher.insert(alert, now)

    def _on_change(self, alert: Alert, now: int) -> None:
        self.dispatcher.insert(alert, now)
        if self.storage is not None or self.listeners:
            event = {
                "time_ns": now,
                "fingerprint": alert.fingerprint,
                "state": alert.state,
                "labels": dict(alert.labels),
                "annotations": dict(alert.annotations),
                "value": alert.value,
                "starts_at": alert.starts_at,
                "ends_at": alert.ends_at,
            }
            try:
                self._events.put_nowait(event)
            except queue.Full:
                log.warning("alert event queue full; %s %s not recorded", alert.name, alert.state)

    def _event_loop(self) -> None:
        """Alert transitions to the ``alerts`` measurement and to listeners (Grafana
        annotations), off the engine's path so a slow store or Grafana delays nobody."""
        while True:
            first = self._events.get()
            batch = [first]
            while len(batch) < 1000:
                try:
                    batch.append(self._events.get_nowait())
                except queue.Empty:
                    break
            events = [e for e in batch if e is not None]
            try:
                if events and self.storage is not None:
                    self.storage.write_points([alert_point(e) for e in events])
            except Exception:
                log.exception("writing %d alert events to storage failed", len(events))
            for e in events:
                for listener in self.listeners:
                    try:
                        listener(e)
                    except Exception:
                        log.exception("alert listener %r failed", listener)
            for _ in batch:
                self._events.task_done()
            if first is None or None in batch:
                return

    def _on_forget(self, fingerprints: list[str]) -> None:
        self.dispatcher.remove(fingerprints)

    def _on_notify(self, note: Notification, integration: str) -> None:
        for a in note.alerts:
            alert = self.engine.alerts.get(a.fingerprint)
            if alert is not None:
                self.store.add_history(
                    note.created_ns,
                    alert,
                    "notified",
                    {"receiver": note.receiver, "integration": integration, "status": a.status},
                )
        self.notified.append((integration, note))
        del self.notified[:-50]

    def _muted(self, alert: Alert, now: int) -> bool:
        return bool(self.silenced_by(alert, now) or self.inhibited_by(alert))

    def silenced_by(self, alert: Alert, now: int) -> list[str]:
        return self.silences.muting(alert.labels, now)

    def inhibited_by(self, alert: Alert) -> str | None:
        if not self.inhibitor.rules:
            return None
        with self.lock:
            self.inhibitor.refresh(
                (a for a in self.engine.alerts.values() if a.state == "firing"),
                self.engine.version,
            )
            return self.inhibitor.inhibited_by(alert.labels, alert.fingerprint)

    # inputs
    def now(self) -> int:
        return self.clock.now_ns()

    def observe_readings(self, readings: Sequence[Reading]) -> None:
        """Pipeline hook: every stored group of readings."""
        if not self.settings.enabled or not readings:
            return
        with self.lock:
            now = self.clock.now_ns()
            with self.store.transaction():
                self.engine.observe_readings(readings, now)
            with self.store.transaction():  # after the engine's commit
                self.dispatcher.flush_due(now)

    def observe_anomalies(self, anomalies: Sequence[Anomaly]) -> None:
        if not self.settings.enabled or not anomalies:
            return
        with self.lock:
            now = self.clock.now_ns()
            with self.store.transaction():
                self.engine.observe_anomalies(anomalies, now)
            with self.store.transaction():  # after the engine's commit
                self.dispatcher.flush_due(now)

    def tick(self, now: int | None = None) -> None:
        """Evaluate time-based rules and group timers (the background thread calls this)."""
        if not self.settings.enabled:
            return
        now = self.clock.now_ns() if now is None else now
        devices = list(self.devices())
        with self.lock:
            with self.store.transaction():
                self.engine.evaluate_time(now, devices)
            with self.store.transaction():
                self.dispatcher.tick(now)
            muted = {"silenced": 0, "inhibited": 0}
            for a in self.engine.alerts.values():
                if a.state == "firing":
                    if self.silenced_by(a, now):
                        muted["silenced"] += 1
                    elif self.inhibited_by(a):
                        muted["inhibited"] += 1
            for reason, n in muted.items():
                self.metrics.muted.labels(reason).set(n)

    # background thread
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="alerts-tick", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last_gc = 0.0
        while not self._stop.wait(self.settings.tick_interval_s):
            try:
                self.tick()
                if time.monotonic() - last_gc > 60:
                    last_gc = time.monotonic()
                    now = self.clock.now_ns()
                    self.silences.gc(now - 7 * 86400 * 10**9)
                    self.store.delete_nflog_before(now - 7 * 86400 * 10**9)
            except Exception:
                log.exception("alert evaluation failed")

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Block until every queued notification is delivered or given up and every alert
        event is recorded (tests, bench)."""
        deadline = time.monotonic() + timeout
        while self._events.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)
        return all(w.wait_idle(max(0.0, deadline - time.monotonic())) for w in self.workers)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        for w in self.workers:
            w.stop()
        if self._event_thread.is_alive():
            self._events.put(None)
            self._event_thread.join(timeout=5)
        self.store.close()

    # queries and actions for the API
    def list_alerts(
        self,
        state: str | None = None,
        matchers: Sequence[str] = (),
        silenced: bool | None = None,
        inhibited: bool | None = None,
        acknowledged: bool | None = None,
    ) -> list[dict[str, Any]]:
        parsed = parse_matchers(matchers)
        now = self.clock.now_ns()
        with self.lock:
            out = []
            for a in self.engine.alerts.values():
                if state is not None and a.state != state:
                    continue
                if parsed and not match_all(parsed, a.labels):
                    continue
                row = self.alert_json(a, now)
                status = row["status"]
                if silenced is not None and bool(status["silencedBy"]) != silenced:
                    continue
                if inhibited is not None and bool(status["inhibitedBy"]) != inhibited:
                    continue
                if acknowledged is not None and bool(a.acked_by) != acknowledged:
                    continue
                out.append(row)
        out.sort(
            key=lambda r: (
                r["state"] != "firing",
                r["labels"].get("alertname", ""),
                r["fingerprint"],
            )
        )
        return out

    def get_alert(self, fp: str) -> dict[str, Any] | None:
        with self.lock:
            a = self.engine.alerts.get(fp)
            return None if a is None else self.alert_json(a, self.clock.now_ns())

    def alert_json(self, a: Alert, now: int) -> dict[str, Any]:
        from millstream_cloud.timeutil import rfc3339

        silenced = self.silenced_by(a, now) if a.state != "resolved" else []
        inhibited = self.inhibited_by(a) if a.state != "resolved" else None
        routes = self.dispatcher.root.match(a.labels)
        receivers = sorted({r.receiver for r in routes})
        # The time intervals holding back the alert's routes now (Alertmanager's mutedBy).
        held = (r.muted_at(self.dispatcher.intervals, now) for r in routes)
        muted = sorted({h for h in held if h is not None}) if a.state != "resolved" else []
        return {
            "fingerprint": a.fingerprint,
            "rule": a.rule,
            "state": a.state,
            "labels": a.labels,
            "annotations": a.annotations,
            "value": a.value,
            "activeAt": rfc3339(a.active_at),
            "startsAt": rfc3339(a.starts_at) if a.starts_at else None,
            "endsAt": rfc3339(a.ends_at) if a.ends_at else None,
            "receivers": receivers,
            "status": {
                "silencedBy": silenced,
                "inhibitedBy": [inhibited] if inhibited else [],
                "mutedBy": muted,
                "acknowledged": bool(a.acked_by),
            },
            "acknowledgement": (
                {"by": a.acked_by, "at": rfc3339(a.acked_at or 0), "comment": a.ack_comment or ""}
                if a.acked_by
                else None
            ),
        }

    def acknowledge(self, fp: str, by: str, comment: str = "") -> dict[str, Any] | None:
        """Someone is on it: no more reminders (repeat_interval) for it; resolution still goes out."""
        now = self.clock.now_ns()
        with self.lock:
            a = self.engine.alerts.get(fp)
            if a is None:
                return None
            if a.state == "resolved":
                raise ValueError("the alert is resolved; nothing to acknowledge")
            a.acked_by, a.acked_at, a.ack_comment = by, now, comment
            self.store.save_alert(a)
            self.store.add_history(now, a, "acknowledged", {"by": by, "comment": comment})
            return self.alert_json(a, now)

    def unacknowledge(self, fp: str, by: str = "") -> dict[str, Any] | None:
        now = self.clock.now_ns()
        with self.lock:
            a = self.engine.alerts.get(fp)
            if a is None:
                return None
            a.acked_by = a.acked_at = a.ack_comment = None
            self.store.save_alert(a)
            self.store.add_history(now, a, "unacknowledged", {"by": by})
            return self.alert_json(a, now)

    def history(self, **kwargs: Any) -> list[dict[str, Any]]:
        return self.store.history(**kwargs)

    # rules
    def rules(self) -> list[dict[str, Any]]:
        out = [{**rule.to_dict(), "source": src} for rule, src in self.file_rules.values()]
        out += [{**rule.to_dict(), "source": "api"} for rule in self.api_rules.values()]
        return sorted(out, key=lambda r: r["name"])

    def rule(self, name: str) -> dict[str, Any] | None:
        if name in self.file_rules:
            rule, src = self.file_rules[name]
            return {**rule.to_dict(), "source": src}
        if name in self.api_rules:
            return {**self.api_rules[name].to_dict(), "source": "api"}
        return None

    def put_rule(
        self, body: Mapping[str, Any], create: bool, name: str | None = None
    ) -> dict[str, Any]:
        """Create (``create``) or replace rule ``name``; RuleError names bad fields."""
        data = dict(body)
        if name is not None:
            data.setdefault("name", name)
            if data["name"] != name:
                raise RuleError([("name", f"must be {name!r}, as in the URL")])
        rule = parse_rule(data)
        with self.lock:
            if rule.name in self.file_rules:
                raise RuleConflict(
                    f"rule {rule.name!r} is defined in {self.file_rules[rule.name][1]}; edit that file"
                )
            if create and rule.name in self.api_rules:
                raise RuleConflict(
                    f"rule {rule.name!r} exists; PUT /api/v1/rules/{rule.name} replaces it"
                )
            if not create and rule.name not in self.api_rules:
                raise KeyError(rule.name)
            now = self.clock.now_ns()
            self.store.save_rule(rule.name, rule.to_dict(), now)
            self.api_rules[rule.name] = rule
            with self.store.transaction():
                self.engine.set_rules(self._all_rules(), now)
            with self.store.transaction():  # after the engine's commit
                self.dispatcher.flush_due(now)
        return {**rule.to_dict(), "source": "api"}

    def delete_rule(self, name: str) -> None:
        with self.lock:
            if name in self.file_rules:
                raise RuleConflict(
                    f"rule {name!r} is defined in {self.file_rules[name][1]}; edit that file"
                )
            if name not in self.api_rules:
                raise KeyError(name)
            del self.api_rules[name]
            self.store.delete_rule(name)
            now = self.clock.now_ns()
            with self.store.transaction():
                self.engine.set_rules(self._all_rules(), now)
            with self.store.transaction():  # after the engine's commit
                self.dispatcher.flush_due(now)

    # silences
    def silence_json(self, s: Silence) -> dict[str, Any]:
        from millstream_cloud.timeutil import rfc3339

        return {
            "id": s.id,
            "matchers": [m.to_dict() for m in s.matchers],
            "matchersText": [str(m) for m in s.matchers],
            "startsAt": rfc3339(s.starts_at),
            "endsAt": rfc3339(s.ends_at),
            "createdBy": s.created_by,
            "comment": s.comment,
            "updatedAt": rfc3339(s.updated_at),
            "status": {"state": s.state(self.clock.now_ns())},
        }

    def create_silence(
        self,
        matchers: list[Any],
        created_by: str,
        comment: str,
        starts_at: int | None = None,
        ends_at: int | None = None,
        duration: str | None = None,
        silence_id: str | None = None,
    ) -> Silence:
        now = self.clock.now_ns()
        start = now if starts_at is None else starts_at
        if ends_at is None:
            ends_at = start + parse_duration(duration or "1h")
        with self.lock:
            return self.silences.create(
                matchers, start, ends_at, created_by, comment, now, silence_id
            )

    def expire_silence(self, silence_id: str) -> Silence:
        with self.lock:
            return self.silences.expire(silence_id, self.clock.now_ns())
