"""All of the cloud service's configuration, in one place, with documented defaults.

Precedence, lowest to highest: defaults here < YAML settings file < environment
(``MILLSTREAM_<SECTION>__<KEY>``, e.g. ``MILLSTREAM_MQTT__BROKER``) < command-line flags.
Unknown keys are errors: a typo must not silently fall back to a default.
"""

from __future__ import annotations

import functools
import os
import re
import socket
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from millstream_cloud.alerts.settings import AlertSettings
from millstream_cloud.hints import KeyedValueError, likely_meant


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TLSSettings(Section):
    ca: str | None = Field(
        None, description="CA certificate (PEM) that signed the broker's certificate"
    )
    cert: str | None = Field(None, description="client certificate (PEM) for mutual TLS")
    key: str | None = Field(None, description="client private key (PEM) for mutual TLS")
    server_hostname: str | None = Field(
        None, description="name to verify instead of the URL's host"
    )


class MQTTSettings(Section):
    broker: str = Field(
        "mqtt://127.0.0.1:1883", description="mqtt:// or mqtts:// URL of the broker"
    )
    protocol: Literal["5", "3.1.1"] = Field(
        "5",
        description="MQTT version; 3.1.1 only for brokers without MQTT 5 (no shared "
        "subscriptions, no session expiry): the demo's embedded broker",
    )
    client_id: str = Field(
        "millstream-cloud-1",
        description="stable per worker: the broker keeps the persistent session under it",
    )
    shared_group: str | None = Field(
        "millstream",
        description="shared subscription group ($share/<group>/...); workers in one group split the load",
    )
    username: str | None = Field(None, description="broker user name")
    password: str | None = Field(None, description="prefer MILLSTREAM_MQTT__PASSWORD")
    tls: TLSSettings = Field(default_factory=TLSSettings)
    keepalive_s: int = Field(
        30, ge=5, description="MQTT keepalive; a dead link is noticed after 1.5x this"
    )
    session_expiry_s: int = Field(
        7 * 86400, ge=0, description="how long the broker keeps our queue while we are away"
    )
    ack_batch: int = Field(
        1000,
        ge=1,
        description="messages per group: stored in one transaction, then acknowledged together",
    )
    receive_maximum: int = Field(
        4000,
        ge=1,
        le=65535,
        description="unacknowledged messages the broker may send us (MQTT 5 Receive Maximum); keep above ack_batch",
    )

    @model_validator(mode="after")
    def _window_holds_a_group(self) -> MQTTSettings:
        if self.ack_batch > self.receive_maximum:
            raise ValueError(
                f"ack_batch ({self.ack_batch}) must not exceed receive_maximum "
                f"({self.receive_maximum}): a group would never fill"
            )
        return self

    @property
    def shared(self) -> bool:
        """Whether workers split the messages on a shared subscription (MQTT 3.1.1 has
        no ``$share``: each worker then receives every message)."""
        return bool(self.shared_group) and self.protocol == "5"


class IngestSettings(Section):
    rate_limit_per_device: float | None = Field(
        50.0,
        gt=0,
        description="messages per second one device may send (token bucket); none: unlimited",
    )
    rate_limit_burst: float = Field(
        1000.0, ge=1, description="messages a device may send at once above its rate"
    )
    max_payload_bytes: int = Field(
        256 * 1024, ge=1024, description="larger messages are dead-lettered"
    )
    max_readings_per_message: int = Field(
        10_000, ge=1, description="more readings in one message are dead-lettered"
    )
    max_metric_length: int = Field(
        128, ge=1, le=128, description="longer metric names are dead-lettered"
    )
    max_metrics_per_device: int = Field(
        1_000,
        ge=1,
        description="metric cardinality limit per device; new metrics beyond it are rejected",
    )
    clock_skew_bound_s: float = Field(
        5.0,
        gt=0,
        description="source time ahead of arrival by more than this is flagged as clock skew",
    )
    future_bound_s: float = Field(
        300.0, gt=0, description="readings further ahead are stored at arrival time (original kept)"
    )
    max_future_s: float = Field(
        365 * 86400.0, gt=0, description="readings further ahead still are rejected as garbage"
    )
    dead_letter_max: int = Field(10_000, ge=0, description="dead letters kept; oldest out")
    queue_max_messages: int = Field(
        10_000, ge=1, description="bounded queue between subscriber and writer (backpressure)"
    )
    queue_max_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024 * 1024,
        description="payload bytes received and not yet stored, at most (backpressure)",
    )
    write_max_delay_s: float = Field(
        0.05, ge=0, description="longest a message waits to be grouped"
    )
    unknown_devices: str = Field(
        "accept",
        pattern="^(accept|reject)$",
        description="accept: a device appears on its first message; reject: only registered devices",
    )


class EmbeddedSettings(Section):
    """The embedded store (see docs/storage.md): one directory, no server."""

    path: str | None = Field(
        None, description="directory of the store; default <data_dir>/embedded"
    )
    synchronous: str = Field(
        "full",
        pattern="^(full|normal)$",
        description="full: every write is fsynced before it returns (survives power loss); "
        "normal: survives a process crash, may lose the last writes on power loss",
    )
    chunk_s: int = Field(
        3600,
        ge=60,
        description="time window of one compacted chunk per series (fixed when the store is created)",
    )
    compact_interval_s: float = Field(
        30.0,
        gt=0,
        description="how often recent writes are compacted into per-series chunks; each "
        "compaction rewrites the open chunk of every active series, so not too often",
    )
    memtable_max_points: int = Field(
        500_000,
        ge=1_000,
        description="compact as soon as this many points wait in memory; writers wait at 4x this",
    )
    retention_s: int = Field(
        365 * 86400, ge=0, description="chunks older than this are dropped; 0 keeps everything"
    )
    downsample_after_s: int = Field(
        30 * 86400,
        ge=0,
        description="numeric chunks older than this keep only per-bucket aggregates; 0 never",
    )
    downsample_every_s: int = Field(
        60, ge=1, description="bucket width of downsampled data (must divide chunk_s)"
    )
    maintenance_interval_s: float = Field(
        600.0, gt=0, description="how often retention and downsampling run (first run after this)"
    )


class InfluxDBSettings(Section):
    """The InfluxDB backend (1.x, 2.x, 3.x); see docs/storage.md."""

    url: str = Field("http://127.0.0.1:8086", description="base URL of the InfluxDB server")
    api: str = Field(
        "v2",
        pattern="^(v1|v2)$",
        description="v2: write through /api/v2/write (InfluxDB 1.8+, 2.x, 3.x); "
        "v1: /write?db=&rp= (InfluxDB before 1.8)",
    )
    token: str | None = Field(
        None, description="API token (2.x/3.x); prefer MILLSTREAM_STORAGE__INFLUXDB__TOKEN"
    )
    username: str | None = Field(None, description="1.x user (or v1 auth on 2.x)")
    password: str | None = Field(None, description="prefer MILLSTREAM_STORAGE__INFLUXDB__PASSWORD")
    org: str = Field("-", description="organization for /api/v2/write ('-' on InfluxDB 1.8)")
    bucket: str | None = Field(
        None, description="bucket for /api/v2/write; default <database>/<retention_policy>"
    )
    database: str = Field("millstream", description="database for InfluxQL /query (and v1 /write)")
    retention_policy: str = Field("", description="retention policy; empty: the database default")
    create_database: bool = Field(
        True, description="v1: CREATE DATABASE at start (idempotent; needs admin on 1.x with auth)"
    )
    create_dbrp: bool = Field(
        False,
        description="2.x: create the database/retention-policy mapping for the bucket at start",
    )
    batch_size: int = Field(5_000, ge=1, description="points per write request")
    timeout_s: float = Field(10.0, gt=0, description="HTTP timeout of one request")
    gzip: bool = Field(False, description="gzip write bodies")
    verify_tls: bool = Field(True, description="verify the server certificate for https URLs")
    ca_cert: str | None = Field(None, description="CA bundle (PEM) for https URLs")
    spool_dir: str | None = Field(
        None,
        description="where writes wait while InfluxDB is down; default <data_dir>/influx-spool",
    )
    spool_max_bytes: int = Field(
        2 * 1024**3,
        ge=1024 * 1024,
        description="when the spool is this full, writes fail (ingest then stops acking)",
    )
    retry_initial_s: float = Field(0.5, gt=0, description="first retry delay of the spool")
    retry_max_s: float = Field(5.0, gt=0, description="longest retry delay of the spool")


class StorageSettings(Section):
    backend: str = Field("embedded", description="embedded | influxdb")
    embedded: EmbeddedSettings = Field(default_factory=EmbeddedSettings)
    influxdb: InfluxDBSettings = Field(default_factory=InfluxDBSettings)

    @field_validator("backend")
    @classmethod
    def _backend_known(cls, value: str) -> str:
        """A misspelt backend is refused by ``check-config``, not first by ``serve``."""
        from millstream_cloud.storage.base import backend_names

        known = backend_names()
        if value not in known:
            meant = likely_meant(value, known)
            hint = f" (did you mean {meant!r}?)" if meant else ""
            raise ValueError(f"unknown backend {value!r}; known: {', '.join(known)}{hint}")
        return value


class RegistrySettings(Section):
    url: str | None = Field(
        None,
        description="postgresql://... to share the device registry between hosts (needs psycopg); default: SQLite in data_dir",
    )


class RemoteSettings(Section):
    command_timeout_s: float = Field(
        10.0, gt=0, le=300, description="default wait for a command result"
    )
    max_command_timeout_s: float = Field(
        120.0, gt=0, description="longest wait a caller may ask for (timeout parameter)"
    )


class APISettings(Section):
    host: str = Field(
        "127.0.0.1", description="bind address; beyond loopback API tokens are required"
    )
    port: int = Field(8000, ge=0, le=65535, description="API port")
    insecure: bool = Field(False, description="allow binding beyond loopback without API tokens")
    page_size: int = Field(
        1000, ge=1, le=100_000, description="default page size of list endpoints"
    )
    tokens_file: str | None = Field(
        None, description="API token store (hashed); default <data_dir>/security/tokens.sqlite3"
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="origins allowed by CORS; empty: CORS off"
    )
    max_request_bytes: int = Field(
        1_048_576, ge=1024, description="larger request bodies are refused with 413"
    )


class DetectionSettings(Section):
    enabled: bool = Field(True, description="run the anomaly detectors on every stored reading")
    queue_max_readings: int = Field(
        200_000,
        ge=1000,
        description="readings waiting for the detectors; beyond it a batch's devices fall "
        "behind: their readings stay in the store and are read back and scored, in order, "
        "once the queue is empty, so detection never slows ingest and loses nothing",
    )
    save_interval_s: float = Field(
        300.0, gt=0, description="how often detector state is saved (and at shutdown)"
    )
    feed: Literal["stored", "all"] = Field(
        "stored",
        description="stored: score the readings this worker stores (one worker); all: the "
        "detecting worker also subscribes to every device's telemetry outside the shared "
        "group and scores that, so it sees every message when several workers split "
        "ingest (docs/cloud.md, Several workers)",
    )
    processes: int = Field(
        1,
        ge=1,
        le=64,
        description="processes that score detection on this host, each taking the devices "
        "of one partition (a stable hash of the device id); 1 scores in the service process. "
        "More use more cores (docs/cloud.md, Several workers)",
    )
    shards: int = Field(
        1,
        ge=1,
        le=1024,
        description="detecting workers (hosts) that split the devices between them, each "
        "scoring those of its shard (a stable hash of the device id) from every message "
        "(detection.feed: all); 1: one worker detects for the whole fleet (docs/cloud.md, "
        "Several workers)",
    )
    shard: int = Field(
        0,
        ge=0,
        description="which shard this worker scores, 0 .. shards - 1",
    )
    engine: dict[str, Any] = Field(
        default_factory=dict,
        description="overrides of the frozen detector settings (docs/detection.md)",
    )

    rules: list[dict[str, Any]] = Field(
        default_factory=list,
        description="per device kind, device or metric overrides of the engine settings, "
        "applied in order (docs/detection.md)",
    )

    @field_validator("engine")
    @classmethod
    def _engine_known(cls, value: dict[str, Any]) -> dict[str, Any]:
        from millstream_cloud.detection.engine import settings_from_mapping

        settings_from_mapping(value)  # raises ValueError naming the key
        return value

    @field_validator("rules")
    @classmethod
    def _rules_valid(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from millstream_cloud.detection.rules import parse_rules

        parse_rules(value)  # raises ValueError naming the rule and the key
        return value

    @model_validator(mode="after")
    def _shard_in_range(self) -> DetectionSettings:
        if self.shard >= self.shards:
            raise ValueError(
                f"detection.shard {self.shard} is not one of the {self.shards} shards "
                f"(0 .. {self.shards - 1})"
            )
        return self

    @model_validator(mode="after")
    def _rules_fit_engine(self) -> DetectionSettings:
        from millstream_cloud.detection.engine import check_rules, settings_from_mapping
        from millstream_cloud.detection.rules import parse_rules

        check_rules(settings_from_mapping(self.engine), parse_rules(self.rules))
        return self


class Settings(Section):
    data_dir: str = Field("./millstream-data", description="where the service keeps its state")
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR")
    mqtt: MQTTSettings = Field(default_factory=MQTTSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    api: APISettings = Field(default_factory=APISettings)
    alerts: AlertSettings = Field(default_factory=AlertSettings)
    registry: RegistrySettings = Field(default_factory=RegistrySettings)
    remote: RemoteSettings = Field(default_factory=RemoteSettings)
    detection: DetectionSettings = Field(default_factory=DetectionSettings)

    @model_validator(mode="after")
    def _links_to_own_api(self) -> Settings:
        # Unless set, notifications link to this service's API where it actually listens
        # (as Alertmanager derives its external URL from its listen address).
        if "external_url" not in self.alerts.model_fields_set:
            self.alerts.external_url = api_url(self.api.host, self.api.port)
        return self

    @model_validator(mode="after")
    def _shards_see_every_message(self) -> Settings:
        # A shard's devices must reach it whole: a worker of a shared group stores a
        # round-robin share of every device's messages, so sharded detection takes the feed.
        d = self.detection
        if d.shards > 1 and d.enabled and self.mqtt.shared and d.feed != "all":
            raise ValueError(
                f"detection.shards {d.shards} needs detection.feed: all when workers share a "
                f"subscription (mqtt.shared_group {self.mqtt.shared_group!r}): fed by its own "
                "share of the messages, a shard would score every other message of its devices"
            )
        return self

    @property
    def data_path(self) -> Path:
        path = Path(self.data_dir)
        path.mkdir(parents=True, exist_ok=True)
        return path


def api_url(host: str, port: int) -> str:
    """The URL of an API bound to ``host``:``port``; a wildcard bind is named by this
    machine's host name, which is what another machine would use to reach it."""
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()  # no DNS lookup, as Alertmanager does
    elif ":" in host:
        host = f"[{host}]"  # an IPv6 address
    return f"http://{host}:{port}"


class SettingsError(ValueError):
    """A settings file or variable that cannot be used; the message names the key."""


ENV_PREFIX = "MILLSTREAM_"


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        if "__" not in name:
            # top-level keys (MILLSTREAM_DATA_DIR, MILLSTREAM_LOG_LEVEL); other
            # MILLSTREAM_* variables (tests, tools) are not settings
            key = name[len(ENV_PREFIX) :].lower()
            field = Settings.model_fields.get(key)
            if field is not None and field.annotation in (str, int, float, bool):
                tree[key] = value
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Line (1-based) of every key in a YAML document, by its path of keys and indexes."""
    out: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = (*path, str(key.value))
                out[sub] = key.start_mark.line + 1
                walk(value, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                sub = (*path, str(i))
                out[sub] = item.start_mark.line + 1
                walk(item, sub)

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return out


def _paths(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for key, value in tree.items():
        out.append((*prefix, str(key)))
        if isinstance(value, dict):
            out += _paths(value, (*prefix, str(key)))
    return out


@functools.cache
def _known_keys() -> tuple[tuple[str, ...], ...]:
    """Every settings key, by its path: the sections' fields and the detection engine's."""
    from millstream_cloud.detection.engine import EngineSettings

    def walk(model: type[BaseModel], prefix: tuple[str, ...]) -> list[tuple[str, ...]]:
        out = []
        for name, field in model.model_fields.items():
            out.append((*prefix, name))
            kind = field.annotation
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                out += walk(kind, (*prefix, name))
        return out

    engine: list[tuple[str, ...]] = [
        ("detection", "engine", name) for name in EngineSettings.__dataclass_fields__
    ]
    return tuple(walk(Settings, ()) + engine)


def _did_you_mean(loc: tuple[str, ...]) -> str:
    """For an unknown key: the key of that name in another section (a detector setting
    put under ``detection:`` rather than ``detection.engine:``), else a known key of the
    same section spelt alike; empty when nothing is close."""
    known = _known_keys()
    same_name = [".".join(k) for k in known if k[-1] == loc[-1] and k != loc]
    if same_name:
        return f" (did you mean {' or '.join(repr(k) for k in same_name[:2])}?)"
    meant = likely_meant(loc[-1], (k[-1] for k in known if k[:-1] == loc[:-1]))
    return f" (did you mean {'.'.join((*loc[:-1], meant))!r}?)" if meant else ""


def _keyed(err: ErrorDetails) -> KeyedValueError | None:
    """The check's own error when it knows its key (the engine's settings: each is told
    at its own key and line, not at ``engine``, which holds them all)."""
    exc = (err.get("ctx") or {}).get("error")
    return exc if isinstance(exc, KeyedValueError) else None


def _explain(
    exc: ValidationError, source: str, where: dict[tuple[str, ...], int] | None = None
) -> SettingsError:
    """One line per problem: the file and line of the key when it came from the file."""
    lines = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        msg = err["msg"]
        if err["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key" + _did_you_mean(loc)
        if loc == ("detection", "engine") and (keyed := _keyed(err)):
            loc, msg = (*loc, *keyed.path), keyed.problem
        if not loc:  # a check across sections names the key it is about first
            named = re.match(r"([a-z_]+(?:\.[a-z_]+)+)", msg)
            loc = tuple(named.group(1).split(".")) if named else ()
        key = ".".join(loc)
        line = next(
            (where[loc[:n]] for n in range(len(loc), 0, -1) if where and loc[:n] in where),
            None,
        )
        what = f"{key}: {msg}" if key else msg
        lines.append(f"{source}:{line}: {what}" if line else f"{source}: {what}")
    return SettingsError("\n".join(lines))


def load_settings(
    path: str | os.PathLike[str] | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Settings from defaults, an optional YAML file, the environment and ``overrides``."""
    data: dict[str, Any] = {}
    source = "settings"
    where: dict[tuple[str, ...], int] = {}
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
            loaded = yaml.safe_load(text) or {}
            where = _key_lines(text)
        except OSError as exc:
            raise SettingsError(f"{source}: cannot read: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise SettingsError(f"{source}: not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise SettingsError(f"{source}: the top level must be a mapping of sections")
        data = loaded
    env = _env_overrides(dict(os.environ if environ is None else environ))
    if env:
        data = _merge(data, env)
        source += " + environment"
    if overrides:
        data = _merge(data, overrides)
    # A key set by the environment or an override is not where the file's line says.
    for tree in (env, overrides or {}):
        for p in _paths(tree):
            where.pop(p, None)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise _explain(exc, source, where) from None
