"""Start real servers (Mosquitto, ...) on free loopback ports and always stop them.

Each server gets a temporary directory with its own config, is started as a child
process, waited for until its port accepts connections, and stopped by PID at teardown
(SIGTERM, then SIGKILL), even when the test failed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def find_binary(name: str, extra_dirs: Sequence[str] = ("/usr/sbin", "/usr/bin")) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in extra_dirs:
        candidate = Path(d) / name
        if candidate.exists():
            return str(candidate)
    return None


@dataclass
class ServerProcess:
    """A child server process that can be stopped, restarted and killed by tests."""

    argv: list[str]
    port: int
    workdir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    def start(self, wait: bool = True) -> ServerProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            self.argv,
            cwd=self.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
            start_new_session=True,
        )
        log.close()
        if wait:
            try:
                wait_for_port(self.port)
            except TimeoutError:
                self.stop()
                raise RuntimeError(f"{self.argv[0]} did not start:\n{self.log()}") from None
        return self

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL: the server dies without any chance to clean up."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


# Mosquitto's default of 20 in-flight QoS 1 messages per client throttles a subscriber
# that acknowledges in groups; the project's broker configs raise it (see docs/cloud.md).
MOSQUITTO_BASE_CONFIG = """\
listener {port} 127.0.0.1
allow_anonymous true
persistence {persistence}
persistence_location {workdir}/
autosave_interval 1
max_inflight_messages 1000
max_queued_messages 1000000
max_queued_bytes 0
max_packet_size 1048576
log_dest stdout
log_type error
log_type warning
log_type notice
"""


def mosquitto_server(
    workdir: Path,
    port: int | None = None,
    persistence: bool = True,
    extra_config: str = "",
) -> ServerProcess:
    """A Mosquitto broker (Debian package ``mosquitto``) configured for tests; not started."""
    binary = find_binary("mosquitto")
    if binary is None:
        raise RuntimeError(
            "mosquitto not found: `make test` installs it (apt-get install mosquitto)"
        )
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "mosquitto.conf"
    # Run as root, Mosquitto drops to user "mosquitto", which cannot write its persistence
    # file in a root-owned temp dir and then forgets sessions across restarts.
    as_root = "user root\n" if os.geteuid() == 0 else ""
    conf.write_text(
        as_root
        + MOSQUITTO_BASE_CONFIG.format(
            port=port, workdir=workdir, persistence="true" if persistence else "false"
        )
        + extra_config
    )
    return ServerProcess([binary, "-c", str(conf)], port, workdir, workdir / "mosquitto.log")
