"""The agent's one YAML configuration: schema, validation that names key and line, sample.

Every option is declared once in :data:`SPEC` with its type, default and a one-line
reason; validation, defaults and ``sample-config`` all come from there, and each
collector's own block from its ``options_spec``. A file with any error is refused as a
whole: each error is reported as ``FILE:LINE: key.path: what was expected, got what``.

Secrets may come from the environment instead of the file: ``MILLSTREAM_MQTT_PASSWORD``
and ``MILLSTREAM_MQTT_USERNAME`` override ``mqtt.password`` and ``mqtt.username``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import yaml

from millstream_agent.collectors._options import did_you_mean
from millstream_agent.protocol import ID_PATTERN

ENV_PASSWORD = "MILLSTREAM_MQTT_PASSWORD"
ENV_USERNAME = "MILLSTREAM_MQTT_USERNAME"
REMOTE_SECTIONS = ("batch", "collectors", "self_monitoring")


class ConfigError(Exception):
    """One or more configuration errors; ``str()`` lists them, one per line."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


# --- YAML with line numbers ---------------------------------------------------------


class LineDict(dict):
    """A mapping that remembers the line of each of its keys (1-based)."""

    line: Optional[int] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lines: dict[Any, int] = {}


class LineList(list):
    line: Optional[int] = None

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.lines: list[int] = []


class _Loader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> LineDict:
    loader.flatten_mapping(node)
    out = LineDict()
    out.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, (dict, list)):
            raise yaml.MarkedYAMLError(
                "while reading a mapping",
                node.start_mark,
                "a key must be a plain name, not a mapping or a list",
                key_node.start_mark,
            )
        if key in out:
            raise yaml.MarkedYAMLError(
                "while reading a mapping",
                node.start_mark,
                f"duplicate key {key!r}",
                key_node.start_mark,
            )
        out[key] = loader.construct_object(value_node, deep=True)
        out.lines[key] = key_node.start_mark.line + 1
    return out


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> LineList:
    out = LineList()
    out.line = node.start_mark.line + 1
    for item in node.value:
        out.append(loader.construct_object(item, deep=True))
        out.lines.append(item.start_mark.line + 1)
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def parse_yaml(text: str, source: str = "<config>") -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else "?"
        raise ConfigError([f"{source}:{line}: invalid YAML: {exc.problem or exc}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: invalid YAML: {exc}"]) from None


# --- value types ----------------------------------------------------------------------

_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(B|KB|KiB|MB|MiB|GB|GiB|TB|TiB)?\s*$", re.I)
_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "kib": 1024,
    "mb": 1000**2,
    "mib": 1024**2,
    "gb": 1000**3,
    "gib": 1024**3,
    "tb": 1000**4,
    "tib": 1024**4,
    None: 1,
}


class Invalid(ValueError):
    pass


def parse_duration(value: Any) -> float:
    if isinstance(value, bool):
        raise Invalid("a duration such as 500ms, 1s, 5m, 1h, 7d")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise Invalid("a duration such as 500ms, 1s, 5m, 1h, 7d")


def parse_size(value: Any) -> int:
    if isinstance(value, bool):
        raise Invalid("a size such as 64MB, 1GiB or a number of bytes")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            unit = m.group(2).lower() if m.group(2) else None
            return int(float(m.group(1)) * _SIZE_UNITS[unit])
    raise Invalid("a size such as 64MB, 1GiB or a number of bytes")


def format_duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{round(seconds * 1000)}ms"


@dataclass
class Opt:
    """One option: ``kind`` is str/int/float/bool/duration/size/url/enum; None allowed if
    ``nullable``."""

    kind: str
    default: Any
    doc: str
    nullable: bool = False
    required: bool = False
    choices: tuple[Any, ...] = ()
    pattern: Optional[re.Pattern[str]] = None
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    example: Any = None


Spec = dict[str, Union[Opt, "Section"]]


@dataclass
class Section:
    doc: str
    fields: Spec = field(default_factory=dict)


def _describe(opt: Opt) -> str:
    what = {
        "str": "a string",
        "int": "an integer",
        "float": "a number",
        "bool": "true or false",
        "duration": "a duration such as 500ms, 1s, 5m, 1h, 7d",
        "size": "a size such as 64MB, 1GiB or a number of bytes",
        "url": "a broker URL mqtt://HOST[:PORT] or mqtts://HOST[:PORT]",
        "enum": "one of " + ", ".join(str(c) for c in opt.choices),
    }[opt.kind]
    if opt.choices and opt.kind != "enum":
        # "expected an integer, got 3" read as if 3 were not one (mqtt.qos takes only 1).
        what += ": " + " or ".join(str(c) for c in opt.choices)
    if opt.pattern is not None:
        what += f" matching {opt.pattern.pattern}"
    if opt.minimum is not None and opt.maximum is not None:
        what += f" from {opt.minimum:g} to {opt.maximum:g}"
    elif opt.minimum is not None:
        what += f" >= {opt.minimum:g}"
    if opt.nullable:
        what += " or null"
    return what


def _check(opt: Opt, value: Any) -> Any:
    """The normalized value, or raise Invalid with what was expected."""
    if value is None:
        if opt.nullable:
            return None
        raise Invalid(_describe(opt))
    kind = opt.kind
    out: Any
    try:
        if kind in ("str", "url", "enum"):
            if not isinstance(value, str) or (kind == "str" and not value and not opt.nullable):
                if kind == "enum" and value in opt.choices:
                    return value
                raise Invalid(_describe(opt))
            out = value
            if kind == "url":
                from millstream_agent.session import BrokerURLError, parse_broker_url

                try:
                    parse_broker_url(value)
                except BrokerURLError as exc:
                    raise Invalid(str(exc)) from None
        elif kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise Invalid(_describe(opt))
            out = value
        elif kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise Invalid(_describe(opt))
            out = float(value)
        elif kind == "bool":
            if not isinstance(value, bool):
                raise Invalid(_describe(opt))
            out = value
        elif kind == "duration":
            out = parse_duration(value)
        elif kind == "size":
            out = parse_size(value)
        else:  # pragma: no cover - a bug in SPEC
            raise AssertionError(kind)
    except Invalid:
        raise Invalid(_describe(opt)) from None
    if opt.choices and out not in opt.choices:
        raise Invalid(_describe(opt))
    if opt.pattern is not None and not opt.pattern.match(out):
        raise Invalid(_describe(opt))
    if opt.minimum is not None and out < opt.minimum:
        raise Invalid(_describe(opt))
    if opt.maximum is not None and out > opt.maximum:
        raise Invalid(_describe(opt))
    return out


# --- the schema -----------------------------------------------------------------------

SPEC: Spec = {
    "device": Section(
        "who this agent is",
        {
            "id": Opt(
                "str",
                None,
                "device id, unique across all sites",
                required=True,
                pattern=ID_PATTERN,
                example="press-01",
            ),
            "site": Opt(
                "str",
                "default",
                "site (plant, hall) the device belongs to; in topics",
                pattern=ID_PATTERN,
                example="plant-a",
            ),
            "kind": Opt(
                "str", "machine", "machine kind (motor, pump, compressor, host...)", example="motor"
            ),
        },
    ),
    "mqtt": Section(
        "the broker connection",
        {
            "broker": Opt("url", "mqtt://127.0.0.1:1883", "mqtt:// (plain) or mqtts:// (TLS)"),
            "client_id": Opt(
                "str", None, "MQTT client id; null = millstream-<device.id>", nullable=True
            ),
            "username": Opt(
                "str", None, "broker user; env MILLSTREAM_MQTT_USERNAME overrides", nullable=True
            ),
            "password": Opt(
                "str",
                None,
                "keep it out of files: env MILLSTREAM_MQTT_PASSWORD overrides",
                nullable=True,
            ),
            "tls": Section(
                "TLS for mqtts:// (also enabled by setting ca or cert)",
                {
                    "ca": Opt(
                        "str",
                        None,
                        "CA file that signed the broker; null = system CAs",
                        nullable=True,
                    ),
                    "cert": Opt("str", None, "client certificate for mutual TLS", nullable=True),
                    "key": Opt("str", None, "client private key for mutual TLS", nullable=True),
                    "server_hostname": Opt(
                        "str",
                        None,
                        "name expected in the broker certificate when it differs from the URL host",
                        nullable=True,
                    ),
                },
            ),
            "keepalive": Opt(
                "duration",
                30.0,
                "ping interval; a dead link is noticed after 1.5x this",
                minimum=5,
                maximum=3600,
            ),
            "qos": Opt(
                "int", 1, "1 = at least once; readings leave the queue only on PUBACK", choices=(1,)
            ),
            "max_inflight": Opt(
                "int", 20, "messages awaiting PUBACK at once", minimum=1, maximum=1000
            ),
            "connect_timeout": Opt("duration", 5.0, "TCP+TLS connect timeout", minimum=0.5),
            "reconnect_min": Opt(
                "duration", 1.0, "first reconnect delay (doubles, with jitter)", minimum=0.1
            ),
            "reconnect_max": Opt("duration", 30.0, "longest reconnect delay", minimum=0.1),
            "refused_retry": Opt(
                "duration",
                60.0,
                "retry delay after the broker refused us (credentials, not authorised, TLS trust)",
                minimum=1,
            ),
        },
    ),
    "queue": Section(
        "the on-disk store-and-forward queue (SQLite, WAL)",
        {
            "path": Opt(
                "str",
                None,
                "null = $STATE_DIRECTORY/queue.db under systemd, else "
                "/var/lib/millstream/queue.db if writable, else "
                "~/.local/state/millstream/queue.db",
                nullable=True,
            ),
            "max_bytes": Opt(
                "size",
                256 * 1000**2,
                "bound on buffered readings; the oldest are dropped first and counted",
                minimum=4096,
            ),
            "max_age": Opt(
                "duration",
                7 * 86400.0,
                "readings older than this are dropped (oldest first) and counted",
                minimum=1,
            ),
            "fsync": Opt(
                "enum",
                "full",
                "full: survives power loss (fsync per commit); "
                "normal: survives kill -9, a power cut may lose the last commits; off",
                choices=("full", "normal", "off"),
            ),
            "replay_rate": Opt(
                "int",
                5000,
                "readings/s sent at most, so a backlog drains "
                "without starving the link; 0 = unlimited",
                minimum=0,
            ),
        },
    ),
    "batch": Section(
        "how readings are grouped into messages",
        {
            "max_readings": Opt(
                "int", 100, "readings per message at most", minimum=1, maximum=10000
            ),
            "max_delay": Opt(
                "duration", 1.0, "longest a reading waits for its batch", minimum=0, maximum=3600
            ),
        },
    ),
    "self_monitoring": Section(
        "the agent's own health, published as telemetry of this device (agent.*)",
        {
            "enabled": Opt(
                "bool", True, "queue depth, oldest age, dropped, reconnects, publish latency, RSS"
            ),
            "interval": Opt("duration", 10.0, "how often", minimum=1),
        },
    ),
    "clock": Section(
        "detecting an unsynchronised clock; its readings are sent with clock: unsynced",
        {
            "min_year": Opt(
                "int",
                2024,
                "a clock before this year is not set (a Pi boots at 1970 before NTP)",
                minimum=1970,
            ),
            "settle": Opt(
                "duration",
                60.0,
                "after time jumps backwards, readings stay marked unsynced this long",
                minimum=0,
            ),
        },
    ),
    "remote": Section(
        "remote configuration (config/desired) and commands (cmd/<name>)",
        {
            "enabled": Opt("bool", True, "accept config/desired and commands from the broker"),
            "state": Opt(
                "str",
                None,
                "where the accepted remote config is kept; null = "
                "remote-config.json next to the queue",
                nullable=True,
            ),
        },
    ),
    "log": Section(
        "logging to stderr (journald under systemd)",
        {
            "level": Opt(
                "enum", "info", "how much to log", choices=("debug", "info", "warning", "error")
            )
        },
    ),
}

COLLECTOR_FIELDS: dict[str, Opt] = {
    "type": Opt("str", None, "collector type: simulated, host, modbus, opcua", required=True),
    "name": Opt(
        "str",
        None,
        "unique name; null = the type",
        nullable=True,
        pattern=re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$"),
    ),
    "interval": Opt("duration", 1.0, "how often to collect", minimum=0.01),
    "enabled": Opt("bool", True, "false keeps the block but does not run it"),
}


# --- validation -----------------------------------------------------------------------


class _Errors:
    def __init__(self, source: str) -> None:
        self.source = source
        self.items: list[str] = []

    def add(self, line: Optional[int], key: str, message: str) -> None:
        where = f"{self.source}:{line}" if line else self.source
        self.items.append(f"{where}: {key}: {message}")


def _line(container: Any, key: Any) -> Optional[int]:
    lines = getattr(container, "lines", None)
    if isinstance(lines, dict):
        return lines.get(key, getattr(container, "line", None))
    if isinstance(lines, list) and isinstance(key, int) and key < len(lines):
        return lines[key]
    return getattr(container, "line", None)


def _unknown(key: Any, allowed: list[str]) -> str:
    return f"unknown key{did_you_mean(key, allowed)}; expected one of: {', '.join(allowed)}"


def _got(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _validate_section(
    spec: Spec, data: Any, path: str, errors: _Errors, parent_line: Optional[int]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if data is None:
        data = {}
    if not isinstance(data, dict):
        errors.add(parent_line, path or "(top level)", f"expected a mapping, got {_got(data)}")
        data = {}
    for key in data:
        if key not in spec:
            errors.add(
                _line(data, key), f"{path}.{key}" if path else str(key), _unknown(key, list(spec))
            )
    for name, item in spec.items():
        key = f"{path}.{name}" if path else name
        line = _line(data, name) if name in data else getattr(data, "line", parent_line)
        if isinstance(item, Section):
            if name == "collectors":
                continue
            out[name] = _validate_section(item.fields, data.get(name), key, errors, line)
            continue
        if name not in data:
            if item.required:
                errors.add(line, key, f"missing; expected {_describe(item)}")
            out[name] = item.default
            continue
        try:
            out[name] = _check(item, data[name])
        except Invalid as exc:
            errors.add(line, key, f"expected {exc}, got {_got(data[name])}")
            out[name] = item.default
    return out


def _check_option(spec_type: Any, value: Any) -> bool:
    if spec_type is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if spec_type is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(spec_type, type):
        return isinstance(value, spec_type)
    return True


def _type_name(spec_type: Any) -> str:
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        list: "a list",
        dict: "a mapping",
    }
    return names.get(spec_type, getattr(spec_type, "__name__", str(spec_type)))


def _validate_collectors(
    data: Any, errors: _Errors, parent_line: Optional[int], device_id: Optional[str] = None
) -> list[dict[str, Any]]:
    from millstream_agent.collectors import collector_class, known_types

    if data is None:
        return []
    if not isinstance(data, list):
        errors.add(
            parent_line, "collectors", f"expected a list of collector blocks, got {_got(data)}"
        )
        return []
    out: list[dict[str, Any]] = []
    names: dict[str, int] = {}
    for i, block in enumerate(data):
        path = f"collectors[{i}]"
        line = _line(data, i)
        if not isinstance(block, dict):
            errors.add(
                line,
                path,
                f"expected a mapping with type, name, interval, options, got {_got(block)}",
            )
            continue
        allowed = [*COLLECTOR_FIELDS, "options"]
        for key in block:
            if key not in allowed:
                errors.add(_line(block, key), f"{path}.{key}", _unknown(key, allowed))
        norm: dict[str, Any] = {}
        for name, opt in COLLECTOR_FIELDS.items():
            kline = _line(block, name) if name in block else line
            if name not in block:
                if opt.required:
                    errors.add(
                        kline,
                        f"{path}.{name}",
                        f"missing; expected one of: {', '.join(known_types())}",
                    )
                norm[name] = opt.default
                continue
            try:
                norm[name] = _check(opt, block[name])
            except Invalid as exc:
                errors.add(kline, f"{path}.{name}", f"expected {exc}, got {_got(block[name])}")
                norm[name] = opt.default
        ctype = norm.get("type")
        if not isinstance(ctype, str):
            continue
        before = len(errors.items)
        try:
            cls = collector_class(ctype)
        except ValueError as exc:
            errors.add(_line(block, "type"), f"{path}.type", str(exc))
            continue
        norm["name"] = norm["name"] or ctype
        if norm["name"] in names:
            errors.add(
                _line(block, "name") or line,
                f"{path}.name",
                f"duplicate collector name {norm['name']!r} (first at "
                f"collectors[{names[norm['name']]}]); give each block a unique name",
            )
        names[norm["name"]] = i
        options = block.get("options")
        oline = _line(block, "options") if "options" in block else line
        if options is None:
            options = {}
        if not isinstance(options, dict):
            errors.add(oline, f"{path}.options", f"expected a mapping, got {_got(options)}")
            options = {}
        spec = dict(getattr(cls, "options_spec", {}) or {})
        opts: dict[str, Any] = {}
        for key, value in options.items():
            if spec and key not in spec:
                errors.add(
                    _line(options, key),
                    f"{path}.options.{key}",
                    f"unknown option for collector {ctype!r}; "
                    + _unknown(key, list(spec)).split("; ", 1)[1],
                )
                continue
            if key in spec:
                typ = spec[key][0]
                if value is None and spec[key][1] is None:
                    opts[key] = None
                    continue
                if not _check_option(typ, value):
                    errors.add(
                        _line(options, key),
                        f"{path}.options.{key}",
                        f"expected {_type_name(typ)} ({spec[key][2]}), got {_got(value)}",
                    )
                    continue
                if typ is float:
                    value = float(value)
            opts[key] = _plain(value)
        for key, (_typ, default, _doc) in spec.items():
            if key not in opts:
                opts[key] = copy.deepcopy(default)
        if "device" in spec and opts.get("device") is None and device_id:
            opts["device"] = device_id  # e.g. the simulator's ground truth names the device
        norm["options"] = opts
        if len(errors.items) == before:
            _construct_check(cls, norm["name"], opts, options, oline, path, errors)
        out.append(norm)
    return out


def _construct_check(
    cls: Any,
    name: str,
    opts: dict[str, Any],
    raw_options: Any,
    oline: Optional[int],
    path: str,
    errors: _Errors,
) -> None:
    """Build the collector once (constructors validate, ``start()`` does the I/O) so a
    value its options_spec cannot express (a kind, a range) is refused at start too.
    Collectors raise ``ValueError("<option>: ...")``; the option's line is looked up."""
    try:
        instance = cls(name, dict(opts))
    except ValueError as exc:
        text = str(exc)
        key = text.split(":", 1)[0].strip()
        errors.add(_path_line(raw_options, key, oline), f"{path}.options", text)
        return
    except Exception as exc:
        errors.add(oline, f"{path}.options", f"collector refused its options: {exc}")
        return
    with contextlib.suppress(Exception):  # validation only
        instance.close()


_PATH_TOKEN = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _path_line(node: Any, key_path: str, default: Optional[int]) -> Optional[int]:
    """The line of ``registers[2].data_type`` inside a collector's options (the deepest
    part of the path that exists), for errors raised by the collector itself."""
    line = default
    for name, index in _PATH_TOKEN.findall(key_path):
        key: Any = int(index) if index else name
        found = (isinstance(node, dict) and key in node) or (
            isinstance(node, list) and isinstance(key, int) and key < len(node)
        )
        if not found:
            break
        line = _line(node, key) or line
        node = node[key]
    return line


def _plain(value: Any) -> Any:
    """LineDict/LineList → dict/list (collectors get plain data)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


@dataclass
class AgentConfig:
    """A validated configuration: normalized sections plus the document it came from."""

    data: dict[str, Any]
    raw: dict[str, Any]
    source: str = "<config>"

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    @property
    def device_id(self) -> str:
        return str(self.data["device"]["id"])


def validate(
    raw: Any, source: str = "<config>", env: Optional[dict[str, str]] = None
) -> AgentConfig:
    """Validate a parsed document (from :func:`parse_yaml` or plain dicts)."""
    errors = _Errors(source)
    if raw is None:
        raw = {}
    top_spec: Spec = dict(SPEC)
    top_spec["collectors"] = Section("collectors")
    data = _validate_section(top_spec, raw, "", errors, 1)
    if isinstance(raw, dict):
        device_id = data["device"]["id"] if isinstance(data["device"].get("id"), str) else None
        data["collectors"] = _validate_collectors(
            raw.get("collectors"), errors, _line(raw, "collectors"), device_id
        )
        if "collectors" not in raw:
            errors.add(
                None,
                "collectors",
                "missing; expected a list of collector blocks "
                "(see `millstream-agent sample-config`)",
            )
    mq = data["mqtt"]
    if mq["reconnect_max"] < mq["reconnect_min"]:
        errors.add(
            _line(raw.get("mqtt", {}), "reconnect_max") if isinstance(raw, dict) else None,
            "mqtt.reconnect_max",
            "must be >= mqtt.reconnect_min",
        )
    tls = mq["tls"]
    if tls["key"] and not tls["cert"]:
        errors.add(None, "mqtt.tls.key", "set mqtt.tls.cert too (mutual TLS needs both)")
    if errors.items:
        raise ConfigError(errors.items)
    environ: Mapping[str, str] = os.environ if env is None else env
    if environ.get(ENV_PASSWORD):
        mq["password"] = environ[ENV_PASSWORD]
    if environ.get(ENV_USERNAME):
        mq["username"] = environ[ENV_USERNAME]
    return AgentConfig(data, _plain(raw), source)


def load_config(path: str, env: Optional[dict[str, str]] = None) -> AgentConfig:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    return validate(parse_yaml(text, path), path, env)


def merge_remote(base: AgentConfig, desired: Any) -> AgentConfig:
    """The configuration with a ``config/desired`` document applied, validated.

    Only :data:`REMOTE_SECTIONS` may be changed remotely; ``collectors`` replaces the
    list, the other sections are merged key by key. Raises ConfigError with the reason.
    """
    if not isinstance(desired, dict):
        raise ConfigError(["config: expected a mapping"])
    bad = [k for k in desired if k not in REMOTE_SECTIONS]
    if bad:
        raise ConfigError(
            [
                f"config.{k}: cannot be changed remotely; allowed: {', '.join(REMOTE_SECTIONS)}"
                for k in bad
            ]
        )
    raw = copy.deepcopy(base.raw)
    for key, value in desired.items():
        if key == "collectors" or not isinstance(value, dict) or not isinstance(raw.get(key), dict):
            raw[key] = value
        else:
            raw[key] = {**raw[key], **value}
    return validate(raw, "config/desired")


def resolve_queue_path(config: AgentConfig) -> str:
    path = config["queue"]["path"]
    if path:
        return str(os.path.expanduser(path))
    state = os.environ.get("STATE_DIRECTORY")
    if state:
        return os.path.join(state.split(":")[0], "queue.db")
    if os.access("/var/lib/millstream", os.W_OK):
        return "/var/lib/millstream/queue.db"
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "millstream", "queue.db")


# --- sample-config --------------------------------------------------------------------


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        plain = _PLAIN.match(value) and value.lower() not in _YAML_WORDS
        if plain and not _NUMBERISH.match(value):
            return value
        return json.dumps(value)
    return str(value)


_PLAIN = re.compile(r"^[A-Za-z0-9_./@-][A-Za-z0-9_./:@-]*$")
_NUMBERISH = re.compile(r"^[-+]?[0-9.]")
_YAML_WORDS = {"null", "true", "false", "yes", "no", "on", "off", "y", "n", "~"}


def _sample_value(opt: Opt) -> str:
    value = opt.example if opt.required and opt.example is not None else opt.default
    if opt.kind == "duration" and value is not None:
        return format_duration(float(value))
    if opt.kind == "size" and value is not None:
        for unit, size in (("GB", 1000**3), ("MB", 1000**2), ("KB", 1000)):
            if value % size == 0:
                return f"{value // size}{unit}"
    return _yaml_value(value)


def _emit(spec: Spec, indent: int, lines: list[str], overrides: dict[str, Any], path: str) -> None:
    pad = "  " * indent
    for name, item in spec.items():
        key = f"{path}.{name}" if path else name
        if isinstance(item, Section):
            lines.append(f"{pad}# {item.doc}")
            lines.append(f"{pad}{name}:")
            _emit(item.fields, indent + 1, lines, overrides, key)
            if indent == 0:
                lines.append("")
            continue
        value = _yaml_value(overrides[key]) if key in overrides else _sample_value(item)
        lines.append(f"{pad}{name}: {value}  # {item.doc}")


def sample_config(
    broker: str = "mqtt://127.0.0.1:1883",
    queue_path: Optional[str] = None,
    device_id: str = "press-01",
    site: str = "plant-a",
) -> str:
    """A complete configuration: every option, its default and why; it runs as it is."""
    from millstream_agent.collectors import collector_class

    lines = [
        "# Millstream edge agent configuration (millstream-agent run -c THIS_FILE).",
        "# Every option is shown with its default. Durations: 500ms, 1s, 5m, 1h, 7d.",
        "# Sizes: 64MB, 1GiB or bytes. Validate with: millstream-agent check-config FILE",
        "",
    ]
    overrides: dict[str, Any] = {
        "mqtt.broker": broker,
        "device.id": device_id,
        "device.site": site,
        "device.kind": "motor",
    }
    if queue_path:
        overrides["queue.path"] = queue_path
    _emit(SPEC, 0, lines, overrides, "")
    cls = collector_class("simulated")
    spec = getattr(cls, "options_spec", {}) or {}
    lines.append("# what to collect: one block per source, each its own type and options")
    lines.append("collectors:")
    first = True
    for name, opt in COLLECTOR_FIELDS.items():
        value = {"type": "simulated", "name": "machine"}.get(name)
        text = _yaml_value(value) if value is not None else _sample_value(opt)
        lines.append(f"  {'- ' if first else '  '}{name}: {text}  # {opt.doc}")
        first = False
    lines.append("    options:  # the collector's own block (options_spec of its type)")
    sample_opts = {"kind": "motor", "metrics": 10, "seed": 1}
    for key, (_typ, default, doc) in spec.items():
        lines.append(f"      {key}: {_yaml_value(sample_opts.get(key, default))}  # {doc}")
    lines.append("")
    return "\n".join(lines)


__all__ = [
    "REMOTE_SECTIONS",
    "AgentConfig",
    "ConfigError",
    "load_config",
    "merge_remote",
    "parse_yaml",
    "resolve_queue_path",
    "sample_config",
    "validate",
]
