"""Detection over several processes on one host (``detection.processes``).

Scoring is CPU-bound Python (about 25-140 us a reading, docs/detection.md *Cost*), so one
process scores at most one core's worth. :class:`PartitionedEngine` keeps the engine's
interface (``observe``, ``describe``, ``relearn``, ``save``) for the sink, the API and the
alert hooks in the service process, and hands each device to one of ``n`` child processes
by a stable hash of its id (:func:`~millstream_cloud.detection.engine.device_partition`).
Each child runs an ordinary :class:`~millstream_cloud.detection.engine.DetectionEngine`
over the devices of its partition, so a device's detectors live in one place and see all
of its readings in order, and they find exactly what one engine would.

The children share the one state directory: each writes and cleans up only its own
devices' files, and the service process writes the header after them, so the directory
is laid out as one engine's and switching between one process and several keeps what was
learned. A child that dies is started again from the last save; the readings it was
scoring are counted as failed, the other partitions carry on.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing as mp
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from ..model import Anomaly, Reading
from .engine import (
    STATE_FILE,
    DetectionEngine,
    EngineSettings,
    Shard,
    state_header,
    write_header,
)
from .rules import Rule

log = logging.getLogger("millstream.detection.parallel")

# A child is asked whether it is still alive this often while the service waits on it.
POLL_S = 1.0
# A partition's process is started again at most this often (one that cannot start, say
# out of memory, must not be respawned for every batch).
RESTART_BACKOFF_S = 10.0


@dataclass(frozen=True)
class EngineSpec:
    """What a child needs to build its engine (picklable: it crosses a process boundary).

    ``registry`` is the device registry's (path, url) when rules match on machine kind;
    each child opens its own connection to it."""

    settings: EngineSettings
    rules: tuple[Rule, ...] = ()
    registry: tuple[str, str | None] | None = None

    def build(self, partition: tuple[int, int]) -> DetectionEngine:
        kind_of: Callable[[str], str | None] | None = None
        if self.registry is not None:
            from millstream_cloud.registry import DeviceRegistry

            kind_of = DeviceRegistry(*self.registry).kind_of
        return DetectionEngine(self.settings, self.rules, kind_of, partition)


class ChildLost(RuntimeError):
    """A partition's process exited or its pipe broke."""


def _serve(conn: Connection, spec: EngineSpec, partition: tuple[int, int]) -> None:
    """A child's loop: one request at a time, every answer ``("ok", result)`` or
    ``("error", text)``; it ends on ``stop`` or when the service's end of the pipe closes.

    Ctrl-C and ``systemctl stop`` signal the whole process group: the service must save
    the children's state before they go, so they ignore SIGINT and SIGTERM and leave when
    the service tells them to (or is gone)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    engine = spec.build(partition)
    while True:
        try:
            op, arg = conn.recv()
        except (EOFError, OSError):  # the service process is gone
            return
        try:
            if op == "stop":
                conn.send(("ok", None))
                return
            conn.send(("ok", _handle(engine, op, arg)))
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def _handle(engine: DetectionEngine, op: str, arg: Any) -> Any:
    if op == "observe":
        readings, now_ns = arg
        found = engine.observe(readings, now_ns)
        return found, engine.failed_readings, engine.readings_seen
    if op == "describe":
        return engine.describe(*arg)
    if op == "relearn":
        return engine.relearn(arg)
    if op == "rearm":
        return engine.rearm(arg)
    if op == "out_of_line":
        return engine.out_of_line()
    if op == "flush":
        return engine.flush()
    if op == "save":
        engine.save(Path(arg), header=False)
        return engine.readings_seen
    if op == "restore":
        restored = engine.restore(Path(arg))
        engine.readings_seen = 0  # the header's count is the whole fleet's, kept by the parent
        return restored
    raise ValueError(f"unknown request {op!r}")


class _Child:
    """One partition's process and the service's end of its pipe: the ``k``-th of the
    worker's ``n`` processes, whose engine keeps ``partition``."""

    def __init__(self, spec: EngineSpec, k: int, n: int, partition: tuple[int, int]) -> None:
        self.k, self.n = k, n
        self.partition = partition
        ctx = mp.get_context("spawn")  # the service runs threads: fork would copy their locks
        self.conn, child_end = ctx.Pipe()
        self.proc: BaseProcess = ctx.Process(
            target=_serve,
            args=(child_end, spec, partition),
            name=f"millstream-detect-{k}of{n}",
            daemon=True,
        )
        self.proc.start()
        child_end.close()
        self.failed = 0  # the child's own failed_readings, as it last said
        self.seen = 0
        self.started = time.monotonic()

    def send(self, op: str, arg: Any) -> None:
        try:
            self.conn.send((op, arg))
        except (OSError, EOFError) as exc:
            raise ChildLost(f"detection process {self.k} of {self.n} is gone: {exc}") from exc

    def answer(self) -> Any:
        try:
            while not self.conn.poll(POLL_S):
                if not self.proc.is_alive():
                    raise EOFError(f"exit code {self.proc.exitcode}")
            status, result = self.conn.recv()
        except (OSError, EOFError) as exc:
            raise ChildLost(f"detection process {self.k} of {self.n} exited ({exc})") from exc
        if status != "ok":
            raise RuntimeError(f"detection process {self.k} of {self.n}: {result}")
        return result

    def call(self, op: str, arg: Any = None) -> Any:
        self.send(op, arg)
        return self.answer()

    def stop(self, timeout: float) -> None:
        if self.proc.is_alive():
            with suppress(ChildLost, RuntimeError):  # it is stopped below either way
                self.call("stop")
            self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()  # it ignores SIGTERM
            self.proc.join(timeout)
        self.conn.close()


class PartitionedEngine:
    """The detection engine, its devices split over ``processes`` child processes.

    Not itself thread-safe beyond one lock: every request waits for the one before it
    (the sink scores from one thread; the API's ``describe`` and ``relearn`` wait their
    turn).

    ``batch_readings``: how many readings the sink gathers for one ``observe``. The service
    process waits without the GIL while the children score, so a call may be ten times the
    in-process chunk; device models score a batch in one matrix call per device, so their
    cost falls with the batch (bench/detection_processes.py ``--every``).

    ``shard``: the worker's share of the fleet when several detecting workers split it
    (``detection.shards``); its processes split that share."""

    batch_readings = 5000

    def __init__(
        self,
        spec: EngineSpec,
        processes: int,
        state_dir: Path | None = None,
        shard: Shard | None = None,
    ) -> None:
        if processes < 2:
            raise ValueError("a PartitionedEngine needs at least 2 processes")
        self.spec = spec
        self.shard = shard or Shard()
        self.settings = spec.settings
        self.rules = spec.rules
        self.processes = processes
        self.state_dir = state_dir  # where a restarted child restores from
        self.restarts = 0
        self._base_seen = 0  # readings counted in the state restored
        self._lost_failed = 0  # readings of batches a lost child was scoring
        self._lock = threading.Lock()
        self._owner: dict[str, int] = {}
        self.children = [self._start(k) for k in range(processes)]

    @property
    def readings_seen(self) -> int:
        return self._base_seen + sum(c.seen for c in self.children)

    @property
    def failed_readings(self) -> int:
        """Readings the children could not score, and those of batches a lost child had."""
        return self._lost_failed + sum(c.failed for c in self.children)

    def owner(self, device: str) -> int:
        k = self._owner.get(device)
        if k is None:
            k = self._owner[device] = self.shard.process_of(device, self.processes)
        return k

    # --- the engine's interface ---------------------------------------------------------
    def observe(self, readings: Sequence[Reading], now_ns: int | None = None) -> list[Anomaly]:
        parts: list[list[Reading]] = [[] for _ in self.children]
        latest = now_ns
        for r in readings:
            parts[self.owner(r.device)].append(r)
            if math.isfinite(r.value) and (latest is None or r.time_ns > latest):
                latest = r.time_ns  # as one engine takes the batch's time: scored readings
        out: list[Anomaly] = []
        with self._lock:
            # Every child hears the batch's time (held alarms are released by it), then all
            # score at once; the answers are gathered in partition order.
            asked = []
            for child, part in zip(self.children, parts, strict=True):
                try:
                    child.send("observe", (part, latest))
                    asked.append((child, part))
                except ChildLost as exc:
                    self._lost(child, len(part), exc)
            for child, part in asked:
                try:
                    found, child.failed, child.seen = child.answer()
                except ChildLost as exc:
                    self._lost(child, len(part), exc)
                    continue
                except RuntimeError:  # the engine itself failed: that part is lost
                    log.exception("detection process %d of %d failed a batch", child.k, child.n)
                    self._lost_failed += len(part)
                    continue
                out.extend(found)
        out.sort(key=lambda a: a.time_ns)
        return out

    def flush(self) -> list[Anomaly]:
        with self._lock:
            out = [a for found in self._all("flush") for a in found]
        out.sort(key=lambda a: a.time_ns)
        return out

    def describe(self, device: str, kind: str | None, metrics: Iterable[str]) -> dict[str, Any]:
        with self._lock:
            found: dict[str, Any] = self._child(device).call(
                "describe", (device, kind, list(metrics))
            )
        found["process"] = {"partition": self.owner(device), "processes": self.processes}
        return found

    def relearn(self, device: str) -> dict[str, int]:
        with self._lock:
            result: dict[str, int] = self._child(device).call("relearn", device)
        return result

    def rearm(self, device: str) -> dict[str, int]:
        with self._lock:
            result: dict[str, int] = self._child(device).call("rearm", device)
        return result

    def out_of_line(self) -> list[tuple[str, str]]:
        with self._lock:
            return [(str(d), str(m)) for found in self._all("out_of_line") for d, m in found]

    def restore(self, directory: Path) -> bool:
        """Each child loads its partition's devices from ``directory`` (as ``save`` or one
        engine wrote them); raises when the header cannot be read, like one engine."""
        path = directory / STATE_FILE
        if not path.exists():
            return False
        header = json.loads(path.read_text(encoding="utf-8"))
        with self._lock:
            self._all("restore", str(directory))
        self._base_seen = int(header.get("readings_seen", 0))
        return True

    def save(self, directory: Path, guard: AbstractContextManager[Any] | None = None) -> Path:
        """Every child saves its devices (at once), then the header goes last, as one
        engine writes it. ``guard`` is not needed: requests to the children are already
        one at a time."""
        with self._lock:
            for child, seen in zip(self.children, self._all("save", str(directory)), strict=True):
                child.seen = seen
        return write_header(directory, state_header(self.settings, self.readings_seen))

    def close(self, timeout: float = 10.0) -> None:
        """Stop the children (after the sink's last save)."""
        with self._lock:
            for child in self.children:
                child.stop(timeout)

    # --- internals ----------------------------------------------------------------------
    def _all(self, op: str, arg: Any = None) -> list[Any]:
        """Ask every child at once; every answer is read (so no pipe is left holding a
        stale one) before the first failure, if any, is raised."""
        for child in self.children:
            child.send(op, arg)
        answers: list[Any] = []
        failure: Exception | None = None
        for child in self.children:
            try:
                answers.append(child.answer())
            except (ChildLost, RuntimeError) as exc:
                failure = failure or exc
                answers.append(None)
        if failure is not None:
            raise failure
        return answers

    def _start(self, k: int) -> _Child:
        partition = self.shard.process_partition(k, self.processes)
        return _Child(self.spec, k, self.processes, partition)

    def _child(self, device: str) -> _Child:
        return self.children[self.owner(device)]

    def _lost(self, child: _Child, readings: int, exc: Exception) -> None:
        """Count what the child was scoring as failed and start it again from the last
        save, so its partition is watched again from the next batch."""
        self._lost_failed += readings
        if time.monotonic() - child.started < RESTART_BACKOFF_S:
            log.error("%s; %d readings not scored; started again shortly", exc, readings)
            return  # the next batch that finds it gone tries again, after the backoff
        self.restarts += 1
        log.error("%s; %d readings not scored; starting it again", exc, readings)
        child.stop(1.0)
        # What it had counted stays counted; the new process counts from zero.
        self._base_seen += child.seen
        self._lost_failed += child.failed
        fresh = self._start(child.k)
        self.children[child.k] = fresh
        if self.state_dir is not None and (self.state_dir / STATE_FILE).exists():
            try:
                fresh.call("restore", str(self.state_dir))
            except Exception:
                log.exception("detection process %d of %d: restore failed", child.k, child.n)
