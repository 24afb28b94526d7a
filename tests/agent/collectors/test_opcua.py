"""OPC UA collector against a real asyncua server on a loopback port."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest

pytest.importorskip("asyncua")

from asyncua import ua

from millstream_agent.collectors import CollectorError, collector_class
from millstream_agent.collectors.base import Sample
from millstream_agent.collectors.opcua import OpcUaCollector
from tests.agent.collectors.conftest import data_value

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

VARIABLES: dict[str, Any] = {
    "Temperature": 21.5,
    "Speed": ua.Variant(1200, ua.VariantType.Int32),
    "Running": True,
    "Pressure": 3.0,
    "Label": "batch-17",
}


@pytest.fixture
def server(shared_opcua_server: Any) -> Any:
    """The module's server with every variable back at its initial value and Good."""
    for name, value in VARIABLES.items():
        shared_opcua_server.write(name, value)
    return shared_opcua_server


def make(server: Any, mode: str = "subscription", **extra: Any) -> OpcUaCollector:
    nodes = [
        {"node_id": server.node_id("Temperature"), "name": "temperature", "unit": "degC"},
        {"node_id": server.node_id("Speed"), "name": "speed", "unit": "rpm", "scale": 0.5},
        {"node_id": server.node_id("Running"), "name": "running"},
        {"node_id": server.node_id("Pressure"), "name": "pressure", "unit": "bar"},
    ]
    options = {
        "endpoint": server.endpoint,
        "mode": mode,
        "publishing_interval": "100ms",
        "timeout": "2s",
        "reconnect_interval": "200ms",
        "nodes": nodes + extra.pop("extra_nodes", []),
        **extra,
    }
    collector = OpcUaCollector("oven", options)
    collector.start()  # as the agent does before the first collect
    return collector


def collect_until(c: OpcUaCollector, done: Any, timeout: float = 10.0) -> list[Sample]:
    """Collect repeatedly (as the agent would) until ``done(samples)`` or the timeout."""
    got: list[Sample] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got.extend(c.collect(time.time()))
        except CollectorError:
            pass
        if done(got):
            return got
        time.sleep(0.05)
    raise AssertionError(f"condition not met in {timeout}s; got {got}")


def latest(samples: list[Sample]) -> dict[str, Sample]:
    return {s.metric: s for s in samples}


def test_registered_under_its_name() -> None:
    assert collector_class("opcua") is OpcUaCollector


def test_subscription_delivers_values_changes_and_quality(server: Any) -> None:
    server.write("Pressure", 3.3, status=ua.StatusCodes.UncertainLastUsableValue)
    c = make(server)
    try:
        first = latest(collect_until(c, lambda got: len(latest(got)) == 4))
        assert first["temperature"].value == 21.5 and first["temperature"].unit == "degC"
        assert first["speed"].value == 600.0  # scale 0.5
        assert first["running"].value == 1.0
        assert first["pressure"].value == 3.3 and first["pressure"].quality == "uncertain"
        assert first["temperature"].quality == "good"
        assert abs(first["temperature"].ts - time.time()) < 30  # the server's source time

        before = time.time()
        server.write("Temperature", 80.25)
        server.write("Pressure", 3.4, status=ua.StatusCodes.GoodLocalOverride)
        changed = collect_until(
            c, lambda got: {"temperature", "pressure"} <= {s.metric for s in got}
        )
        temp = latest(changed)["temperature"]
        assert temp.value == 80.25 and temp.ts >= before - 1
        assert latest(changed)["pressure"].quality == "good"
    finally:
        c.close()


def test_quality_follows_the_status_code() -> None:
    c = OpcUaCollector(
        "oven", {"endpoint": "opc.tcp://x:4840", "nodes": [{"node_id": "i=1", "name": "a"}]}
    )
    spec = c.nodes[0]
    for code, expected in [
        (ua.StatusCodes.Good, "good"),
        (ua.StatusCodes.UncertainSensorNotAccurate, "uncertain"),
        (ua.StatusCodes.BadSensorFailure, "bad"),
    ]:
        dv = data_value(ua.Variant(1.5), code)
        c._received(spec, dv, now=100.0)
        assert c._buffer.pop().quality == expected
    # A Bad reading usually carries no value at all: nothing to send.
    c._received(
        spec,
        data_value(ua.Variant(None), ua.StatusCodes.BadNoCommunication),
    )
    assert not c._buffer


def test_polling_reads_every_node_each_collect_stamped_now(server: Any) -> None:
    c = make(server, mode="polling")
    try:
        assert c.wait_connected(10)
        now = time.time()
        samples = c.collect(now)
        assert [s.metric for s in samples] == ["temperature", "speed", "running", "pressure"]
        assert all(s.ts == now for s in samples)
        server.write("Speed", ua.Variant(1500, ua.VariantType.Int32))
        assert latest(c.collect(now + 1))["speed"].value == 750.0
        assert len(c.collect(now + 2)) == 4  # unchanged values are read again
    finally:
        c.close()


def test_unknown_node_and_text_value_do_not_stop_the_others(
    server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    extra = [
        {"node_id": f"ns={server.ns};s=Line1.Missing", "name": "missing"},
        {"node_id": server.node_id("Label"), "name": "label"},
    ]
    for mode in ("subscription", "polling"):
        c = make(server, mode=mode, extra_nodes=extra)
        try:
            with caplog.at_level(logging.WARNING, logger="millstream_agent.collectors.opcua"):
                got = collect_until(c, lambda got: len(latest(got)) >= 4)
                time.sleep(0.3)
                got += c.collect(time.time())
            assert set(latest(got)) == {"temperature", "speed", "running", "pressure"}
        finally:
            c.close()
    text = caplog.text
    assert "BadNodeIdUnknown" in text and "missing" in text
    assert "label" in text and "no numeric value" in text


def test_server_down_then_up_then_restarted(opcua_server_factory: Any) -> None:
    server = opcua_server_factory({"Temperature": 30.0}, listen=False)
    c = OpcUaCollector(
        "oven",
        {
            "endpoint": server.endpoint,
            "reconnect_interval": "200ms",
            "timeout": "2s",
            "publishing_interval": "100ms",
            "nodes": [{"node_id": server.node_id("Temperature"), "name": "temperature"}],
        },
    )
    try:
        c.start()
        time.sleep(0.5)
        with pytest.raises(CollectorError) as info:
            c.collect(time.time())
        message = str(info.value)
        assert f"not connected to {server.endpoint}" in message
        assert "connection refused" in message
        assert "reconnecting every 0.2s" in message

        server.listen()
        got = collect_until(c, lambda got: bool(got), timeout=15)
        assert got[0].value == 30.0

        server.unlisten()
        # The loss is noticed within a probe (1 s); then collect says so.
        deadline = time.monotonic() + 10
        with pytest.raises(CollectorError, match="not connected"):
            while time.monotonic() < deadline:
                c.collect(time.time())
                time.sleep(0.1)
        server.write("Temperature", 31.0)
        server.listen()
        collect_until(c, lambda got: any(s.value == 31.0 for s in got), timeout=15)
    finally:
        c.close()


def test_user_and_password_from_the_environment(
    opcua_server_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = opcua_server_factory({"Temperature": 40.0}, users={"agent": "s3cret"})

    def collector(**auth: Any) -> OpcUaCollector:
        options = {
            "endpoint": server.endpoint,
            "reconnect_interval": "200ms",
            "publishing_interval": "100ms",
            "nodes": [{"node_id": server.node_id("Temperature"), "name": "temperature"}],
            **auth,
        }
        c = OpcUaCollector("oven", options)
        c.start()
        return c

    wrong = collector(username="agent", password="guess")
    try:
        time.sleep(1.0)
        with pytest.raises(CollectorError, match="not connected") as info:
            wrong.collect(time.time())
        assert "BadUserAccessDenied" in str(info.value)
        assert "reconnecting every 60s" in str(info.value)  # not every 0.2s: no hot loop
    finally:
        wrong.close()

    monkeypatch.setenv("OVEN_OPCUA_PASSWORD", "s3cret")
    right = collector(username="agent", password_env="OVEN_OPCUA_PASSWORD")
    try:
        got = collect_until(right, lambda got: bool(got))
        assert got[0].value == 40.0
    finally:
        right.close()


def test_buffer_drops_oldest_and_counts(server: Any) -> None:
    c = make(server, buffer_size=3)
    try:
        assert c.wait_connected(10)
        time.sleep(0.5)  # initial values of 4 nodes into a buffer of 3
        samples = c.collect(time.time())
        assert len(samples) == 3
        assert c.dropped >= 1
    finally:
        c.close()


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"nodes": [{"node_id": "i=1", "name": "a"}]}, "endpoint"),
        ({"endpoint": "http://x", "nodes": [{"node_id": "i=1", "name": "a"}]}, "endpoint"),
        ({"endpoint": "opc.tcp://x:4840"}, "nodes"),
        ({"endpoint": "opc.tcp://x:4840", "nodes": [{"name": "a"}]}, "nodes[0].node_id"),
        (
            {"endpoint": "opc.tcp://x:4840", "nodes": [{"node_id": "ns=x;q=1", "name": "a"}]},
            "nodes[0].node_id",
        ),
        ({"endpoint": "opc.tcp://x:4840", "nodes": [{"node_id": "i=1"}]}, "nodes[0].name"),
        (
            {"endpoint": "opc.tcp://x:4840", "nodes": [{"node_id": "i=1", "name": "a", "u": 1}]},
            "nodes[0].u",
        ),
        (
            {
                "endpoint": "opc.tcp://x:4840",
                "mode": "push",
                "nodes": [{"node_id": "i=1", "name": "a"}],
            },
            "mode",
        ),
        (
            {
                "endpoint": "opc.tcp://x:4840",
                "publishing_interval": "0s",
                "nodes": [{"node_id": "i=1", "name": "a"}],
            },
            "publishing_interval",
        ),
    ],
)
def test_bad_options_are_refused_naming_the_key(options: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError) as info:
        OpcUaCollector("oven", options)
    assert str(info.value).startswith(key + ":")
