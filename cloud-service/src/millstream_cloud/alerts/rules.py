"""Alerting rules: what makes an alert, defined in YAML files or through the API.

Five kinds, chosen by ``type``:

- ``threshold``: a metric beyond a level, with ``for`` and a separate ``clear`` level
  (hysteresis) so a value hovering at the threshold does not flap.
- ``anomaly``: a detector's anomaly with at least ``min_likelihood``; it stays active
  until no such anomaly was seen for ``resolve_after`` and the detectors no longer hold
  its metric out of line (an incident is reported once, and lasts).
- ``offline``: a device (``scope: device``) or a whole site (``scope: site``, every device
  of it) offline by its status (last will) or by a last seen older than ``stale_after``.
- ``no_data``: a metric that stopped arriving for ``after``.
- ``rate_of_change``: a metric changing faster than ``threshold`` per ``per``, measured
  over ``window``.

Every rule has ``labels`` and ``annotations`` (templates with ``{device}``, ``{site}``,
``{metric}``, ``{value}``, ``{explanation}``, ...), ``for`` and ``keep_firing_for``.
Errors name the field: ``rules.yaml: rules[2] (hot-spindle): threshold: field required``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from millstream_cloud.alerts.labels import Matcher, check_template, parse_duration, parse_matchers
from millstream_cloud.hints import likely_meant

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,127}$")
LABEL_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
RESERVED_LABELS = ("alertname", "device", "site", "metric")
OPS = (">", ">=", "<", "<=")


class RuleError(ValueError):
    """A rule that cannot be used; ``errors`` holds (field, message) pairs."""

    def __init__(self, errors: list[tuple[str, str]], source: str = "") -> None:
        self.errors = errors
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__("\n".join(f"{prefix}{f}: {m}" if f else f"{prefix}{m}" for f, m in errors))


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(..., description="becomes the alertname label")
    description: str = ""
    enabled: bool = True
    matchers: list[str] = Field(
        default_factory=list,
        description='which series: matchers on device, site, metric (e.g. site="plant-a")',
    )
    labels: dict[str, str] = Field(default_factory=dict, description="extra labels (templates)")
    annotations: dict[str, str] = Field(default_factory=dict, description="templates")
    for_: str = Field("0s", alias="for", description="condition must hold this long to fire")
    keep_firing_for: str = Field("0s", description="stay firing this long after it clears")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("must start with a letter or _ and hold only letters, digits, _ . : -")
        return v

    @field_validator("matchers")
    @classmethod
    def _matchers(cls, v: list[str]) -> list[str]:
        parse_matchers(v)
        return v

    @field_validator("for_", "keep_firing_for")
    @classmethod
    def _duration(cls, v: Any) -> str:
        parse_duration(v)
        return str(v)

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for key, text in v.items():
            if not LABEL_NAME_RE.match(key):
                raise ValueError(f"label name {key!r} must match [A-Za-z_][A-Za-z0-9_]*")
            if key in RESERVED_LABELS:
                raise ValueError(f"label {key!r} is set by Millstream and cannot be overridden")
            check_template(str(text))
            if re.search(
                r"\{(value|explanation|likelihood|score|anomaly_time|dashboard_url)\b", str(text)
            ):
                raise ValueError(
                    f"label {key!r}: labels are the alert's identity and must not change with "
                    "the value; put {value} and {explanation} in annotations"
                )
        return {k: str(t) for k, t in v.items()}

    @field_validator("annotations")
    @classmethod
    def _annotations(cls, v: dict[str, str]) -> dict[str, str]:
        for key, text in v.items():
            try:
                check_template(str(text))
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
        return {k: str(t) for k, t in v.items()}

    @property
    def for_ns(self) -> int:
        return parse_duration(self.for_)

    @property
    def keep_firing_ns(self) -> int:
        return parse_duration(self.keep_firing_for)

    @property
    def series_matchers(self) -> list[Matcher]:
        return parse_matchers(self.matchers)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_defaults=False)


class _Level(_Base):
    metric: str
    op: Literal[">", ">=", "<", "<="] = ">"
    threshold: float
    clear: float | None = Field(
        None, description="level at which a firing alert clears (hysteresis); default threshold"
    )

    @model_validator(mode="after")
    def _clear_side(self) -> Any:
        if self.clear is None:
            return self
        above = self.op in (">", ">=")
        if above and self.clear > self.threshold:
            raise ValueError(
                f"clear: must be at or below threshold ({self.threshold}) for op {self.op}"
            )
        if not above and self.clear < self.threshold:
            raise ValueError(
                f"clear: must be at or above threshold ({self.threshold}) for op {self.op}"
            )
        return self

    def breached(self, value: float, active: bool) -> bool:
        """True while the condition holds; an active alert holds until the clear level."""
        level = self.clear if (active and self.clear is not None) else self.threshold
        if self.op == ">":
            return value > level
        if self.op == ">=":
            return value >= level
        if self.op == "<":
            return value < level
        return value <= level


class ThresholdRule(_Level):
    type: Literal["threshold"]


class RateOfChangeRule(_Level):
    type: Literal["rate_of_change"]
    per: str = Field("1m", description="the rate is the change per this duration")
    window: str = Field("1m", description="compare the newest reading with one this old")

    @field_validator("per", "window")
    @classmethod
    def _positive(cls, v: Any) -> str:
        if parse_duration(v) <= 0:
            raise ValueError("must be longer than 0s")
        return str(v)


class AnomalyRule(_Base):
    type: Literal["anomaly"]
    min_likelihood: float = Field(0.9, ge=0.0, le=1.0)
    metric: str | None = Field(None, description="only anomalies of this metric")
    detector: str | None = Field(None, description="only anomalies from this detector")
    resolve_after: str = Field(
        "5m",
        description="resolves when no anomaly was seen this long and the detectors no "
        "longer hold its metric out of line",
    )

    @field_validator("resolve_after")
    @classmethod
    def _positive(cls, v: Any) -> str:
        if parse_duration(v) <= 0:
            raise ValueError("must be longer than 0s")
        return str(v)


class OfflineRule(_Base):
    type: Literal["offline"]
    scope: Literal["device", "site"] = "device"
    stale_after: str | None = Field(
        None, description="also offline when last seen is older than this (no last will came)"
    )

    @field_validator("stale_after")
    @classmethod
    def _positive(cls, v: Any) -> str | None:
        if v is not None and parse_duration(v) <= 0:
            raise ValueError("must be longer than 0s")
        return None if v is None else str(v)


class NoDataRule(_Base):
    type: Literal["no_data"]
    metric: str
    after: str = Field(..., description="fires when the metric has not arrived for this long")

    @field_validator("after")
    @classmethod
    def _positive(cls, v: Any) -> str:
        if parse_duration(v) <= 0:
            raise ValueError("must be longer than 0s")
        return str(v)


Rule = Annotated[
    ThresholdRule | RateOfChangeRule | AnomalyRule | OfflineRule | NoDataRule,
    Field(discriminator="type"),
]
RULE_TYPES = ("threshold", "anomaly", "offline", "no_data", "rate_of_change")
_ADAPTER: TypeAdapter[Any] = TypeAdapter(Rule)  # type: ignore[arg-type]
AnyRule = ThresholdRule | RateOfChangeRule | AnomalyRule | OfflineRule | NoDataRule


def _field(loc: tuple[Any, ...]) -> str:
    # Pydantic puts the union tag in the location (("threshold", "metric")); users wrote
    # only "metric".
    parts = [str(p) for p in loc]
    if parts and parts[0] in RULE_TYPES:
        parts = parts[1:]
    text = ""
    for p in parts:
        if p.isdigit():
            text += f"[{p}]"
        else:
            text += ("." if text else "") + ("for" if p == "for_" else p)
    return text


# Each rule type's model, for the fields an unknown one was likely meant as.
_MODELS: dict[str, type[BaseModel]] = {
    "threshold": ThresholdRule,
    "rate_of_change": RateOfChangeRule,
    "anomaly": AnomalyRule,
    "offline": OfflineRule,
    "no_data": NoDataRule,
}


def _known_fields(kind: str) -> list[str]:
    """The keys a rule of ``kind`` takes, as written in a rules file (``for``, not ``for_``)."""
    fields = _MODELS[kind].model_fields.items()
    return [f.alias or name for name, f in fields]


def _message(err: dict[str, Any]) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        loc = [str(p) for p in err["loc"]]
        if len(loc) == 2 and loc[0] in _MODELS:
            meant = likely_meant(loc[1], _known_fields(loc[0]))
            if meant:
                return f"unknown field (did you mean {meant!r}?)"
        return "unknown field"
    if kind == "missing":
        return "field required"
    if kind == "union_tag_invalid" or kind == "union_tag_not_found":
        return f"type must be one of {', '.join(RULE_TYPES)}"
    msg = str(err["msg"])
    return msg.removeprefix("Value error, ")


def parse_rule(data: Any) -> AnyRule:
    """One rule from a mapping; RuleError names each bad field."""
    if not isinstance(data, dict):
        raise RuleError([("", "a rule must be a mapping")])
    if "type" not in data:
        msg = f"field required: one of {', '.join(RULE_TYPES)}"
        if "expr" in data:
            # Prometheus' rule files say what to watch in PromQL; here the type does.
            msg += " (a PromQL `expr` is not read here: a threshold rule gives metric, op and threshold)"
        raise RuleError([("type", msg)])
    try:
        return _ADAPTER.validate_python(data)  # type: ignore[no-any-return]
    except ValidationError as exc:
        errors = []
        for err in exc.errors():
            field = _field(tuple(err["loc"]))
            msg = _message(dict(err))
            if err["type"].startswith("union_tag"):
                field = "type"
            # Cross-field checks (clear vs threshold) say their field in the message.
            if not field and ": " in msg and msg.split(": ", 1)[0].isidentifier():
                field, msg = msg.split(": ", 1)
            errors.append((field, msg))
        raise RuleError(errors) from None


def parse_rules(data: Any, source: str = "rules") -> list[AnyRule]:
    """``{rules: [...]}`` (or a bare list) to rules; errors name file, index, rule and field."""
    if isinstance(data, dict):
        if set(data) - {"rules"}:
            extra = sorted(set(data) - {"rules"})
            raise RuleError([(extra[0], "unknown key; a rules file holds `rules:`")], source)
        data = data.get("rules") or []
    if not isinstance(data, list):
        raise RuleError([("rules", "must be a list of rules")], source)
    rules: list[AnyRule] = []
    errors: list[tuple[str, str]] = []
    seen: set[str] = set()
    for i, item in enumerate(data):
        where = f"rules[{i}]"
        if isinstance(item, dict) and item.get("name"):
            where += f" ({item['name']})"
        try:
            rule = parse_rule(item)
        except RuleError as exc:
            errors.extend((f"{where}.{f}" if f else where, m) for f, m in exc.errors)
            continue
        if rule.name in seen:
            errors.append((f"{where}.name", f"duplicate rule name {rule.name!r}"))
        seen.add(rule.name)
        rules.append(rule)
    if errors:
        raise RuleError(errors, source)
    return rules


DEFAULT_RULES = Path(__file__).with_name("default_rules.yaml")


def load_rule_files(
    paths: Iterable[str], base: Path | None = None
) -> dict[str, tuple[AnyRule, str]]:
    """Rules from files (``default`` is the packaged demo set): name -> (rule, source)."""
    out: dict[str, tuple[AnyRule, str]] = {}
    for entry in paths:
        path = DEFAULT_RULES if entry == "default" else Path(entry)
        if not path.is_absolute() and base is not None and entry != "default":
            path = base / path
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise RuleError([("", f"cannot read: {exc.strerror}")], str(path)) from None
        except yaml.YAMLError as exc:
            raise RuleError([("", f"not valid YAML: {exc}")], str(path)) from None
        for rule in parse_rules(data or {}, str(path)):
            if rule.name in out:
                raise RuleError(
                    [("name", f"rule {rule.name!r} is also defined in {out[rule.name][1]}")],
                    str(path),
                )
            out[rule.name] = (rule, f"file:{path}")
    return out
