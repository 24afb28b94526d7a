"""A small single-threaded event loop: sockets (selectors/epoll) and timers.

All MQTT sessions of a process are driven from one loop through paho's external-loop
socket callbacks, so a thousand devices need a thousand sockets, not a thousand threads
(a thread and a ``select()`` per client fail silently past ``FD_SETSIZE``).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import selectors
import socket
import threading
import time
from typing import Any, Callable, Optional

log = logging.getLogger("millstream.loop")


class Timer:
    """A scheduled call; :meth:`cancel` keeps it from running."""

    __slots__ = ("cancelled", "fn", "when")

    def __init__(self, when: float, fn: Callable[[], Any]) -> None:
        self.when = when
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class EventLoop:
    """Sockets and timers on one thread; :meth:`call_soon_threadsafe` for other threads."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, Timer]] = []
        self._counter = itertools.count()
        self._stopping = False
        self._pending: list[Callable[[], Any]] = []
        self._pending_lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, (self._drain_wakeup, None))

    # timers -------------------------------------------------------------
    def call_at(self, when: float, fn: Callable[[], Any]) -> Timer:
        timer = Timer(when, fn)
        heapq.heappush(self._timers, (when, next(self._counter), timer))
        return timer

    def call_later(self, delay: float, fn: Callable[[], Any]) -> Timer:
        return self.call_at(time.monotonic() + max(0.0, delay), fn)

    def call_soon_threadsafe(self, fn: Callable[[], Any]) -> None:
        with self._pending_lock:
            self._pending.append(fn)
        # a full buffer means the loop is awake already
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    # sockets ------------------------------------------------------------
    def add_socket(
        self, sock: Any, on_read: Callable[[], Any], on_write: Callable[[], Any]
    ) -> None:
        try:
            self._selector.register(sock, selectors.EVENT_READ, (on_read, on_write))
        except KeyError:
            self._selector.modify(sock, selectors.EVENT_READ, (on_read, on_write))

    def set_writable(self, sock: Any, writable: bool) -> None:
        try:
            key = self._selector.get_key(sock)
        except (KeyError, ValueError):
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if writable else 0)
        if key.events != events:
            self._selector.modify(sock, events, key.data)

    def remove_socket(self, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)

    # running ------------------------------------------------------------
    def stop(self) -> None:
        """Make :meth:`run` return after the current iteration (safe from any thread)."""
        self._stopping = True
        self.call_soon_threadsafe(lambda: None)

    @property
    def stopping(self) -> bool:
        return self._stopping

    def run_once(self, max_wait: float = 1.0) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        timeout = max_wait
        if self._timers:
            timeout = min(timeout, max(0.0, self._timers[0][0] - now))
        with self._pending_lock:
            if self._pending:
                timeout = 0.0
        for key, mask in self._selector.select(timeout):
            on_read, on_write = key.data
            try:
                if mask & selectors.EVENT_READ:
                    on_read()
                if mask & selectors.EVENT_WRITE and on_write is not None:
                    on_write()
            except Exception:
                log.exception("socket handler failed")
        self._run_pending()
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if timer.cancelled:
                continue
            try:
                timer.fn()
            except Exception:
                log.exception("timer callback failed")

    def run(
        self, until: Optional[Callable[[], bool]] = None, timeout: Optional[float] = None
    ) -> None:
        """Run until :meth:`stop`, ``until()`` is true, or ``timeout`` seconds passed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._stopping = False
        while not self._stopping:
            if until is not None and until():
                return
            wait = 0.2 if until is not None else 1.0
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                wait = min(wait, left)
            self.run_once(wait)

    def _drain_wakeup(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _run_pending(self) -> None:
        with self._pending_lock:
            pending, self._pending = self._pending, []
        for fn in pending:
            try:
                fn()
            except Exception:
                log.exception("callback failed")

    def close(self) -> None:
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()


def raise_nofile_limit(wanted: Optional[int] = None) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit towards the hard limit; returns (soft, hard)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return (0, 0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if wanted is not None:
        target = min(target, max(soft, wanted))
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit to %d: %s", target, exc)
    return (soft, hard)
