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


def data_value(variant: Any, status: Any) -> Any:
    """An asyncua DataValue with a status code (the keyword is StatusCode_ before asyncua 1.2)."""
    from asyncua import ua

    try:
        return ua.DataValue(variant, StatusCode=ua.StatusCode(status))
    except TypeError:
        return ua.DataValue(variant, StatusCode_=ua.StatusCode(status))


class OpcUaServer:
    """An asyncua server in a thread with its own loop, holding variables under ``Line1``.

    ``variables`` maps a name to its initial value; node ids are ``ns=<ns>;s=Line1.<name>``.
    """

    def __init__(
        self,
        variables: dict[str, Any],
        port: int | None = None,
        users: dict[str, str] | None = None,
    ) -> None:
        self.variables = variables
        self.users = users  # name -> password; None: anonymous access
        self.port = port or free_port()
        self.endpoint = f"opc.tcp://127.0.0.1:{self.port}/millstream/"
        self.ns = 0
        self.nodes: dict[str, Any] = {}
        self._server: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.listening = False

    def node_id(self, name: str) -> str:
        return f"ns={self.ns};s=Line1.{name}"

    def start(self, listen: bool = True) -> OpcUaServer:
        """Build the address space (slow: a second or more) and, if ``listen``, serve it."""
        from asyncua import Server, ua

        ready = threading.Event()
        failure: list[BaseException] = []

        async def setup() -> None:
            server = Server(user_manager=self._user_manager()) if self.users else Server()
            await server.init()
            server.set_endpoint(self.endpoint)
            if self.users:
                server.set_security_IDs(["Username"])
            self.ns = await server.register_namespace("urn:millstream:test")
            line = await server.nodes.objects.add_object(ua.NodeId("Line1", self.ns), "Line1")
            for name, value in self.variables.items():
                variant = value if isinstance(value, ua.Variant) else ua.Variant(value)
                self.nodes[name] = await line.add_variable(
                    ua.NodeId(f"Line1.{name}", self.ns), name, variant
                )
            self._server = server
            if listen:
                await server.start()
                self.listening = True

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(setup())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            # Let the server's session and subscription tasks end before the loop closes.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

        self._thread = threading.Thread(target=run, name="opcua-test-server", daemon=True)
        self._thread.start()
        ready.wait(30)
        if failure:
            raise failure[0]
        return self

    def _user_manager(self) -> Any:
        from asyncua.crypto.permission_rules import User, UserRole

        users = self.users or {}

        class Passwords:
            def get_user(
                self,
                iserver: Any,
                username: Any = None,
                password: Any = None,
                certificate: Any = None,
            ) -> Any:
                if username in users and users[username] == password:
                    return User(role=UserRole.User)
                return None

        return Passwords()

    def call(self, coro: Any) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def write(self, name: str, value: Any, status: Any = None) -> None:
        from asyncua import ua

        variant = value if isinstance(value, ua.Variant) else ua.Variant(value)
        if status is None:
            self.call(self.nodes[name].write_value(variant))
        else:
            dv = data_value(variant, status)
            self.call(self.nodes[name].write_value(dv))

    def listen(self) -> None:
        """Accept connections (again): a server restart without rebuilding the address space."""
        self.call(self._server.start())
        self.listening = True

    def unlisten(self) -> None:
        """Stop serving, as a server that goes down; ``listen`` brings it back."""
        self.call(self._server.stop())
        self.listening = False

    def stop(self) -> None:
        if self._thread is None or self._loop is None:
            return
        if self.listening:
            self.unlisten()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._thread = None


@pytest.fixture
def opcua_server_factory() -> Iterator[Any]:
    servers: list[OpcUaServer] = []

    def make(
        variables: dict[str, Any],
        port: int | None = None,
        listen: bool = True,
        users: dict[str, str] | None = None,
    ) -> OpcUaServer:
        server = OpcUaServer(variables, port, users)
        servers.append(server)
        return server.start(listen)

    try:
        yield make
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="module")
def shared_opcua_server() -> Iterator[OpcUaServer]:
    """One asyncua server for a test module (starting one takes a second or more)."""
    server = OpcUaServer(
        {
            "Temperature": 21.5,
            "Speed": _int32(1200),
            "Running": True,
            "Pressure": 3.0,
            "Label": "batch-17",
        }
    ).start()
    try:
        yield server
    finally:
        server.stop()


def _int32(value: int) -> Any:
    from asyncua import ua

    return ua.Variant(value, ua.VariantType.Int32)
