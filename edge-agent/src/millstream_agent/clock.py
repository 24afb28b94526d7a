"""Is the wall clock trustworthy? A Pi without a real-time clock boots at 1970 (or at the
last shutdown time) and jumps when NTP answers; readings taken before that carry wrong
timestamps. Such readings are sent with ``"clock": "unsynced"`` so the cloud can store
them at arrival time and keep the original."""

from __future__ import annotations

import calendar
import logging
import threading
import time
from typing import Callable, Optional

log = logging.getLogger("millstream.clock")


class ClockWatch:
    """Unsynced when the year is before ``min_year`` or for ``settle`` seconds after the
    wall clock stepped backwards by more than ``tolerance`` seconds."""

    def __init__(
        self,
        min_year: int = 2024,
        settle: float = 60.0,
        tolerance: float = 1.0,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self.min_ts = float(calendar.timegm((min_year, 1, 1, 0, 0, 0, 0, 0, 0)))
        self.settle = settle
        self.tolerance = tolerance
        self._wall = wall
        self._mono = mono
        self._last: Optional[tuple[float, float]] = None
        self._until = float("-inf")
        self._lock = threading.Lock()
        self._was_synced = True

    def synced(self) -> bool:
        with self._lock:
            w, m = self._wall(), self._mono()
            if self._last is not None:
                lw, lm = self._last
                expected = lw + (m - lm)
                if w < expected - self.tolerance:
                    log.warning(
                        "wall clock went back %.1fs; readings for the next %gs are marked unsynced",
                        expected - w,
                        self.settle,
                    )
                    self._until = m + self.settle
            self._last = (w, m)
            ok = w >= self.min_ts and m >= self._until
            if ok != self._was_synced:
                self._was_synced = ok
                if ok:
                    log.info("wall clock looks synchronised again")
                elif w < self.min_ts:
                    log.warning(
                        "wall clock %s is before the minimum valid time: readings are "
                        "marked unsynced",
                        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(w)),
                    )
            return ok
