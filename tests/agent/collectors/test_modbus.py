"""Modbus collector against a real pymodbus TCP server on a loopback port."""

from __future__ import annotations

import inspect
import logging
import struct
from typing import Any

import pytest

pytest.importorskip("pymodbus")

from millstream_agent.collectors import CollectorError, collector_class
from millstream_agent.collectors.modbus import (
    DATA_TYPES,
    ModbusCollector,
    ValueSpec,
    decode,
    encode,
    plan_blocks,
)

pytestmark = pytest.mark.integration
NOW = 1_764_000_000.0


def holding_map() -> list[int]:
    regs = [0] * 48
    layout: list[tuple[int, float, str, str, str]] = [
        (0, -1234, "int16", "big", "big"),
        (1, 60000, "uint16", "big", "big"),
        (2, -100000, "int32", "big", "big"),
        (4, 3_000_000_000, "uint32", "little", "big"),
        (6, 23.5, "float32", "big", "big"),
        (8, -1.25, "float32", "little", "little"),
        (10, 9.75, "float32", "big", "little"),
        (12, 3.14159, "float64", "big", "big"),
        (16, -5_000_000_000_000, "int64", "big", "big"),
        (20, 1234, "uint16", "big", "big"),
        (40, 7, "uint16", "big", "big"),
    ]
    for address, value, data_type, word, byte in layout:
        words = encode(value, data_type, word, byte)
        regs[address : address + len(words)] = words
    return regs


DEVICES = {
    1: {
        "hr": holding_map(),
        "ir": [100, 200, 300],
        "co": [True, False, True],
        "di": [False, True],
    },
    2: {"hr": [4242, 0]},
}

REGISTERS = [
    {"name": "temp_offset", "address": 0, "data_type": "int16"},
    {"name": "counter16", "address": 1},
    {"name": "position", "address": 2, "data_type": "int32", "unit": "um"},
    {"name": "energy", "address": 4, "data_type": "uint32", "word_order": "little", "unit": "Wh"},
    {"name": "temperature", "address": 6, "data_type": "float32", "unit": "degC"},
    {
        "name": "flow",
        "address": 8,
        "data_type": "float32",
        "word_order": "little",
        "byte_order": "little",
    },
    {"name": "level", "address": 10, "data_type": "float32", "byte_order": "little"},
    {"name": "precise", "address": 12, "data_type": "float64"},
    {"name": "big_counter", "address": 16, "data_type": "int64"},
    {"name": "pressure", "address": 20, "scale": 0.1, "offset": -10, "unit": "bar"},
    {"name": "far", "address": 40},
    {"name": "input0", "address": 0, "table": "input"},
    {"name": "input2", "address": 2, "table": "input", "scale": 0.5},
    {"name": "running", "address": 0, "table": "coil"},
    {"name": "fault", "address": 1, "table": "coil"},
    {"name": "door_open", "address": 1, "table": "discrete"},
    {"name": "other_unit", "address": 0, "unit_id": 2},
]

EXPECTED = {
    "temp_offset": -1234,
    "counter16": 60000,
    "position": -100000,
    "energy": 3_000_000_000,
    "temperature": 23.5,
    "flow": -1.25,
    "level": 9.75,
    "precise": 3.14159,
    "big_counter": -5_000_000_000_000,
    "pressure": 113.4,
    "far": 7,
    "input0": 100,
    "input2": 150,
    "running": 1,
    "fault": 0,
    "door_open": 1,
    "other_unit": 4242,
}


def collector(port: int, **extra: Any) -> ModbusCollector:
    options = {"host": "127.0.0.1", "port": port, "timeout": "1s", "registers": REGISTERS, **extra}
    return ModbusCollector("press", options)


@pytest.mark.parametrize("data_type", sorted(DATA_TYPES))
@pytest.mark.parametrize("word", ["big", "little"])
@pytest.mark.parametrize("byte", ["big", "little"])
def test_decode_inverts_encode(data_type: str, word: str, byte: str) -> None:
    value = -1.5 if "float" in data_type else (7 if data_type.startswith("u") else -7)
    assert decode(encode(value, data_type, word, byte), data_type, word, byte) == value


def test_word_and_byte_order_follow_the_usual_abcd_names() -> None:
    raw = struct.pack(">f", 1.0)  # 3F 80 00 00 = A B C D
    assert encode(1.0, "float32", "big", "big") == [0x3F80, 0x0000]  # ABCD
    assert encode(1.0, "float32", "little", "big") == [0x0000, 0x3F80]  # CDAB
    assert encode(1.0, "float32", "big", "little") == [0x803F, 0x0000]  # BADC
    assert encode(1.0, "float32", "little", "little") == [0x0000, 0x803F]  # DCBA
    assert raw == b"\x3f\x80\x00\x00"


def test_registered_under_its_name() -> None:
    assert collector_class("modbus") is ModbusCollector


def test_neighbouring_values_are_read_in_one_request() -> None:
    specs = [ValueSpec(f"v{a}", "holding", a, "float32", 1) for a in (0, 2, 4, 20, 40)]
    blocks = plan_blocks(specs, merge_gap=8)
    assert [(b.start, b.end) for b in blocks] == [(0, 6), (20, 22), (40, 42)]
    assert len(plan_blocks(specs, merge_gap=100)) == 1
    many = [ValueSpec(f"v{a}", "holding", a, "uint16", 1) for a in range(0, 300)]
    assert [(b.start, b.end) for b in plan_blocks(many, 0)] == [(0, 125), (125, 250), (250, 300)]


def test_reads_every_table_type_order_and_scale(modbus_server_factory: Any) -> None:
    server = modbus_server_factory(DEVICES)
    c = collector(server.port)
    try:
        samples = c.collect(NOW)
    finally:
        c.close()
    got = {s.metric: s.value for s in samples}
    assert got.keys() == EXPECTED.keys()
    for name, value in EXPECTED.items():
        assert got[name] == pytest.approx(value), name
    units = {s.metric: s.unit for s in samples}
    assert units["temperature"] == "degC" and units["counter16"] is None
    assert all(s.ts == NOW and s.quality == "good" for s in samples)


def test_sees_changed_values(modbus_server_factory: Any) -> None:
    from pymodbus.client import ModbusTcpClient

    server = modbus_server_factory(DEVICES)
    c = collector(server.port)
    writer = ModbusTcpClient("127.0.0.1", port=server.port)
    try:
        assert {s.metric: s.value for s in c.collect(NOW)}["temperature"] == 23.5
        assert writer.connect()
        params = inspect.signature(writer.write_registers).parameters
        unit = {"device_id" if "device_id" in params else "slave": 1}  # pymodbus < 3.9: slave
        writer.write_registers(6, encode(-40.25, "float32"), **unit)
        assert {s.metric: s.value for s in c.collect(NOW + 1)}["temperature"] == -40.25
    finally:
        writer.close()
        c.close()


def test_reconnects_after_the_device_restarts(modbus_server_factory: Any) -> None:
    server = modbus_server_factory(DEVICES)
    c = collector(server.port)
    try:
        assert len(c.collect(NOW)) == len(EXPECTED)
        server.stop()
        with pytest.raises(CollectorError, match=r"modbus press: .*127\.0\.0\.1:\d+"):
            c.collect(NOW + 1)
        with pytest.raises(CollectorError, match=r"cannot connect to 127\.0\.0\.1"):
            c.collect(NOW + 2)
        modbus_server_factory(DEVICES, port=server.port)
        assert len(c.collect(NOW + 3)) == len(EXPECTED)
    finally:
        c.close()


def test_nobody_listening_is_a_clear_error() -> None:
    from tests.support.servers import free_port

    c = collector(free_port())
    with pytest.raises(CollectorError) as info:
        c.collect(NOW)
    assert "cannot connect to 127.0.0.1" in str(info.value)
    assert "retry" in str(info.value)


def test_a_wrong_address_does_not_hide_the_other_values(
    modbus_server_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    server = modbus_server_factory(DEVICES)
    registers = [{"name": "ok", "address": 1}, {"name": "missing", "address": 900}]
    c = ModbusCollector("press", {"host": "127.0.0.1", "port": server.port, "registers": registers})
    try:
        with caplog.at_level(logging.WARNING, logger="millstream_agent.collectors.modbus"):
            assert [s.metric for s in c.collect(NOW)] == ["ok"]
            c.collect(NOW + 1)
        warnings = [r for r in caplog.records if "illegal data address" in r.getMessage()]
        assert len(warnings) == 1  # a lasting misconfiguration is logged once, not every second
        assert "holding 900-900 of unit 1" in warnings[0].getMessage()
        only_missing = ModbusCollector(
            "press", {"host": "127.0.0.1", "port": server.port, "registers": registers[1:]}
        )
        with pytest.raises(CollectorError, match="illegal data address"):
            only_missing.collect(NOW)
        only_missing.close()
    finally:
        c.close()


def test_a_hole_in_a_merged_read_costs_only_the_missing_value(
    modbus_server_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # The device maps registers 0-3 only; 0, 2 and 6 are merged into one read of 0-6.
    server = modbus_server_factory({1: {"hr": [11, 0, 22, 0]}})
    registers = [
        {"name": "a", "address": 0},
        {"name": "b", "address": 2},
        {"name": "c", "address": 6},
    ]
    c = ModbusCollector("press", {"host": "127.0.0.1", "port": server.port, "registers": registers})
    assert len(c.blocks) == 1
    try:
        with caplog.at_level(logging.INFO, logger="millstream_agent.collectors.modbus"):
            assert {s.metric: s.value for s in c.collect(NOW)} == {"a": 11, "b": 22}
            assert {s.metric: s.value for s in c.collect(NOW + 1)} == {"a": 11, "b": 22}
        assert len(c.blocks) == 3
        assert "one by one" in caplog.text
        assert "holding 6-6 of unit 1" in caplog.text
    finally:
        c.close()


def test_nan_float_is_skipped(modbus_server_factory: Any) -> None:
    server = modbus_server_factory({1: {"hr": [*encode(float("nan"), "float32"), 5]}})
    registers = [{"name": "t", "address": 0, "data_type": "float32"}, {"name": "n", "address": 2}]
    c = ModbusCollector("press", {"host": "127.0.0.1", "port": server.port, "registers": registers})
    try:
        assert [(s.metric, s.value) for s in c.collect(NOW)] == [("n", 5.0)]
    finally:
        c.close()


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"registers": [{"name": "a", "address": 0}]}, "host"),
        ({"host": "h"}, "registers"),
        ({"host": "h", "registers": [{"address": 0}]}, "registers[0].name"),
        ({"host": "h", "registers": [{"name": "a"}]}, "registers[0].address"),
        ({"host": "h", "registers": [{"name": "a", "address": 70000}]}, "registers[0].address"),
        (
            {"host": "h", "registers": [{"name": "a", "address": 0, "data_type": "f32"}]},
            "registers[0].data_type",
        ),
        (
            {
                "host": "h",
                "registers": [{"name": "a", "address": 0, "table": "coil", "data_type": "int16"}],
            },
            "registers[0].data_type",
        ),
        (
            {"host": "h", "registers": [{"name": "a", "address": 0, "table": "holdings"}]},
            "registers[0].table",
        ),
        (
            {"host": "h", "registers": [{"name": "a", "address": 0, "adress": 1}]},
            "registers[0].adress",
        ),
        (
            {"host": "h", "registers": [{"name": "a", "address": 0}, {"name": "a", "address": 1}]},
            "registers[1].name",
        ),
        (
            {"host": "h", "word_order": "middle", "registers": [{"name": "a", "address": 0}]},
            "word_order",
        ),
        ({"host": "h", "port": 0, "registers": [{"name": "a", "address": 0}]}, "port"),
        ({"host": "h", "timeout": "soon", "registers": [{"name": "a", "address": 0}]}, "timeout"),
    ],
)
def test_bad_options_are_refused_naming_the_key(options: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError) as info:
        ModbusCollector("press", options)
    assert str(info.value).startswith(key + ":")


def test_a_device_that_never_answers_costs_one_timeout() -> None:
    """A hung PLC (TCP accepted, no reply) must not stall the agent beyond ``timeout``."""
    import socket
    import time

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]
    c = ModbusCollector(
        "press",
        {
            "host": "127.0.0.1",
            "port": port,
            "timeout": "300ms",
            "registers": [{"name": "a", "address": 0}],
        },
    )
    try:
        started = time.monotonic()
        with pytest.raises(CollectorError, match="press"):
            c.collect(NOW)
        assert time.monotonic() - started < 3
    finally:
        c.close()
        listener.close()
