"""Host collector: the agent's own machine, through psutil."""

from __future__ import annotations

import logging
import time
from collections import namedtuple
from typing import Any

import pytest

psutil = pytest.importorskip("psutil")

from millstream_agent.collectors import collector_class  # noqa: E402
from millstream_agent.collectors.host import HostCollector  # noqa: E402

Temp = namedtuple("Temp", "label current high critical")


def collect_twice(c: HostCollector) -> dict[str, Any]:
    c.start()
    c.collect(time.time())
    time.sleep(0.05)
    return {s.metric: s for s in c.collect(time.time())}


def test_registered_under_its_name() -> None:
    assert collector_class("host") is HostCollector


def test_reports_cpu_memory_disk_network() -> None:
    got = collect_twice(HostCollector("pi", {}))
    for metric in (
        "host.cpu_percent",
        "host.memory_percent",
        "host.memory_available",
        "host.disk_percent",
        "host.disk_free",
        "host.net_rx_bytes_per_s",
        "host.uptime",
    ):
        assert metric in got, metric
    assert 0 <= got["host.cpu_percent"].value <= 100
    assert got["host.memory_percent"].unit == "%"
    assert got["host.disk_free"].value > 0


def test_rates_need_two_collects() -> None:
    c = HostCollector("pi", {"cpu": False, "memory": False, "temperature": False})
    first = {s.metric for s in c.collect(time.time())}
    assert "host.net_rx_bytes_per_s" not in first
    assert "host.disk_percent" in first
    second = {s.metric for s in c.collect(time.time())}
    assert "host.net_rx_bytes_per_s" in second


def test_prefix_and_parts_can_be_chosen() -> None:
    got = collect_twice(HostCollector("pi", {"prefix": "pi.", "disk": False, "network": False}))
    assert all(m.startswith("pi.") for m in got)
    assert not any("disk" in m or "net_" in m for m in got)


def test_several_disk_paths_are_labelled_and_a_missing_one_skipped_quietly(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    c = HostCollector("pi", {"disk_paths": ["/", str(tmp_path), "/no/such/mount"]})
    with caplog.at_level(logging.INFO, logger="millstream_agent.collectors.host"):
        got = collect_twice(c)
    assert "host.disk_percent.root" in got
    assert any(m.startswith("host.disk_free.") and m != "host.disk_free.root" for m in got)
    logged = [r for r in caplog.records if "/no/such/mount" in r.getMessage()]
    assert len(logged) == 1  # once, not every collect


@pytest.mark.parametrize(
    "sensors",
    [
        {},
        "missing",
        {"acpitz": [Temp("", 38.0, None, None)], "cpu_thermal": [Temp("", 51.5, None, None)]},
    ],
)
def test_temperature_when_there_is_a_sensor(monkeypatch: pytest.MonkeyPatch, sensors: Any) -> None:
    if sensors == "missing":
        monkeypatch.delattr(psutil, "sensors_temperatures", raising=False)
    else:
        monkeypatch.setattr(psutil, "sensors_temperatures", lambda: sensors)
    got = collect_twice(HostCollector("pi", {}))
    if sensors and sensors != "missing":
        assert got["host.cpu_temperature"].value == 51.5  # the Pi's SoC sensor first
        assert got["host.cpu_temperature"].unit == "degC"
    else:
        assert "host.cpu_temperature" not in got
        assert "host.cpu_percent" in got


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"cpu": "yes"}, "cpu"),
        ({"disk_paths": "/"}, "disk_paths"),
        ({"interfaces": [1]}, "interfaces"),
        ({"cpus": True}, "cpus"),
    ],
)
def test_bad_options_are_refused_naming_the_key(options: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError) as info:
        HostCollector("pi", options)
    assert str(info.value).startswith(key + ":")


def test_raspberry_pi_throttling_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    from millstream_agent.collectors import host

    flags = tmp_path / "get_throttled"
    flags.write_text("0x50005\n")  # under-voltage and throttled now, under-voltage since boot
    monkeypatch.setattr(host, "THROTTLED_PATH", str(flags))
    got = collect_twice(HostCollector("pi", {}))
    assert got["host.throttled"].value == 5
    assert got["host.under_voltage_since_boot"].value == 1
    monkeypatch.setattr(host, "THROTTLED_PATH", str(tmp_path / "absent"))
    assert "host.throttled" not in collect_twice(HostCollector("pi", {}))
