"""Property-based fuzzing of what untrusted parties hand us: the cloud's payload decoder
(anything a device, or whoever holds its key, can publish), the agent's config loader
(files edited by hand on a Pi, and desired config pushed from the cloud), and the cloud's
settings and alert rule files (edited by hand too).

The property is the same for all: never crash, always a clear error. Every input is
either accepted or rejected with the module's own error type and a non-empty message;
no other exception escapes. The example counts add up to 11,100 per run: 7,000 for the
decoder, 3,000 for the config loader and 500 for the desired config the cloud pushes, 600
for the cloud's files (``MILLSTREAM_FUZZ_SCALE`` multiplies them, e.g. 10 for a long
run). Runs are derandomized, so a failure reproduces on the next run.
"""

from __future__ import annotations

import json
import math
import os
import string
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SCALE = float(os.environ.get("MILLSTREAM_FUZZ_SCALE", "1"))


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        deadline=None,
        database=None,  # no .hypothesis/ state: every run starts fresh, reproducibly seeded
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# -- shared building blocks ------------------------------------------------------------------
ID_CHARS = string.ascii_letters + string.digits + "_.-"
# Cheap generators (st.from_regex is slow): mostly valid ids, metrics and timestamps.
ids = st.text(alphabet=ID_CHARS, min_size=1, max_size=12).map(lambda s: "d" + s)
metrics = st.text(alphabet=ID_CHARS, min_size=0, max_size=12).map(lambda s: "m" + s)
weird_text = st.text(max_size=20)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | weird_text
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(weird_text, inner, max_size=3),
    max_leaves=8,
)
timestamps = st.one_of(
    st.integers(min_value=0, max_value=7_258_118_400_000_000).map(
        lambda us: time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(us // 1_000_000))
        + f".{us % 1_000_000:06d}Z"
    ),
    st.tuples(
        st.integers(0, 9999), st.integers(0, 99), st.integers(0, 99),
        st.integers(0, 99), st.integers(0, 99), st.integers(0, 99),
    ).map(lambda t: "{:04d}-{:02d}-{:02d}T{:02d}:{:02d}:{:02d}Z".format(*t)),
    weird_text,
)  # fmt: skip


def maybe(strategy: st.SearchStrategy[Any], other: st.SearchStrategy[Any] = json_scalars) -> Any:
    """Mostly the well-formed value, sometimes anything at all."""
    return st.one_of(strategy, strategy, strategy, other)


# -- cloud payload decoder -------------------------------------------------------------------
decode = pytest.importorskip(
    "millstream_cloud.ingest.decode", reason="the cloud decoder (issue 5) is not on this branch"
)
NOW_NS = time.time_ns()

readings = st.fixed_dictionaries(
    {
        "ts": maybe(timestamps),
        "metric": maybe(metrics),
        "value": maybe(
            st.floats(allow_nan=False, allow_infinity=False) | st.booleans() | st.integers()
        ),
    },
    optional={
        "unit": maybe(st.text(max_size=40)),
        "quality": maybe(st.sampled_from(["good", "uncertain", "bad", "meh"])),
        "extra": json_scalars,
    },
)


@st.composite
def telemetry(draw: st.DrawFn) -> tuple[str, bytes]:
    site, device = draw(ids), draw(ids)
    body: dict[str, Any] = {
        "v": draw(maybe(st.just(1))),
        "device": draw(maybe(st.just(device) | ids)),
        "seq": draw(maybe(st.integers(min_value=-5, max_value=2**64))),
        "readings": draw(maybe(st.lists(readings, max_size=4))),
    }
    for key, strategy in (
        ("sent_at", timestamps),
        ("clock", st.sampled_from(["synced", "unsynced", "maybe"])),
        ("bogus", json_values),
    ):
        if draw(st.booleans()):
            body[key] = draw(strategy)
    for key in draw(st.lists(st.sampled_from(sorted(body)), max_size=2)):
        body.pop(key, None)  # drop required keys now and then
    text = json.dumps(body, ensure_ascii=draw(st.booleans()))
    mutation = draw(st.integers(0, 9))
    if mutation == 0:  # truncate
        text = text[: draw(st.integers(0, len(text)))]
    elif mutation == 1:  # tokens that are not JSON, inside otherwise valid JSON
        text = text.replace(
            "0", draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999"])), 1
        )
    elif mutation == 2:  # flip one byte
        pos = draw(st.integers(0, max(0, len(text) - 1)))
        text = text[:pos] + draw(st.sampled_from(list('{}[]",:\\\x00\u2028'))) + text[pos + 1 :]
    channel = draw(
        maybe(st.just("telemetry"), st.sampled_from(["status", "cmd/x", "", "telemetry/x"]))
    )
    topic = f"millstream/v1/{site}/{device}/{channel}"
    if draw(st.integers(0, 9)) == 0:
        topic = draw(weird_text)
    payload = text.encode("utf-8", "surrogatepass")
    return topic, payload


def assert_clear_rejection(exc: BaseException) -> None:
    assert isinstance(exc, decode.DecodeError), f"{type(exc).__name__} escaped: {exc!r}"
    assert str(exc).strip(), "a DecodeError without a message"
    assert isinstance(exc.reason, str) and exc.reason


def decode_or_reject(topic: str, payload: bytes) -> Any:
    try:
        return decode.decode_telemetry(topic, payload, NOW_NS)
    except Exception as exc:
        assert_clear_rejection(exc)
        return None


@fuzz(3000)
@given(telemetry())
def test_decoder_structured_fuzz(message: tuple[str, bytes]) -> None:
    batch = decode_or_reject(*message)
    if batch is not None:
        body = json.loads(message[1])
        assert batch.device == body["device"] == message[0].split("/")[3]
        assert len(batch.readings) == len(body["readings"])
        assert all(math.isfinite(r.value) for r in batch.readings)


@fuzz(2000)
@given(
    topic=st.one_of(st.just("millstream/v1/s/d/telemetry"), weird_text),
    payload=st.binary(max_size=512),
)
def test_decoder_arbitrary_bytes(topic: str, payload: bytes) -> None:
    decode_or_reject(topic, payload)


@fuzz(1000)
@given(json_values)
def test_decoder_arbitrary_json(value: Any) -> None:
    decode_or_reject("millstream/v1/s/d/telemetry", json.dumps(value).encode())


@fuzz(300)
@given(depth=st.integers(1, 5000), opener=st.sampled_from(["[", '{"a":']))
def test_decoder_deep_nesting(depth: int, opener: str) -> None:
    decode_or_reject("millstream/v1/s/d/telemetry", (opener * depth).encode())


@fuzz(700)
@given(telemetry())
def test_status_decoder(message: tuple[str, bytes]) -> None:
    topic = message[0].rsplit("/", 1)[0] + "/status"
    try:
        decode.decode_status(topic, message[1])
    except Exception as exc:
        assert_clear_rejection(exc)


def test_decoder_accepts_a_valid_message() -> None:
    payload = json.dumps(
        {
            "v": 1,
            "device": "d",
            "seq": 1,
            "readings": [{"ts": "2026-01-01T00:00:00Z", "metric": "m", "value": 1.5}],
        }
    ).encode()
    assert decode_or_reject("millstream/v1/s/d/telemetry", payload) is not None


# -- agent config loader ---------------------------------------------------------------------
def agent_config() -> Any:
    module = pytest.importorskip(
        "millstream_agent.config", reason="the agent config loader (issue 4) is not on this branch"
    )
    if not hasattr(module, "ConfigError"):
        pytest.skip("millstream_agent.config has no ConfigError yet")
    return module


def load_text(module: Any, text: str) -> Any:
    """The loader's text entry point, whatever this version names it."""
    if hasattr(module, "parse_config"):
        return module.parse_config(text)
    return module.validate(module.parse_yaml(text, "<fuzz>"), "<fuzz>", {})


yaml_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), weird_text,
    st.sampled_from(["1s", "10m", "-1s", "1h30m", "5 MiB", "mqtts://h:8883", "mqtt://", "0x1F"]),
)  # fmt: skip
yaml_values = st.recursive(
    yaml_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(weird_text, inner, max_size=4),
    max_leaves=15,
)
VALID_AGENT = {
    "device": {"id": "press-01", "site": "plant-a", "kind": "motor"},
    "mqtt": {
        "broker": "mqtts://broker.example:8883",
        "tls": {"ca": "/etc/millstream/ca.crt", "cert": "/etc/c.crt", "key": "/etc/c.key"},
    },
    "collectors": [{"type": "simulated", "name": "machine", "options": {"kind": "motor"}}],
}


@st.composite
def agent_documents(draw: st.DrawFn) -> dict[str, Any]:
    """The valid config with sections, keys and values replaced, added or removed."""
    doc: dict[str, Any] = json.loads(json.dumps(VALID_AGENT))
    for _ in range(draw(st.integers(0, 4))):
        section = draw(st.sampled_from(["device", "mqtt", "collectors", "queue", "bogus"]))
        action = draw(st.integers(0, 3))
        if action == 0:
            doc[section] = draw(yaml_values)
        elif action == 1:
            doc.pop(section, None)
        elif isinstance(doc.get(section), dict):
            key = draw(
                st.sampled_from(["id", "site", "broker", "tls", "keepalive", "port", "x"])
                | weird_text
            )
            doc[section][key] = draw(yaml_values)
        elif isinstance(doc.get(section), list) and doc[section]:
            block = doc[section][0]
            if isinstance(block, dict):
                key = draw(st.sampled_from(["type", "name", "interval", "options", "x"]))
                block[key] = draw(yaml_values)
    return doc


def assert_clear_config_error(module: Any, exc: BaseException) -> None:
    assert isinstance(exc, module.ConfigError), f"{type(exc).__name__} escaped: {exc!r}"
    assert str(exc).strip(), "a ConfigError without a message"


@fuzz(1500)
@given(agent_documents(), st.booleans())
def test_agent_config_structured_fuzz(doc: dict[str, Any], flow: bool) -> None:
    import yaml

    module = agent_config()
    text = yaml.safe_dump(doc, default_flow_style=flow, allow_unicode=True)
    try:
        load_text(module, text)
    except Exception as exc:
        assert_clear_config_error(module, exc)


@fuzz(1500)
@given(
    st.one_of(
        st.text(max_size=300),
        st.text(alphabet=string.printable, max_size=300),
        st.lists(
            st.sampled_from(
                ["device:", "  id: x", "mqtt:", "  broker: mqtt://h", "collectors:", "- type: simulated",
                 "  - ", "\t", "&a", "*a", "<<: *a", "!!python/object:os.system", "? ", "---", "...",
                 "%YAML 1.1", "  name: [", "key: {", "'", '"']
            ),
            max_size=12,
        ).map("\n".join),
    )
)  # fmt: skip
def test_agent_config_arbitrary_text(text: str) -> None:
    module = agent_config()
    try:
        load_text(module, text)
    except Exception as exc:
        assert_clear_config_error(module, exc)


def test_agent_config_valid_document_loads() -> None:
    import yaml

    module = agent_config()
    config = load_text(module, yaml.safe_dump(VALID_AGENT))
    assert config["device"]["id"] == "press-01"


_remote_values = st.recursive(
    yaml_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.sampled_from(
                ["batch", "max_readings", "max_delay", "collectors", "type", "name",
                 "interval", "options", "enabled", "self_monitoring", "log", "level",
                 "registers", "address", "nodes", "node_id", "metrics", "faults", "mqtt",
                 "device", "queue", "x"]
            ),
            inner,
            max_size=5,
        ),
    ),
    max_leaves=30,
)  # fmt: skip


@fuzz(500)
@given(
    st.one_of(
        _remote_values,
        st.dictionaries(
            st.sampled_from(["batch", "collectors", "self_monitoring", "log"]),
            _remote_values,
            max_size=4,
        ),
    )
)
def test_agent_remote_config_fuzz(desired: Any) -> None:
    # config/desired: whoever may publish to a device's topics can send it anything.
    import yaml

    module = agent_config()
    base = load_text(module, yaml.safe_dump(VALID_AGENT))
    try:
        module.merge_remote(base, desired)
    except Exception as exc:
        assert_clear_config_error(module, exc)


@pytest.mark.parametrize("text", ["? 0:", "? [a]: 1", "{[1]: 2}"])
def test_agent_config_complex_keys_are_a_config_error(text: str) -> None:
    module = agent_config()
    try:
        load_text(module, text)
    except Exception as exc:
        assert_clear_config_error(module, exc)


# -- the cloud's settings file and alert rule files ------------------------------------------
# Written by hand by whoever runs the service; the property as above: loaded, or refused
# with the loader's own error naming what is wrong, nothing else.
CLOUD_KEYS = [
    "mqtt", "broker", "storage", "backend", "embedded", "influxdb", "url", "detection",
    "engine", "rules", "match", "kind", "metric", "mv_on", "mv_off", "streaming",
    "alert_level", "alerts", "route", "receivers", "receiver", "name", "webhook_configs",
    "api", "port", "host", "ingest", "max_payload_bytes", "warmup", "mv_spans", "group_by",
    "matchers", "inhibit_rules", "shards", "feed", "shard", "components", "tail_fit",
    "grafana_url", "rule_files", "enabled", "data_dir",
]  # fmt: skip
RULE_KEYS = [
    "name", "type", "metric", "op", "threshold", "clear", "for", "labels", "annotations",
    "matchers", "min_likelihood", "resolve_after", "scope", "after", "per", "window",
    "keep_firing_for", "detector", "stale_after", "expr",
]  # fmt: skip
_cloud_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(10**20), 10**20),
        st.floats(),
        st.text(max_size=12),
        st.sampled_from(["embedded", "influxdb", "mqtt://127.0.0.1:1", "all", "1h", "{device}"]),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.one_of(st.sampled_from(CLOUD_KEYS + RULE_KEYS), st.text(max_size=5)),
            inner,
            max_size=5,
        ),
    ),
    max_leaves=25,
)


@fuzz(300)
@given(
    st.dictionaries(
        st.sampled_from(["mqtt", "storage", "detection", "alerts", "api", "ingest", "data_dir"]),
        _cloud_values,
        max_size=4,
    )
)
def test_cloud_settings_structured_fuzz(doc: dict[str, Any]) -> None:
    import tempfile

    import yaml

    from millstream_cloud.settings import SettingsError, load_settings

    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/cloud.yaml"
        with open(path, "w", encoding="utf-8") as f:
            f.write(yaml.safe_dump(doc))
        try:
            load_settings(path, environ={})
        except SettingsError as exc:
            assert str(exc).strip()


@fuzz(300)
@given(st.lists(st.dictionaries(st.sampled_from(RULE_KEYS), _cloud_values, max_size=7), max_size=3))
def test_alert_rules_structured_fuzz(rules: list[dict[str, Any]]) -> None:
    from millstream_cloud.alerts.rules import RuleError, parse_rules

    try:
        parse_rules({"rules": rules})
    except RuleError as exc:
        assert str(exc).strip()
