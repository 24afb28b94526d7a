"""Inhibition: a firing source alert mutes target alerts that share the ``equal`` labels.

Millstream's default: a ``SiteOffline`` alert mutes every other alert of that site, and a
``DeviceOffline`` alert mutes that device's other alerts, so a site that goes down pages
once, not once per machine and metric.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from millstream_cloud.alerts.labels import Matcher, match_all, parse_matchers
from millstream_cloud.alerts.settings import InhibitRuleConfig
from millstream_cloud.alerts.store import Alert


@dataclass(frozen=True)
class InhibitRule:
    source: tuple[Matcher, ...]
    target: tuple[Matcher, ...]
    equal: tuple[str, ...]

    @classmethod
    def from_config(cls, c: InhibitRuleConfig) -> InhibitRule:
        return cls(
            tuple(parse_matchers(c.source_matchers)),
            tuple(parse_matchers(c.target_matchers)),
            tuple(c.equal),
        )


class Inhibitor:
    """Answers "is this alert inhibited, and by which source?" from an index of the firing
    source alerts, rebuilt only when the set of firing alerts changed (``version``)."""

    def __init__(self, rules: Iterable[InhibitRule]) -> None:
        self.rules = list(rules)
        self._version: object = None
        self._index: list[dict[tuple[str, ...], list[str]]] = []

    def refresh(self, firing: Iterable[Alert], version: object) -> None:
        if version == self._version and self._index:
            return
        alerts = list(firing)
        self._index = []
        for rule in self.rules:
            by_key: dict[tuple[str, ...], list[str]] = {}
            for src in alerts:
                if match_all(rule.source, src.labels):
                    key = tuple(src.labels.get(k, "") for k in rule.equal)
                    by_key.setdefault(key, []).append(src.fingerprint)
            self._index.append(by_key)
        self._version = version

    def inhibited_by(self, target: Mapping[str, str], target_fp: str) -> str | None:
        """Fingerprint of a firing alert that inhibits ``target``, or None."""
        for rule, by_key in zip(self.rules, self._index, strict=False):
            if not by_key or not match_all(rule.target, target):
                continue
            for fp in by_key.get(tuple(target.get(k, "") for k in rule.equal), ()):
                if fp != target_fp:  # an alert never inhibits itself
                    return fp
        return None
