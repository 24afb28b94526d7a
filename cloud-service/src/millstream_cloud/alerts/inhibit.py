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
    def __init__(self, rules: Iterable[InhibitRule]) -> None:
        self.rules = list(rules)

    def inhibited_by(
        self, target: Mapping[str, str], target_fp: str, firing: Iterable[Alert]
    ) -> str | None:
        """Fingerprint of a firing alert that inhibits ``target``, or None."""
        candidates = None
        for rule in self.rules:
            if not match_all(rule.target, target):
                continue
            if candidates is None:
                candidates = list(firing)
            for src in candidates:
                if src.fingerprint == target_fp:
                    continue  # an alert never inhibits itself
                if not match_all(rule.source, src.labels):
                    continue
                if all(src.labels.get(k, "") == target.get(k, "") for k in rule.equal):
                    return src.fingerprint
        return None
