"""Label sets: fingerprints, matchers, durations and templates, as Alertmanager spells them."""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

NS = 1_000_000_000

# Prometheus' model.LabelSet.Fingerprint(): FNV-1a 64 over the sorted label names and
# values, each followed by the 0xff separator byte. Same labels, same fingerprint, in
# Millstream and in an Alertmanager we forward to.
_FNV_OFFSET = 14695981039346656037
_FNV_PRIME = 1099511628211
_SEP = 0xFF


def fingerprint(labels: Mapping[str, str]) -> str:
    h = _FNV_OFFSET
    for name in sorted(labels):
        for part in (name, labels[name]):
            for byte in part.encode():
                h ^= byte
                h = (h * _FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
            h ^= _SEP
            h = (h * _FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNITS = {
    "ms": NS // 1000,
    "s": NS,
    "m": 60 * NS,
    "h": 3600 * NS,
    "d": 86400 * NS,
    "w": 7 * 86400 * NS,
}


def parse_duration(value: Any) -> int:
    """``30s``, ``5m``, ``1h30m``, ``0s`` (or a number of seconds) to nanoseconds."""
    if isinstance(value, str):
        return _parse_text(value)
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration like 0s, 30s, 5m or 1h")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return int(value * NS)
    return _parse_text(str(value))


@functools.lru_cache(maxsize=1024)
def _parse_text(value: str) -> int:
    text = value.strip()
    if text == "0":
        return 0
    pos, total = 0, 0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            break
        total += int(float(m.group(1)) * _UNITS[m.group(2)])
        pos = m.end()
    if pos != len(text) or not text:
        raise ValueError(f"{text!r} is not a duration like 0s, 30s, 5m or 1h")
    return total


def format_duration(ns: int) -> str:
    if ns == 0:
        return "0s"
    out = []
    for unit, size in (("h", 3600 * NS), ("m", 60 * NS), ("s", NS), ("ms", NS // 1000)):
        if ns >= size:
            out.append(f"{ns // size}{unit}")
            ns %= size
    return "".join(out) or "0s"


_MATCHER = re.compile(
    r'^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*(?:"((?:[^"\\]|\\.)*)"|([^\s"]*))\s*$'
)


@dataclass(frozen=True, slots=True)
class Matcher:
    """``name op value`` with op one of ``=``, ``!=``, ``=~``, ``!~`` (anchored regex)."""

    name: str
    op: str
    value: str

    def __post_init__(self) -> None:
        if self.op not in ("=", "!=", "=~", "!~"):
            raise ValueError(f"matcher operator must be =, !=, =~ or !~, not {self.op!r}")
        if self.op in ("=~", "!~"):
            try:
                re.compile(self.value)
            except re.error as exc:
                raise ValueError(f"matcher {self.name}{self.op}: bad regex: {exc}") from None

    @classmethod
    def parse(cls, text: str) -> Matcher:
        m = _MATCHER.match(text)
        if not m:
            raise ValueError(
                f'{text!r} is not a matcher like severity="critical", site!="a", '
                'device=~"press-.*" or alertname!~"Test.*"'
            )
        value = m.group(3) if m.group(3) is not None else m.group(4)
        return cls(m.group(1), m.group(2), value.replace('\\"', '"').replace("\\\\", "\\"))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Matcher:
        """Alertmanager API v2 shape: name, value, isRegex, isEqual."""
        regex = bool(d.get("isRegex", False))
        equal = bool(d.get("isEqual", True))
        op = ("=~" if regex else "=") if equal else ("!~" if regex else "!=")
        return cls(str(d["name"]), op, str(d["value"]))

    def matches(self, labels: Mapping[str, str]) -> bool:
        actual = labels.get(self.name, "")
        if self.op == "=":
            return actual == self.value
        if self.op == "!=":
            return actual != self.value
        hit = re.fullmatch(self.value, actual) is not None
        return hit if self.op == "=~" else not hit

    def __str__(self) -> str:
        escaped = self.value.replace("\\", "\\\\").replace('"', '\\"')
        return f'{self.name}{self.op}"{escaped}"'

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "isRegex": self.op in ("=~", "!~"),
            "isEqual": self.op in ("=", "=~"),
        }


def parse_matchers(items: Iterable[Any]) -> list[Matcher]:
    out = []
    for item in items:
        if isinstance(item, Matcher):
            out.append(item)
        elif isinstance(item, Mapping):
            out.append(Matcher.from_dict(item))
        else:
            out.append(Matcher.parse(str(item)))
    return out


def match_all(matchers: Iterable[Matcher], labels: Mapping[str, str]) -> bool:
    return all(m.matches(labels) for m in matchers)


TEMPLATE_VARS = (
    "alertname",
    "device",
    "site",
    "metric",
    "value",
    "threshold",
    "clear",
    "explanation",
    "detector",
    "likelihood",
    "score",
    "anomaly_time",
    "severity",
    "labels",
    "op",
    "per",
    "after",
    "metric_suffix",
    "dashboard_url",
)


class _Values(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return ""


def check_template(text: str) -> None:
    """Raise ValueError for a template naming a variable Millstream never fills."""
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise ValueError(f"bad template {text!r}: {exc}") from None
    for _, name, _, _ in parsed:
        if name is None:
            continue
        root = re.split(r"[.\[]", name, maxsplit=1)[0]
        if root not in TEMPLATE_VARS:
            raise ValueError(
                f"unknown template variable {{{root}}}; known: {', '.join(TEMPLATE_VARS)}"
            )


def render(text: str, values: Mapping[str, Any]) -> str:
    """``{device}``-style template; a value that cannot take a format spec renders plain."""
    try:
        return string.Formatter().vformat(text, (), _Values(values))
    except (ValueError, TypeError, KeyError, AttributeError, IndexError):
        plain = {k: (str(v) if v is not None else "") for k, v in values.items()}
        try:
            return re.sub(r"\{([A-Za-z_]+)(?::[^}]*)?\}", lambda m: plain.get(m.group(1), ""), text)
        except Exception:
            return text
