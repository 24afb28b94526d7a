"""Real servers for the collector tests: pymodbus and asyncua on free loopback ports."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.servers import free_port


class ModbusServer:
    """A pymodbus TCP server in a thread with its own event loop; stoppable and restartable.

    ``devices`` maps unit id -> {"hr": [...], "ir": [...], "co": [...], "di": [...]} with
    values starting at protocol address 0.
    """

    def __init__(self, devices: dict[int, dict[str, list]], port: int | None = None) -> None:
        self.devices = devices
        self.port = port or free_port()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def _context(self) -> Any:
        from pymodbus.datastore import ModbusSequentialDataBlock, ModbusServerContext

        try:
            from pymodbus.datastore import ModbusDeviceContext as DeviceContext
        except ImportError:  # pymodbus < 3.10
            from pymodbus.datastore import ModbusSlaveContext as DeviceContext

        contexts = {}
        for unit, tables in self.devices.items():
            # Block address 1 is protocol address 0 in every pymodbus 3.x.
            blocks = {k: ModbusSequentialDataBlock(1, list(v)) for k, v in tables.items()}
            contexts[unit] = DeviceContext(**blocks)
        try:
            return ModbusServerContext(devices=contexts, single=False)
        except TypeError:  # pymodbus < 3.10
            return ModbusServerContext(slaves=contexts, single=False)

    def start(self) -> ModbusServer:
        from pymodbus.server import ModbusTcpServer

        from tests.support.servers import wait_for_port

        context = self._context()
        ready = threading.Event()

        async def serve() -> None:
            self._server = ModbusTcpServer(context, address=("127.0.0.1", self.port))
            ready.set()
            await self._server.serve_forever()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(serve())
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="modbus-test-server", daemon=True)
        self._thread.start()
        ready.wait(10)
        wait_for_port(self.port, timeout=10)
        return self

    def stop(self) -> None:
        if self._thread is None or self._loop is None:
            return
        future = asyncio.run_coroutine_threadsafe(self._server.shutdown(), self._loop)
        future.result(10)
        self._thread.join(10)
        self._thread = None


@pytest.fixture
def modbus_server_factory() -> Iterator[Any]:
    servers: list[ModbusServer] = []

    def make(devices: dict[int, dict[str, list]], port: int | None = None) -> ModbusServer:
        server = ModbusServer(devices, port).start()
        servers.append(server)
        return server

    try:
        yield make
    finally:
        for server in servers:
            server.stop()
