"""Configuration: validated at start, errors name key and line, refusal = exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from millstream_agent.config import (
    ConfigError,
    load_config,
    merge_remote,
    parse_duration,
    parse_size,
    parse_yaml,
    sample_config,
    validate,
)

GOOD = """\
device:
  id: press-01
  site: plant-a
mqtt:
  broker: mqtt://127.0.0.1:1883
  keepalive: 30
queue:
  path: /tmp/q.db
  max_bytes: 64MB
  max_age: 1h
collectors:
  - type: simulated
    interval: 500ms
    options: {kind: motor, metrics: 4, seed: 7}
"""


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate(parse_yaml(text, "agent.yaml"), "agent.yaml", env={})
    return info.value.errors


def test_good_config_normalized() -> None:
    config = validate(parse_yaml(GOOD, "agent.yaml"), "agent.yaml", env={})
    assert config["device"]["id"] == "press-01"
    assert config["mqtt"]["keepalive"] == 30.0
    assert config["queue"]["max_bytes"] == 64_000_000
    assert config["queue"]["max_age"] == 3600.0
    assert config["batch"] == {"max_readings": 100, "max_delay": 1.0}
    [block] = config["collectors"]
    assert block["name"] == "simulated" and block["interval"] == 0.5
    assert {k: block["options"][k] for k in ("kind", "metrics", "seed")} == {
        "kind": "motor",
        "metrics": 4,
        "seed": 7,
    }


def test_invalid_yaml_names_line() -> None:
    [error] = errors_of("device:\n  id: press-01\n  site: [plant\ncollectors: []\n")
    assert error.startswith("agent.yaml:4: invalid YAML")


def test_unknown_key_names_key_and_line_with_hint() -> None:
    [error] = errors_of(GOOD.replace("  keepalive: 30", "  keepalive: 30\n  brokr: x"))
    assert error.startswith("agent.yaml:7: mqtt.brokr: unknown key (did you mean 'broker'?)")


def test_wrong_type_names_key_line_and_expectation() -> None:
    [error] = errors_of(GOOD.replace("keepalive: 30", "keepalive: often"))
    assert error == (
        "agent.yaml:6: mqtt.keepalive: expected a duration such as 500ms, 1s, 5m, 1h, 7d "
        "from 5 to 3600, got 'often'"
    )


def test_a_value_outside_its_choices_is_told_the_choices() -> None:
    [error] = errors_of(GOOD.replace("  keepalive: 30", "  keepalive: 30\n  qos: 2"))
    assert error == "agent.yaml:7: mqtt.qos: expected an integer: 1, got 2"


def test_collector_option_checked_against_options_spec() -> None:
    errors = errors_of(GOOD.replace("metrics: 4", "metrics: four, colour: red"))
    assert any(
        e.startswith("agent.yaml:14: collectors[0].options.metrics: expected an integer")
        for e in errors
    ), errors
    assert any("collectors[0].options.colour: unknown option" in e for e in errors), errors


def test_a_misspelt_register_or_node_option_is_told_the_option_it_was_meant_for() -> None:
    from millstream_agent.collectors._options import check_keys

    with pytest.raises(ValueError) as info:
        check_keys({"name": "temp", "adress": 3}, {"name", "address", "scale"}, "registers[0].")
    assert str(info.value) == (
        "registers[0].adress: unknown option (did you mean 'address'?); "
        "known options: address, name, scale"
    )


def test_collector_constructor_checks_values_beyond_types() -> None:
    [error] = errors_of(GOOD.replace("kind: motor", "kind: turbine"))
    assert error.startswith("agent.yaml:14: collectors[0].options: kind:"), error


def test_every_error_reported_at_once() -> None:
    text = GOOD.replace("id: press-01", "id: 'bad id!'").replace(
        "max_bytes: 64MB", "max_bytes: lots"
    )
    text = text.replace("type: simulated", "type: teleport")
    errors = errors_of(text)
    assert [e.split(":")[1] for e in errors] == ["2", "9", "12"], errors
    assert "collectors[0].type: unknown collector type 'teleport'" in errors[2]


def test_missing_required() -> None:
    errors = errors_of("device: {site: x}\n")
    assert any("device.id: missing" in e for e in errors)
    assert any("collectors: missing" in e for e in errors)


def test_env_overrides_secrets() -> None:
    config = validate(
        parse_yaml(GOOD.replace("keepalive: 30", "keepalive: 30\n  password: in-file")),
        env={"MILLSTREAM_MQTT_PASSWORD": "from-env", "MILLSTREAM_MQTT_USERNAME": "u"},
    )
    assert config["mqtt"]["password"] == "from-env"
    assert config["mqtt"]["username"] == "u"


def test_units() -> None:
    assert parse_duration("250ms") == 0.25
    assert parse_duration("7d") == 7 * 86400
    assert parse_duration(3) == 3.0
    assert parse_size("1GiB") == 1 << 30
    assert parse_size("10KB") == 10_000


def test_sample_config_is_complete_and_valid(tmp_path: Path) -> None:
    text = sample_config(broker="mqtts://broker.example:8883")
    config = validate(parse_yaml(text, "sample"), "sample", env={})
    assert config["mqtt"]["broker"] == "mqtts://broker.example:8883"
    [block] = config["collectors"]
    assert block["type"] == "simulated" and block["interval"] == 1.0
    assert block["options"]["metrics"] == 10
    # every option carries a comment saying why
    for line in text.splitlines():
        if ":" in line and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):
            assert "  # " in line, line


def test_remote_merge_only_allowed_sections() -> None:
    base = validate(parse_yaml(GOOD), env={})
    merged = merge_remote(base, {"batch": {"max_readings": 10}})
    assert merged["batch"]["max_readings"] == 10
    assert merged["batch"]["max_delay"] == 1.0
    with pytest.raises(ConfigError, match="mqtt: cannot be changed remotely"):
        merge_remote(base, {"mqtt": {"broker": "mqtt://evil:1883"}})
    with pytest.raises(ConfigError, match=r"collectors\[0\].interval"):
        merge_remote(base, {"collectors": [{"type": "simulated", "interval": "soon"}]})


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "millstream_agent.cli", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_cli_check_config_and_run_refuse_with_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "agent.yaml"
    bad.write_text(GOOD.replace("keepalive: 30", "keepalive: true"))
    result = run_cli("check-config", str(bad))
    assert result.returncode == 2
    assert f"{bad}:6: mqtt.keepalive: expected a duration" in result.stderr
    result = run_cli("run", "-c", str(bad))
    assert result.returncode == 2
    assert "mqtt.keepalive" in result.stderr and "refusing to start" in result.stderr
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    assert run_cli("check-config", str(good)).returncode == 0


def test_cli_sample_config_round_trip(tmp_path: Path) -> None:
    result = run_cli("sample-config", "--broker", "mqtt://10.0.0.5:1883")
    assert result.returncode == 0
    path = tmp_path / "sample.yaml"
    path.write_text(result.stdout)
    assert load_config(str(path), env={})["mqtt"]["broker"] == "mqtt://10.0.0.5:1883"
    assert run_cli("check-config", str(path)).returncode == 0


def test_collector_error_deep_in_options_names_its_line() -> None:
    pytest.importorskip("pymodbus")
    text = """\
device: {id: press-01}
collectors:
  - type: modbus
    options:
      host: 127.0.0.1
      registers:
        - {name: a, address: 0}
        - {name: b, address: 2, data_type: int17}
"""
    [error] = errors_of(text)
    assert error.startswith("agent.yaml:8: collectors[0].options: registers[1].data_type"), error
