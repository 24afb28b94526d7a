"""Per-device limits against abuse, enforced by the cloud ingest before decoding a message.

A device that floods (a bug, a loop, a stolen identity) must not starve the others:
each device gets a token bucket of messages per second with a burst allowance, and a
payload size limit. The ingest pipeline calls :meth:`DeviceLimiter.check` for every
message and dead-letters what it refuses with the returned reason, counted by reason.

The broker enforces the coarse limits before the cloud sees anything (``max_packet_size``,
``max_connections``: see :class:`millstream_cloud.security.acl.BrokerLimits`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` stored; one message costs one token."""

    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.updated = now

    def allow(self, now: float, cost: float = 1.0) -> bool:
        elapsed = now - self.updated
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.updated = now
        # A clock that goes backwards refills nothing (elapsed <= 0) but never throws.
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False


class DeviceRateLimiter:
    """One token bucket per device, for at most ``max_devices`` devices (least recently
    seen forgotten first, so a flood of forged device ids cannot grow memory)."""

    def __init__(self, rate: float, burst: float | None = None, max_devices: int = 100_000) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0 messages/s")
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate * 2)
        if self.burst < 1:
            raise ValueError("burst must be >= 1")
        self.max_devices = max_devices
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._lock = threading.Lock()

    def allow(self, device: str, now: float, cost: float = 1.0) -> bool:
        with self._lock:
            bucket = self._buckets.get(device)
            if bucket is None:
                bucket = TokenBucket(self.rate, self.burst, now)
                self._buckets[device] = bucket
                if len(self._buckets) > self.max_devices:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(device)
            return bucket.allow(now, cost)

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass
class LimitSettings:
    """Defaults sized for the simulated fleet (1 message/s per device) with a wide margin."""

    max_messages_per_second: float = 20.0
    burst: float = 200.0  # a device that reconnects drains its on-disk queue in a burst
    max_payload_bytes: int = 256 * 1024


class DeviceLimiter:
    """Payload size and message rate per device; ``check`` returns a dead-letter reason."""

    RATE = "rate_limited"  # the dead-letter reasons the ingest pipeline uses
    SIZE = "oversize"

    def __init__(self, settings: LimitSettings | None = None) -> None:
        self.settings = settings or LimitSettings()
        self.rate = DeviceRateLimiter(self.settings.max_messages_per_second, self.settings.burst)
        self.refused: dict[str, int] = {self.RATE: 0, self.SIZE: 0}

    def check(self, device: str, payload_size: int, now: float) -> str | None:
        """None when the message may go on; else the reason to dead-letter it with."""
        reason = None
        if payload_size > self.settings.max_payload_bytes:
            reason = self.SIZE
        elif not self.rate.allow(device, now):
            reason = self.RATE
        if reason is not None:
            self.refused[reason] += 1
        return reason
