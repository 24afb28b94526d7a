"""One worker thread and queue per integration: retries with backoff, and a failing
receiver never holds up the others.

The queue holds at most one notification per alert group: a newer one for the same group
replaces one still waiting (it carries the newer state), so a receiver that is down for
hours does not build a backlog of stale messages.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from millstream_cloud.alerts.metrics import AlertMetrics
from millstream_cloud.alerts.notifiers.base import DeliveryError, Notification, Notifier

log = logging.getLogger("millstream.alerts.delivery")

# True: delivered; False: gave up; None: replaced by a newer notification of its group.
DoneCallback = Callable[[bool | None], None]


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 8
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    multiplier: float = 2.0

    def delay(self, attempt: int) -> float:
        return float(
            min(self.backoff_max_s, self.backoff_initial_s * self.multiplier ** (attempt - 1))
        )


class IntegrationWorker:
    def __init__(
        self,
        receiver: str,
        integration: str,
        notifier: Notifier,
        policy: RetryPolicy,
        metrics: AlertMetrics,
    ) -> None:
        self.receiver = receiver
        self.integration = integration  # e.g. "webhook[0]"
        self.notifier = notifier
        self.policy = policy
        self.metrics = metrics
        self._pending: OrderedDict[str, tuple[Notification, DoneCallback]] = OrderedDict()
        self._cond = threading.Condition()
        self._busy = False
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"notify-{receiver}-{integration}", daemon=True
        )
        self._thread.start()

    @property
    def id(self) -> str:
        return f"{self.receiver}/{self.integration}"

    def submit(self, notification: Notification, done: DoneCallback) -> None:
        with self._cond:
            old = self._pending.pop(notification.group_key, None)
            if old is not None:
                old[1](None)  # superseded: the newer notification carries its state
            self._pending[notification.group_key] = (notification, done)
            self.metrics.queue.labels(self.receiver, self.integration).set(len(self._pending))
            self._cond.notify()

    def _superseded(self, group_key: str) -> bool:
        with self._cond:
            return group_key in self._pending

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                while not self._pending and not self._stop.is_set():
                    self._busy = False
                    self._cond.notify_all()
                    self._cond.wait(0.5)
                if self._stop.is_set():
                    break
                _, (notification, done) = self._pending.popitem(last=False)
                self._busy = True
                self.metrics.queue.labels(self.receiver, self.integration).set(len(self._pending))
            ok = self._deliver(notification)
            try:
                done(ok)
            except Exception:
                log.exception("%s: delivery callback failed", self.id)
        with self._cond:
            self._busy = False
            self._cond.notify_all()

    def _deliver(self, notification: Notification) -> bool | None:
        labels = (self.receiver, self.integration)
        kind = self.integration.split("[", 1)[0]
        for attempt in range(1, self.policy.max_attempts + 1):
            t0 = time.perf_counter()
            try:
                self.notifier.notify(notification)
            except Exception as exc:
                self.metrics.delivery_seconds.labels(kind).observe(time.perf_counter() - t0)
                self.metrics.notifications.labels(*labels, "failed_attempt").inc()
                retry = not isinstance(exc, DeliveryError) or exc.retry
                last = attempt == self.policy.max_attempts or not retry
                log.warning(
                    "receiver %s: %s: group %s: attempt %d failed: %s%s",
                    self.receiver,
                    self.integration,
                    notification.group_key,
                    attempt,
                    exc,
                    "" if last else f"; retrying in {self.policy.delay(attempt):.1f}s",
                )
                if last:
                    break
                if self._stop.wait(self.policy.delay(attempt)):
                    break
                if self._superseded(notification.group_key):
                    return None  # a newer notification for this group will be tried instead
                continue
            self.metrics.delivery_seconds.labels(kind).observe(time.perf_counter() - t0)
            self.metrics.notifications.labels(*labels, "success").inc()
            return True
        self.metrics.notifications.labels(*labels, "dropped").inc()
        log.error(
            "receiver %s: %s: group %s: gave up; the next group flush tries again",
            self.receiver,
            self.integration,
            notification.group_key,
        )
        return False

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout)
        try:
            self.notifier.close()
        except Exception:
            log.exception("%s: close failed", self.id)
