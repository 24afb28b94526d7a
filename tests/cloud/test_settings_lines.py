"""A bad cloud settings file is refused with the file, the line and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from millstream_cloud.settings import SettingsError, load_settings

TEXT = """\
mqtt:
  broker: mqtt://127.0.0.1:1883
ingest:
  max_payload_bytes: lots
detection:
  engine:
    warmpu: 10
"""


def test_each_problem_names_file_line_and_key(tmp_path: Path) -> None:
    path = tmp_path / "cloud.yaml"
    path.write_text(TEXT)
    with pytest.raises(SettingsError) as err:
        load_settings(path, environ={})
    msg = str(err.value)
    # The detector settings are checked as one block: the line is the block's.
    assert f"{path}:6: detection.engine: " in msg and "warmpu" in msg
    assert f"{path}:4: ingest.max_payload_bytes: " in msg


def test_a_key_set_by_the_environment_gets_no_file_line(tmp_path: Path) -> None:
    path = tmp_path / "cloud.yaml"
    path.write_text("ingest:\n  max_payload_bytes: 1000\n")
    with pytest.raises(SettingsError) as err:
        load_settings(path, environ={"MILLSTREAM_INGEST__MAX_PAYLOAD_BYTES": "lots"})
    msg = str(err.value)
    assert "ingest.max_payload_bytes" in msg
    assert f"{path}:2" not in msg


def test_a_check_across_sections_names_the_key_it_is_about(tmp_path: Path) -> None:
    path = tmp_path / "cloud.yaml"
    path.write_text("mqtt:\n  shared_group: plant\ndetection:\n  shard: 1\n  shards: 2\n")
    with pytest.raises(SettingsError) as err:
        load_settings(path, environ={})
    msg = str(err.value)
    assert f"{path}:5: detection.shards: " in msg and "needs detection.feed: all" in msg


def test_an_unknown_key_is_told_the_key_it_was_likely_meant_for(tmp_path: Path) -> None:
    path = tmp_path / "cloud.yaml"
    path.write_text(
        "mqtt:\n"
        "  borker: mqtt://127.0.0.1:1883\n"  # a typo
        "detection:\n"
        "  spike_sigma: 5\n"  # a detector setting one level too high
        "  bogus: 1\n"  # nothing like it
        "  engine:\n"
        "    warmpu: 10\n"
    )
    with pytest.raises(SettingsError) as err:
        load_settings(path, environ={})
    msg = str(err.value)
    assert f"{path}:2: mqtt.borker: unknown key (did you mean 'mqtt.broker'?)" in msg
    assert (
        f"{path}:4: detection.spike_sigma: unknown key "
        "(did you mean 'detection.engine.spike_sigma'?)" in msg
    )
    assert f"{path}:5: detection.bogus: unknown key\n" in msg + "\n"
    assert "warmpu (did you mean 'warmup'?)" in msg


def test_an_engine_setting_out_of_range_is_named_at_its_own_line(tmp_path: Path) -> None:
    path = tmp_path / "cloud.yaml"
    path.write_text("detection:\n  engine:\n    warmup: 10\n    mv_on: -1\n")
    with pytest.raises(SettingsError) as err:
        load_settings(path, environ={})
    msg = str(err.value)
    assert f"{path}:4: detection.engine.mv_on: -1; must be a number, 0.1 or more" in msg
    assert "Value error" not in msg  # pydantic's wording, not ours


def test_a_misspelt_storage_backend_is_refused_with_the_known_ones(tmp_path: Path) -> None:
    path = tmp_path / "cloud.yaml"
    path.write_text("storage:\n  backend: influx\n")
    with pytest.raises(SettingsError) as err:
        load_settings(path, environ={})
    assert str(err.value) == (
        f"{path}:2: storage.backend: unknown backend 'influx'; known: embedded, influxdb"
        " (did you mean 'influxdb'?)"
    )
    assert load_settings(overrides={"storage": {"backend": "influxdb"}}, environ={})


def test_a_per_metric_detector_setting_is_named_at_its_own_line(tmp_path: Path) -> None:
    # Below engine.streaming the key is two levels deeper than the engine's own; the
    # engine's error carries the key, so the line is the parameter's, not the block's.
    path = tmp_path / "cloud.yaml"
    path.write_text("detection:\n  engine:\n    warmup: 10\n    streaming:\n      alert_level: 2\n")
    with pytest.raises(SettingsError) as err:
        load_settings(path, environ={})
    assert str(err.value).startswith(
        f"{path}:5: detection.engine.streaming.alert_level: 2; must be a number"
    )
    path.write_text("detection:\n  engine:\n    streaming:\n      alert_levle: 0.5\n")
    with pytest.raises(SettingsError) as err:
        load_settings(path, environ={})
    assert str(err.value).startswith(
        f"{path}:3: detection.engine.streaming: unknown key(s) alert_levle "
        "(did you mean 'alert_level'?)"
    )
