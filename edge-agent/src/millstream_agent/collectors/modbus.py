"""Modbus TCP: holding and input registers, coils and discrete inputs (pymodbus).

Each configured value names a table, a 0-based protocol address, a data type, the
word and byte order, a scale and offset and a metric name. Values that sit close
together in the same table of the same unit are read with one request (``merge_gap``),
because a PLC's round trip costs far more than the few extra registers.

Connection failures raise :class:`CollectorError` with the address and the reason;
the client is closed and the next ``collect`` connects again, so a PLC that reboots
comes back on its own. A Modbus exception for one block (a wrong address, say) does
not hide the values of the other blocks: they are returned and the error is logged.
"""

from __future__ import annotations

import inspect
import logging
import math
import struct
from dataclasses import dataclass
from typing import Any, Optional

from pymodbus.client import ModbusTcpClient
from pymodbus.exceptions import ModbusException

from millstream_agent.collectors import register
from millstream_agent.collectors._options import (
    check_keys,
    get_float,
    get_int,
    get_str,
    parse_duration,
)
from millstream_agent.collectors.base import Collector, CollectorError, Sample

log = logging.getLogger(__name__)

# data type -> (registers, struct format)
DATA_TYPES: dict[str, tuple[int, str]] = {
    "int16": (1, ">h"),
    "uint16": (1, ">H"),
    "int32": (2, ">i"),
    "uint32": (2, ">I"),
    "float32": (2, ">f"),
    "int64": (4, ">q"),
    "uint64": (4, ">Q"),
    "float64": (4, ">d"),
}
TABLES = ("holding", "input", "coil", "discrete")
ORDERS = ("big", "little")
# Largest reads the protocol allows in one request.
_MAX_REGISTERS = 125
_MAX_BITS = 2000
_EXCEPTION_CODES = {
    1: "illegal function (the device does not support this table)",
    2: "illegal data address (no such register on the device)",
    3: "illegal data value",
    4: "device failure (or no such unit id)",
    6: "device busy",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}
_VALUE_KEYS = (
    "name",
    "address",
    "table",
    "data_type",
    "scale",
    "offset",
    "unit",
    "unit_id",
    "word_order",
    "byte_order",
)


@dataclass(frozen=True)
class ValueSpec:
    """One configured value: where it lives and how to turn its registers into a number."""

    name: str
    table: str
    address: int
    data_type: str
    unit_id: int
    scale: float = 1.0
    offset: float = 0.0
    unit: Optional[str] = None
    word_order: str = "big"
    byte_order: str = "big"

    @property
    def width(self) -> int:
        """Registers (or bits, for coils and discrete inputs) the value occupies."""
        return DATA_TYPES[self.data_type][0] if self.data_type in DATA_TYPES else 1


@dataclass
class Block:
    """One read request: a contiguous range of a table of a unit, and the values in it."""

    table: str
    unit_id: int
    start: int
    end: int  # exclusive
    values: list[ValueSpec]


def decode(registers: list[int], data_type: str, word_order: str, byte_order: str) -> float:
    """Registers (16-bit words as received) to a number of ``data_type``."""
    words = registers if word_order == "big" else list(reversed(registers))
    if byte_order == "big":
        raw = b"".join(w.to_bytes(2, "big") for w in words)
    else:
        raw = b"".join(w.to_bytes(2, "little") for w in words)
    return float(struct.unpack(DATA_TYPES[data_type][1], raw)[0])


def encode(value: float, data_type: str, word_order: str = "big", byte_order: str = "big") -> list:
    """The registers a device would hold for ``value``: the inverse of :func:`decode`."""
    fmt = DATA_TYPES[data_type][1]
    raw = struct.pack(fmt, value if "float" in data_type else int(value))
    byteorder: Any = byte_order
    words = [int.from_bytes(raw[i : i + 2], byteorder) for i in range(0, len(raw), 2)]
    return words if word_order == "big" else list(reversed(words))


def parse_values(options: dict[str, Any]) -> list[ValueSpec]:
    items = options.get("registers")
    if not isinstance(items, list) or not items:
        raise ValueError("registers: required, a list of {name, address, ...} (one per metric)")
    default_unit = get_int(options, "unit_id", 1, minimum=0, maximum=255)
    default_word = get_str(options, "word_order", "big", list(ORDERS)) or "big"
    default_byte = get_str(options, "byte_order", "big", list(ORDERS)) or "big"
    specs = []
    seen = set()
    for n, item in enumerate(items):
        where = f"registers[{n}]."
        if not isinstance(item, dict):
            raise ValueError(f"registers[{n}]: expected a mapping with name and address")
        check_keys(item, _VALUE_KEYS, where)
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}name: required, the metric name (e.g. spindle_speed)")
        if name in seen:
            raise ValueError(f"{where}name: {name!r} is used twice; metric names must be unique")
        seen.add(name)
        if "address" not in item:
            raise ValueError(f"{where}address: required, the 0-based protocol address")
        address = get_int(item, "address", 0, minimum=0, maximum=65535, where=where)
        table = get_str(item, "table", "holding", list(TABLES), where=where) or "holding"
        bits = table in ("coil", "discrete")
        data_type = get_str(item, "data_type", "bool" if bits else "uint16", where=where)
        if bits and data_type != "bool":
            raise ValueError(f"{where}data_type: a {table} holds one bit; use bool (the default)")
        if not bits and data_type not in DATA_TYPES:
            raise ValueError(
                f"{where}data_type: expected one of {', '.join(DATA_TYPES)}, got {data_type!r}"
            )
        assert data_type is not None
        width = DATA_TYPES[data_type][0] if not bits else 1
        if address + width > 65536:
            raise ValueError(f"{where}address: {data_type} at {address} runs past register 65535")
        specs.append(
            ValueSpec(
                name=name,
                table=table,
                address=address,
                data_type=data_type,
                unit_id=get_int(item, "unit_id", default_unit, minimum=0, maximum=255, where=where),
                scale=get_float(item, "scale", 1.0, where=where),
                offset=get_float(item, "offset", 0.0, where=where),
                unit=get_str(item, "unit", None, where=where),
                word_order=get_str(item, "word_order", default_word, list(ORDERS), where=where)
                or "big",
                byte_order=get_str(item, "byte_order", default_byte, list(ORDERS), where=where)
                or "big",
            )
        )
    return specs


def plan_blocks(specs: list[ValueSpec], merge_gap: int) -> list[Block]:
    """Group values into as few requests as the protocol's size limits and ``merge_gap`` allow."""
    groups: dict[tuple[str, int], list[ValueSpec]] = {}
    for spec in specs:
        groups.setdefault((spec.table, spec.unit_id), []).append(spec)
    blocks = []
    for (table, unit_id), members in sorted(groups.items()):
        limit = _MAX_BITS if table in ("coil", "discrete") else _MAX_REGISTERS
        current: Optional[Block] = None
        for spec in sorted(members, key=lambda s: (s.address, s.width)):
            end = spec.address + spec.width
            if (
                current is not None
                and spec.address - current.end <= merge_gap
                and max(end, current.end) - current.start <= limit
            ):
                current.end = max(current.end, end)
                current.values.append(spec)
                continue
            current = Block(table, unit_id, spec.address, end, [spec])
            blocks.append(current)
    return blocks


@register
class ModbusCollector(Collector):
    """Read registers and bits from one Modbus TCP device (or gateway)."""

    type_name = "modbus"
    options_spec = {
        "host": (str, None, "the device's or gateway's address (required)"),
        "port": (int, 502, "Modbus TCP port"),
        "unit_id": (int, 1, "unit (slave) id, for gateways; a register can override it"),
        "timeout": (object, "2s", "how long to wait for a connection or an answer"),
        "word_order": (str, "big", "big: high word first (ABCD); little: low word first (CDAB)"),
        "byte_order": (str, "big", "byte order inside each 16-bit word (big is the standard)"),
        "merge_gap": (int, 8, "read values up to this many registers apart in one request"),
        "registers": (list, None, "the values: name, address, table, data_type, scale, ..."),
    }

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        super().__init__(name, options)
        check_keys(options, self.options_spec)
        host = get_str(options, "host", None)
        if not host:
            raise ValueError("host: required, the device's address (e.g. 192.168.0.10)")
        self.host = host
        self.port = get_int(options, "port", 502, minimum=1, maximum=65535)
        self.timeout = parse_duration(options.get("timeout", "2s"), "timeout")
        if self.timeout <= 0:
            raise ValueError("timeout: must be positive")
        self.values = parse_values(options)
        self.blocks = plan_blocks(
            self.values, get_int(options, "merge_gap", 8, minimum=0, maximum=_MAX_REGISTERS)
        )
        self._client: Optional[ModbusTcpClient] = None
        self._unit_kw = "device_id"
        self._reported: set = set()  # errors already logged, so a lasting fault logs once
        self._nan: set = set()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        """Nothing to open yet: ``collect`` connects, so start-up and reconnects are one path."""

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _connect(self) -> ModbusTcpClient:
        if self._client is not None:
            return self._client
        # No retries inside pymodbus: the agent calls again on the next interval, and a
        # retry loop here would hold up every other collector for timeout x retries.
        client = ModbusTcpClient(self.host, port=self.port, timeout=self.timeout, retries=0)
        params = inspect.signature(client.read_holding_registers).parameters
        # pymodbus < 3.9 names the unit id "slave".
        self._unit_kw = "device_id" if "device_id" in params else "slave"
        if not client.connect():
            client.close()
            raise CollectorError(
                f"modbus {self.name}: cannot connect to {self.address} "
                f"(refused, unreachable or no answer within {self.timeout:g}s); "
                "will retry on the next collect"
            )
        self._client = client
        return client

    def _read(self, client: ModbusTcpClient, block: Block) -> Any:
        readers = {
            "holding": client.read_holding_registers,
            "input": client.read_input_registers,
            "coil": client.read_coils,
            "discrete": client.read_discrete_inputs,
        }
        kwargs: dict[str, Any] = {"count": block.end - block.start, self._unit_kw: block.unit_id}
        return readers[block.table](block.start, **kwargs)

    def collect(self, now: float) -> list[Sample]:
        client = self._connect()
        samples: list[Sample] = []
        errors: list[str] = []
        queue = list(self.blocks)
        while queue:
            block = queue.pop(0)
            where = (
                f"{block.table} {block.start}-{block.end - 1} of unit {block.unit_id} "
                f"at {self.address}"
            )
            try:
                response = self._read(client, block)
            except (ModbusException, OSError) as exc:
                self.close()
                raise CollectorError(
                    f"modbus {self.name}: lost the connection reading {where}: {exc}; "
                    "reconnecting on the next collect"
                ) from exc
            if response.isError():
                code = getattr(response, "exception_code", None)
                if code is None:  # no answer at all: a dead link, not a refusal
                    self.close()
                    raise CollectorError(
                        f"modbus {self.name}: no answer reading {where}: {response}; "
                        "reconnecting on the next collect"
                    )
                if code == 2 and len(block.values) > 1:
                    # Some devices refuse a read that spans unmapped registers: read this
                    # block's values one by one from now on, so a hole costs only itself.
                    parts = self._split(block)
                    queue[:0] = parts
                    continue
                errors.append(f"{where}: exception {code}, {_EXCEPTION_CODES.get(code, 'unknown')}")
                continue
            samples.extend(self._samples(block, response, now))
        if errors:
            message = f"modbus {self.name}: " + "; ".join(errors)
            if not samples:
                raise CollectorError(message)
            if message not in self._reported:
                self._reported.add(message)
                log.warning("%s (other values still read)", message)
        else:
            self._reported.clear()
        return samples

    def _split(self, block: Block) -> list[Block]:
        parts = [
            Block(block.table, block.unit_id, v.address, v.address + v.width, [v])
            for v in block.values
        ]
        i = self.blocks.index(block)
        self.blocks[i : i + 1] = parts
        log.info(
            "modbus %s: %s registers %d-%d of unit %d cannot be read in one request; "
            "reading its %d values one by one",
            self.name,
            block.table,
            block.start,
            block.end - 1,
            block.unit_id,
            len(parts),
        )
        return parts

    def _samples(self, block: Block, response: Any, now: float) -> list[Sample]:
        out = []
        if block.table in ("coil", "discrete"):
            bits = response.bits
            for spec in block.values:
                raw = 1.0 if bits[spec.address - block.start] else 0.0
                out.append(Sample(now, spec.name, raw * spec.scale + spec.offset, spec.unit))
            return out
        registers = response.registers
        for spec in block.values:
            i = spec.address - block.start
            raw = decode(
                registers[i : i + spec.width], spec.data_type, spec.word_order, spec.byte_order
            )
            value = raw * spec.scale + spec.offset
            if math.isnan(value) or math.isinf(value):
                # JSON has no NaN; a float register holding NaN means "no reading".
                if spec.name not in self._nan:
                    self._nan.add(spec.name)
                    log.warning("modbus %s: %s is %s, skipped", self.name, spec.name, value)
                continue
            self._nan.discard(spec.name)
            out.append(Sample(now, spec.name, value, spec.unit))
        return out
