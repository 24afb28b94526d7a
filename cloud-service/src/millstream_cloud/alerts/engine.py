"""Alert lifecycle: rules evaluated on readings, anomalies and time; alerts move
pending -> firing -> resolved.

An alert's identity is the fingerprint of its labels (``alertname`` = the rule name,
``device``, ``site``, ``metric`` as they apply, and the rule's own labels). A condition
that starts to hold makes the alert ``pending``; held for the rule's ``for`` it becomes
``firing`` (at once with ``for: 0s``); when it stops holding (after ``keep_firing_for``)
a firing alert is ``resolved`` and a pending one simply ends. A resolved alert that
starts again begins a new pending period under the same fingerprint.

Every transition is written to the store before anyone is notified, so a restart finds
the alert where it was. The engine has no clock of its own: every call gets ``now``.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol
from urllib.parse import urlencode

from millstream_cloud.alerts.labels import fingerprint, match_all, parse_duration, render
from millstream_cloud.alerts.metrics import AlertMetrics
from millstream_cloud.alerts.rules import (
    AnomalyRule,
    AnyRule,
    NoDataRule,
    OfflineRule,
    RateOfChangeRule,
    ThresholdRule,
)
from millstream_cloud.alerts.store import Alert, AlertStore
from millstream_cloud.model import Anomaly, Reading
from millstream_cloud.timeutil import rfc3339

log = logging.getLogger("millstream.alerts.engine")

ACTIVE = ("pending", "firing")

DEFAULT_SUMMARY = {
    "threshold": "{metric} on {device} is {value:.4g} ({op} {threshold:g})",
    "rate_of_change": "{metric} on {device} changes by {value:.4g} per {per} ({op} {threshold:g})",
    "anomaly": "anomaly on {device}{metric_suffix}: {explanation}",
    "offline": "{device} is offline",
    "offline_site": "site {site} is offline: no device reachable",
    "no_data": "no {metric} from {device} for {after}",
}


class DeviceLike(Protocol):
    id: str
    site: str
    online: bool
    last_seen_ns: int | None


class AlertEngine:
    def __init__(
        self,
        store: AlertStore,
        metrics: AlertMetrics,
        on_change: Callable[[Alert, int], None],
        resolved_retention_ns: int = 3600 * 10**9,
        on_forget: Callable[[list[str]], None] | None = None,
        grafana_url: str | None = None,
    ) -> None:
        self.store = store
        self.grafana_url = (grafana_url or "").rstrip("/")
        self.metrics = metrics
        self.on_change = on_change
        self.on_forget = on_forget
        self.resolved_retention_ns = resolved_retention_ns
        # Whether the detectors still hold a (device, metric) out of line: an anomaly alert
        # on it does not resolve meanwhile (the detectors report an incident once).
        self.held: Callable[[str, str], bool] | None = None
        self.rules: dict[str, AnyRule] = {}
        self.alerts: dict[str, Alert] = {a.fingerprint: a for a in store.load_alerts()}
        self._by_metric: dict[str, list[AnyRule]] = {}
        self._anomaly: list[AnomalyRule] = []
        self._offline: list[OfflineRule] = []
        self._no_data: list[NoDataRule] = []
        self._ident: dict[
            tuple[str, str | None, str | None, str | None], tuple[dict[str, str], str]
        ] = {}
        self._last_seen: dict[tuple[str, str, str], tuple[int, str]] = {}
        self._recent: dict[tuple[str, str, str], deque[tuple[int, float]]] = {}
        self._clearing: set[str] = set()
        self.version = 0  # moves with every state change (caches key on it)

    # rules
    def set_rules(self, rules: Mapping[str, AnyRule], now: int) -> None:
        """Install a new rule set; alerts of removed or changed rules end."""
        old = self.rules
        changed = {n for n, r in old.items() if n not in rules or rules[n] != r}
        self.rules = {n: r for n, r in rules.items() if r.enabled}
        changed |= {n for n, r in rules.items() if not r.enabled}
        for alert in list(self.alerts.values()):
            if alert.rule in changed and alert.state in ACTIVE:
                self._end(alert, now, reason="rule changed or removed")
        self._by_metric = {}
        self._anomaly, self._offline, self._no_data = [], [], []
        for rule in self.rules.values():
            if isinstance(rule, (ThresholdRule, RateOfChangeRule, NoDataRule)):
                self._by_metric.setdefault(rule.metric, []).append(rule)
            if isinstance(rule, AnomalyRule):
                self._anomaly.append(rule)
            elif isinstance(rule, OfflineRule):
                self._offline.append(rule)
            elif isinstance(rule, NoDataRule):
                self._no_data.append(rule)
        self._ident.clear()
        for key in [k for k in self._last_seen if k[0] in changed]:
            del self._last_seen[key]
        for key in [k for k in self._recent if k[0] in changed]:
            del self._recent[key]

    # identity and templates
    def _identity(
        self, rule: AnyRule, device: str | None, site: str | None, metric: str | None
    ) -> tuple[dict[str, str], str]:
        key = (rule.name, device, site, metric)
        hit = self._ident.get(key)
        if hit is not None:
            return hit
        labels = {"alertname": rule.name}
        if device:
            labels["device"] = device
        if site:
            labels["site"] = site
        if metric:
            labels["metric"] = metric
        values = self._values(rule, labels, {})
        for name, template in rule.labels.items():
            labels[name] = render(template, values)
        result = (labels, fingerprint(labels))
        if len(self._ident) > 200_000:
            self._ident.clear()
        self._ident[key] = result
        return result

    @staticmethod
    def _values(
        rule: AnyRule, labels: Mapping[str, str], extra: Mapping[str, Any]
    ) -> dict[str, Any]:
        values: dict[str, Any] = {
            "alertname": rule.name,
            "device": labels.get("device", ""),
            "site": labels.get("site", ""),
            "metric": labels.get("metric", ""),
            "severity": labels.get("severity", ""),
            "labels": dict(labels),
            "threshold": getattr(rule, "threshold", None),
            "clear": getattr(rule, "clear", None),
            "op": getattr(rule, "op", ""),
            "per": getattr(rule, "per", ""),
            "after": getattr(rule, "after", ""),
            "value": None,
            "explanation": "",
        }
        values.update(extra)
        values["metric_suffix"] = f" ({values['metric']})" if values["metric"] else ""
        return values

    def _annotate(self, rule: AnyRule, alert: Alert, extra: Mapping[str, Any]) -> None:
        values = self._values(rule, alert.labels, {"value": alert.value, **extra})
        values["dashboard_url"] = self._dashboard_url(alert, extra.get("anomaly_ns"))
        templates = dict(rule.annotations)
        if "summary" not in templates:
            kind: str = rule.type
            if isinstance(rule, OfflineRule) and rule.scope == "site":
                kind = "offline_site"
            templates["summary"] = DEFAULT_SUMMARY[kind]
        if values["dashboard_url"] and "dashboard_url" not in templates:
            templates["dashboard_url"] = "{dashboard_url}"
        alert.annotations = {k: render(t, values) for k, t in templates.items()}

    def _dashboard_url(self, alert: Alert, since_ns: int | None) -> str:
        """The Grafana dashboard an ops engineer opens first: the device's (its metric
        chosen), or the site's fleet for a site-wide alert, from an hour before the
        condition (or the anomaly it reports, which a replay may date earlier) to its
        end, or now while it lasts. Empty without ``grafana_url``."""
        device, site, metric = (alert.labels.get(k, "") for k in ("device", "site", "metric"))
        if not self.grafana_url or not (device or site):
            return ""
        params = {"var-site": site} if site else {}
        if device:
            params["var-device"] = device
            if metric:
                params["var-metric"] = metric
        start = min(alert.active_at, since_ns) if since_ns else alert.active_at
        params["from"] = str(start // 10**6 - 3_600_000)
        params["to"] = str(alert.ends_at // 10**6 + 900_000) if alert.ends_at else "now"
        uid = "millstream-device" if device else "millstream-fleet"
        return f"{self.grafana_url}/d/{uid}?{urlencode(params)}"

    # transitions
    def _condition(
        self,
        rule: AnyRule,
        labels: dict[str, str],
        fp: str,
        holds: bool,
        now: int,
        value: float | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        alert = self.alerts.get(fp)
        if not holds:
            if alert is None or alert.state == "resolved":
                return
            if alert.state == "pending":
                self._end(alert, now)
                return
            keep = rule.keep_firing_ns
            if keep and alert.last_true_at is not None and now - alert.last_true_at < keep:
                self._clearing.add(fp)
                return
            if value is not None:
                alert.value = value
            self._end(alert, now, extra=extra)
            return
        if alert is None or alert.state == "resolved":
            alert = Alert(fp, rule.name, labels, {}, "pending", active_at=now)
            self.alerts[fp] = alert
            alert.value = value
            alert.last_true_at = now
            self._annotate(rule, alert, extra or {})
            self._record(alert, now, "pending")
        alert.last_true_at = now
        alert.value = value
        self._clearing.discard(fp)
        if alert.state == "pending" and now - alert.active_at >= rule.for_ns:
            self._fire(rule, alert, now, extra or {})
        elif isinstance(rule, AnomalyRule):
            alert.extra.update(extra or {})
            self.store.save_alert(alert)

    def _fire(self, rule: AnyRule, alert: Alert, now: int, extra: Mapping[str, Any]) -> None:
        alert.state = "firing"
        alert.starts_at = now
        alert.ends_at = None
        alert.acked_by = alert.acked_at = alert.ack_comment = None
        self._annotate(rule, alert, {**alert.extra, **extra})
        self._record(alert, now, "firing")
        self.on_change(alert, now)

    def _end(
        self, alert: Alert, now: int, reason: str = "", extra: Mapping[str, Any] | None = None
    ) -> None:
        self._clearing.discard(alert.fingerprint)
        if alert.state == "pending":
            del self.alerts[alert.fingerprint]
            self.store.delete_alerts([alert.fingerprint])
            self.metrics.transitions.labels(alert.rule, "inactive").inc()
            self.store.add_history(now, alert, "inactive", {"reason": reason} if reason else None)
            return
        alert.state = "resolved"
        alert.ends_at = now
        rule = self.rules.get(alert.rule)
        if rule is not None:
            self._annotate(rule, alert, {**alert.extra, **(extra or {})})
        self._record(alert, now, "resolved", {"reason": reason} if reason else None)
        self.on_change(alert, now)

    def _record(
        self, alert: Alert, now: int, event: str, detail: dict[str, Any] | None = None
    ) -> None:
        self.version += 1
        self.store.save_alert(alert)
        self.metrics.transitions.labels(alert.rule, event).inc()
        info = {"value": alert.value, **(detail or {})}
        self.store.add_history(now, alert, event, info)
        log.info(
            "alert %s %s %s (value %s)",
            alert.name,
            ",".join(f"{k}={v}" for k, v in sorted(alert.labels.items()) if k != "alertname"),
            event,
            alert.value,
        )

    # inputs
    def observe_readings(self, readings: Sequence[Reading], now: int) -> None:
        by_metric = self._by_metric
        if not by_metric:
            return
        for r in readings:
            rules = by_metric.get(r.metric)
            if not rules:
                continue
            for rule in rules:
                if rule.matchers and not match_all(
                    rule.series_matchers, {"device": r.device, "site": r.site, "metric": r.metric}
                ):
                    continue
                labels, fp = self._identity(rule, r.device, r.site, r.metric)
                if isinstance(rule, ThresholdRule):
                    alert = self.alerts.get(fp)
                    active = alert is not None and alert.state in ACTIVE
                    holds = rule.breached(r.value, active)
                    if holds or active:
                        self._condition(rule, labels, fp, holds, now, r.value)
                elif isinstance(rule, RateOfChangeRule):
                    self._rate(rule, labels, fp, r, now)
                elif isinstance(rule, NoDataRule):
                    self._last_seen[(rule.name, r.device, r.metric)] = (now, r.site)
                    alert = self.alerts.get(fp)
                    if alert is not None and alert.state in ACTIVE:
                        self._condition(rule, labels, fp, False, now)

    def _rate(
        self, rule: RateOfChangeRule, labels: dict[str, str], fp: str, r: Reading, now: int
    ) -> None:
        key = (rule.name, r.device, r.metric)
        window = parse_duration(rule.window)
        recent = self._recent.setdefault(key, deque())
        if recent and r.time_ns <= recent[-1][0]:
            return  # late or repeated reading: rates need time order
        recent.append((r.time_ns, r.value))
        while len(recent) > 2 and recent[-1][0] - recent[1][0] >= window:
            recent.popleft()
        if len(recent) < 2:
            return
        (t0, v0), (t1, v1) = recent[0], recent[-1]
        rate = (v1 - v0) / (t1 - t0) * parse_duration(rule.per)
        alert = self.alerts.get(fp)
        active = alert is not None and alert.state in ACTIVE
        holds = rule.breached(rate, active)
        if holds or active:
            self._condition(rule, labels, fp, holds, now, rate)

    def observe_anomalies(self, anomalies: Iterable[Anomaly], now: int) -> None:
        for a in anomalies:
            for rule in self._anomaly:
                if a.likelihood < rule.min_likelihood:
                    continue
                if rule.detector and a.detector != rule.detector:
                    continue
                if rule.metric and a.metric != rule.metric:
                    continue
                series = {"device": a.device, "site": a.site, "metric": a.metric or ""}
                if rule.matchers and not match_all(rule.series_matchers, series):
                    continue
                labels, fp = self._identity(rule, a.device, a.site, a.metric)
                explanation = a.explanation or ", ".join(
                    f"{c.metric}={c.value:.4g} (normal {c.expected:.4g}, {c.sigma:+.1f} sigma)"
                    for c in a.contributions
                )
                extra = {
                    "explanation": explanation,
                    "detector": a.detector,
                    "likelihood": a.likelihood,
                    "score": a.score,
                    # with the device and metric labels, what a verdict needs to name it
                    "anomaly_time": rfc3339(a.time_ns),
                    "anomaly_ns": a.time_ns,
                }
                self._condition(rule, labels, fp, True, now, a.likelihood, extra)

    def _held(self, alert: Alert) -> bool:
        labels = alert.labels
        return self.held is not None and self.held(
            labels.get("device", ""), labels.get("metric", "")
        )

    def evaluate_time(self, now: int, devices: Iterable[DeviceLike]) -> None:
        """Everything that changes with time alone: offline, no data, expiries, ``for``."""
        if self._offline:
            self._offline_rules(now, list(devices))
        for nd in self._no_data:
            after = parse_duration(nd.after)
            for (name, device, metric), (seen, site) in list(self._last_seen.items()):
                if name != nd.name:
                    continue
                labels, fp = self._identity(nd, device, site, metric)
                silent = now - seen >= after
                alert = self.alerts.get(fp)
                if silent or (alert is not None and alert.state in ACTIVE):
                    self._condition(nd, labels, fp, silent, now)
        for alert in list(self.alerts.values()):
            rule = self.rules.get(alert.rule)
            if rule is None:
                if alert.state in ACTIVE:
                    self._end(alert, now, reason="rule removed")
                continue
            if isinstance(rule, AnomalyRule) and alert.state in ACTIVE:
                last = alert.last_true_at or alert.active_at
                if now - last >= parse_duration(rule.resolve_after) and not self._held(alert):
                    self._condition(rule, alert.labels, alert.fingerprint, False, now)
                    continue
            if alert.state == "pending" and now - alert.active_at >= rule.for_ns:
                self._fire(rule, alert, now, {})
            elif alert.fingerprint in self._clearing and alert.state == "firing":
                last = alert.last_true_at or alert.active_at
                if now - last >= rule.keep_firing_ns:
                    self._end(alert, now)
        self._gc(now)
        counts = {"pending": 0, "firing": 0, "resolved": 0}
        for alert in self.alerts.values():
            counts[alert.state] = counts.get(alert.state, 0) + 1
        for state, n in counts.items():
            self.metrics.alerts.labels(state).set(n)
        self.metrics.firing.set(counts["firing"])

    def _offline_rules(self, now: int, devices: list[DeviceLike]) -> None:
        for rule in self._offline:
            stale = parse_duration(rule.stale_after) if rule.stale_after else None

            def offline(d: DeviceLike, stale: int | None = stale) -> bool:
                if not d.online:
                    return True
                if stale is None:
                    return False
                return d.last_seen_ns is None or now - d.last_seen_ns > stale

            if rule.scope == "device":
                for d in devices:
                    if rule.matchers and not match_all(
                        rule.series_matchers, {"device": d.id, "site": d.site}
                    ):
                        continue
                    labels, fp = self._identity(rule, d.id, d.site, None)
                    down = offline(d)
                    alert = self.alerts.get(fp)
                    if down or (alert is not None and alert.state in ACTIVE):
                        self._condition(rule, labels, fp, down, now)
            else:
                sites: dict[str, list[bool]] = {}
                for d in devices:
                    sites.setdefault(d.site, []).append(offline(d))
                for site, states in sites.items():
                    if rule.matchers and not match_all(rule.series_matchers, {"site": site}):
                        continue
                    labels, fp = self._identity(rule, None, site, None)
                    down = all(states)
                    alert = self.alerts.get(fp)
                    if down or (alert is not None and alert.state in ACTIVE):
                        self._condition(rule, labels, fp, down, now, float(len(states)))

    def _gc(self, now: int) -> None:
        old = [
            a.fingerprint
            for a in self.alerts.values()
            if a.state == "resolved"
            and a.ends_at is not None
            and now - a.ends_at > self.resolved_retention_ns
        ]
        if old:
            self.version += 1
            for fp in old:
                del self.alerts[fp]
            self.store.delete_alerts(old)
            if self.on_forget:
                self.on_forget(old)
