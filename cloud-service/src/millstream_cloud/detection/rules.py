"""Detection settings per device kind, device and metric: ordered rules over the defaults.

Detection is tuned where it is wrong, not everywhere. A rule matches devices by machine
kind and/or id and, optionally, metrics, with shell-style globs (``pump-*``, ``*temp*``,
as in Telegraf's ``namepass``), and overrides engine settings for what it matches::

    rules:
      - match: {kind: compressor}
        mv_on: 8.0                       # this kind's device model alarms later
      - match: {kind: compressor, metric: discharge_temp}
        streaming: {alert_level: 0.45}   # merged into the per-metric detector's settings
      - match: {metric: door_open}
        enabled: false                   # not watched at all

Rules apply in order and every matching rule applies, a later one winning key by key
(``streaming`` merges key by key too). A rule that names a metric can only set what a
single metric's detector uses (:data:`METRIC_KEYS`); the device model's settings belong to
rules without one.
"""

from __future__ import annotations

import inspect
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from typing import Any

from ..hints import KeyedValueError, likely_meant
from .calibration import TAIL_FITS
from .streaming import COMPONENTS, KNOWN_COMPONENTS, StreamingEnsemble

MATCH_KEYS = ("kind", "device", "metric")
# Settings a rule that names a metric may set: what one metric's detectors read.
METRIC_KEYS = frozenset(
    {
        "warmup",
        "streaming",
        "streaming_alarms",
        "streaming_min_score",
        "streaming_min_score_young",
        "stuck_min_run",
        "stuck_learn_readings",
        "spike_count",
        "spike_sigma",
        "spike_window_s",
        "enabled",
    }
)


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``match`` and the settings it overrides (validated, ``enabled`` included)."""

    kind: str | None = None
    device: str | None = None
    metric: str | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def matches(self, device: str, kind: str | None, metric: str | None) -> bool:
        """Does the rule apply to ``device`` (of ``kind``), or to its ``metric`` if given?

        A rule that names a metric never applies to the device as a whole."""
        if self.device is not None and not fnmatchcase(device, self.device):
            return False
        if self.kind is not None and (kind is None or not fnmatchcase(kind, self.kind)):
            return False
        if self.metric is None:
            return True
        return metric is not None and fnmatchcase(metric, self.metric)


def streaming_keys() -> frozenset[str]:
    """Keys the per-metric ensemble accepts in ``streaming`` (its warm-up is ``warmup``)."""
    params = inspect.signature(StreamingEnsemble.__init__).parameters
    return frozenset(p for p in params if p not in ("self", "warmup"))


# (smallest, largest, whole number) of each numeric per-metric setting: a value outside
# would only fail when the first reading of a new series builds its detector.
# The largest counts keep one detector's memory bounded (a window is an array of that size).
STREAMING_BOUNDS: dict[str, tuple[float, float | None, bool]] = {
    "history": (10, 1_000_000, True),
    "short": (1, 100_000, True),
    "long": (0, 100_000, True),
    "alert_level": (0.001, 1.0, False),
    "refractory": (0, 10_000_000, True),
    "refractory_warmups": (0, 1000, False),
    "tail_reference": (0, 1_000_000, True),
    "detect_after": (1, 10_000_000, True),
    "glitch_sigma": (0, None, False),
    "calibrate_after": (0, 10_000_000, True),
    "memory": (0, 10_000_000, True),
    "resolution_s": (0, 86_400, False),
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _num(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() else f"{x:g}"


def check_bound(where: str, value: Any, low: float, high: float | None, whole: bool) -> Any:
    """A numeric setting within its range (and a whole number where it counts things);
    answers it, a whole number as an ``int`` (YAML and JSON may say 6000.0)."""
    kind = "a whole number" if whole else "a number"
    in_range = f"{_num(low)} or more" if high is None else f"from {_num(low)} to {_num(high)}"
    ok = _is_number(value) and (not whole or float(value).is_integer())
    if not ok or value < low or (high is not None and value > high):
        problem = f"{value!r}; must be {kind}, {in_range}"
        raise ValueError(f"{where}: {problem}" if where else problem)
    return int(value) if whole else value


def refuse_unknown(where: str, given: Iterable[str], known: Collection[str]) -> None:
    """An error naming the keys of ``given`` not in ``known``, each with the known key it
    was likely meant for (a typo), and the known ones."""
    unknown = sorted(set(given) - set(known))
    if not unknown:
        return
    named = [
        f"{key} (did you mean {meant!r}?)" if (meant := likely_meant(key, known)) else key
        for key in unknown
    ]
    problem = f"unknown key(s) {', '.join(named)}; known: {', '.join(sorted(known))}"
    raise KeyedValueError((), problem, f"{where}: ")


def check_streaming(block: Any, where: str) -> dict[str, Any]:
    """A ``streaming`` block: a mapping of known ensemble parameters, else an error
    (a :class:`KeyedValueError` naming the parameter, where there is one)."""
    if not isinstance(block, Mapping):
        problem = "must be a mapping of per-metric detector settings"
        raise KeyedValueError((), problem, f"{where}: ")
    refuse_unknown(where, block, streaming_keys())
    block = dict(block)
    for key, value in block.items():
        if key in STREAMING_BOUNDS and not (key == "detect_after" and value is None):
            try:
                block[key] = check_bound("", value, *STREAMING_BOUNDS[key])
            except ValueError as exc:
                raise KeyedValueError((key,), str(exc), f"{where}.") from None
    if block.get("tail_fit", TAIL_FITS[0]) not in TAIL_FITS:
        problem = f"{block['tail_fit']!r}; one of {', '.join(TAIL_FITS)}"
        raise KeyedValueError(("tail_fit",), problem, f"{where}.")
    weights = block.get("weights") or {}
    if not isinstance(weights, Mapping) or not all(
        k in KNOWN_COMPONENTS and _is_number(v) and v >= 0 for k, v in weights.items()
    ):
        problem = (
            f"{weights!r}; a mapping of components "
            f"({', '.join(KNOWN_COMPONENTS)}) to numbers of 0 or more"
        )
        raise KeyedValueError(("weights",), problem, f"{where}.")
    comps = block.get("components", COMPONENTS)
    if isinstance(comps, str) or not all(c in KNOWN_COMPONENTS for c in comps):
        problem = (
            f"{comps!r}; choose from {', '.join(KNOWN_COMPONENTS)} "
            "(the long windows follow from 'long')"
        )
        raise KeyedValueError(("components",), problem, f"{where}.")
    return block


def parse_rules(raw: Sequence[Any] | None) -> tuple[Rule, ...]:
    """Validate the ``detection.rules`` list; an error names the rule and the key."""
    from .engine import settings_from_mapping, with_implied

    rules = []
    for i, item in enumerate(raw or ()):
        where = f"detection.rules[{i}]"
        if not isinstance(item, Mapping):
            raise ValueError(f"{where}: must be a mapping with 'match' and the settings it sets")
        match = item.get("match")
        if not isinstance(match, Mapping) or not match:
            raise ValueError(
                f"{where}.match: required, with one or more of {', '.join(MATCH_KEYS)}"
            )
        for key, pattern in match.items():
            if key not in MATCH_KEYS:
                raise ValueError(f"{where}.match.{key}: unknown; use {', '.join(MATCH_KEYS)}")
            if not isinstance(pattern, str) or not pattern:
                raise ValueError(f"{where}.match.{key}: must be a non-empty glob pattern")
        overrides = {k: v for k, v in item.items() if k != "match"}
        if not overrides:
            raise ValueError(f"{where}: sets nothing besides 'match'")
        if "enabled" in overrides and not isinstance(overrides["enabled"], bool):
            raise ValueError(f"{where}.enabled: must be true or false")
        device_only = sorted(set(overrides) - METRIC_KEYS) if "metric" in match else []
        if device_only:
            raise ValueError(
                f"{where}.{device_only[0]}: a device model setting; a rule that matches "
                f"metrics can only set {', '.join(sorted(METRIC_KEYS))}"
            )
        settings = {k: v for k, v in overrides.items() if k != "enabled"}
        try:
            parsed = settings_from_mapping(settings, pairs=False)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        settings = with_implied(settings)
        for key in settings:  # as parsed: 6000.0 becomes 6000, a list of spans a tuple
            value = getattr(parsed, key)
            overrides[key] = (
                {k: value[k] for k in settings["streaming"]} if key == "streaming" else value
            )
        rules.append(Rule(match.get("kind"), match.get("device"), match.get("metric"), overrides))
    return tuple(rules)


def resolve(
    base: Any, rules: Sequence[Rule], device: str, kind: str | None, metric: str | None = None
) -> tuple[Any, bool]:
    """The settings for ``device`` (or one of its metrics) and whether detection is on."""
    values: dict[str, Any] = {}
    streaming: dict[str, Any] | None = None
    enabled = True
    for rule in rules:
        if not rule.matches(device, kind, metric):
            continue
        for key, value in rule.overrides.items():
            if key == "enabled":
                enabled = bool(value)
            elif key == "streaming":
                streaming = {**(streaming or base.streaming), **value}
            else:
                values[key] = value
    if streaming is not None:
        values["streaming"] = streaming
    return (replace(base, **values) if values else base), enabled
