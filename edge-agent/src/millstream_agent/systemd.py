"""systemd's service notifications (``sd_notify``): readiness, a watchdog, a status line.

Under ``Type=notify`` with ``WatchdogSec=`` systemd restarts an agent that stops
answering: the guard a device on a shelf has when nobody watches it. ``systemctl status``
shows the status line (connected or not, what is queued), the first thing an installer
looks at. The protocol is a datagram of ``KEY=VALUE`` lines to the Unix socket named by
``NOTIFY_SOCKET``, so no library is needed; outside systemd every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from typing import Optional

log = logging.getLogger("millstream.systemd")


class SystemdNotifier:
    """Sends notifications to the service manager that started this process, if any."""

    def __init__(self, environ: Optional[Mapping[str, str]] = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        # "@name" is an abstract socket: a leading NUL byte on the wire.
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_s = _watchdog_seconds(env)
        self._sock: Optional[socket.socket] = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, fields: Mapping[str, str]) -> bool:
        """Send ``fields`` (``READY``, ``WATCHDOG``, ``STATUS``, ``STOPPING``) in one
        datagram; False when not under systemd or the socket refuses (logged once)."""
        if not self.address:
            return False
        text = "\n".join(f"{k}={v}" for k, v in fields.items())
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.sendto(text.encode(), self.address)
        except OSError as exc:
            if not self._failed:
                log.warning("cannot notify systemd at %s: %s", self.address, exc)
            self._failed = True
            return False
        self._failed = False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_seconds(env: Mapping[str, str]) -> Optional[float]:
    """The watchdog period systemd set for this process (``WatchdogSec=``), else None.

    ``WATCHDOG_PID`` names the process it is meant for: a child that inherited the
    environment (a collector's helper) must not answer for its parent."""
    usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1e6
