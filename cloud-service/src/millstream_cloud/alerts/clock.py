"""The engine's sense of time, injected so tests can run ten minutes of alerts in a second."""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def now_ns(self) -> int: ...


class SystemClock:
    """Wall-clock UTC time: what the service uses."""

    def now_ns(self) -> int:
        return time.time_ns()


class ManualClock:
    """A clock that only moves when told to (tests, simulations)."""

    def __init__(self, start_ns: int | None = None) -> None:
        self._now = time.time_ns() if start_ns is None else start_ns
        self._lock = threading.Lock()

    def now_ns(self) -> int:
        return self._now

    def advance(self, seconds: float) -> int:
        with self._lock:
            self._now += int(seconds * 1_000_000_000)
            return self._now

    def set(self, now_ns: int) -> None:
        with self._lock:
            self._now = now_ns
