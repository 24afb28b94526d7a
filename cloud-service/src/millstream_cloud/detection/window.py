"""The rows a device model learns from: the latest complete rows of a device's metrics and,
for each, whether it was inside an anomaly (a retrain leaves those out).

A week of 10-s rows is 60,480 of them. Kept as Python lists of floats that is about 380 bytes
a row for a 10-metric device (23 MB a device); here they are one NumPy ring, 8 bytes a value,
grown as rows arrive so a young device holds only what it has seen.

On disk such windows (and the values each per-metric calibration remembers) live in rows
files that a save appends to (:class:`RowsWriter`), so a save writes what is new, not the
week.
"""

from __future__ import annotations

import os
import secrets
import zlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .base import pack_floats, unpack_floats

ROWS_SUFFIX = ".rows"  # a rows file: little-endian float64, ``width`` values a row
# ... or float32 for a window that holds float32 (the state's reference says "dtype": "f4").
F4 = "f4"


class Rows(Protocol):
    """What :class:`RowsWriter` needs of a window of rows (:class:`RowWindow`, and the
    value windows of the per-metric calibrations)."""

    width: int
    epoch: int
    total: int
    saved: SavedRows | None

    @property
    def maxlen(self) -> int: ...

    @property
    def itemsize(self) -> int: ...  # bytes a value in its rows file: 8, or 4 (float32)

    def __len__(self) -> int: ...

    def values(self) -> np.ndarray: ...

    def latest(self, k: int) -> np.ndarray: ...


@dataclass(frozen=True, slots=True)
class SavedRows:
    """Where a window's rows were last saved: a rows file in the device folder and how
    many rows of it the saved state counts (a save that did not finish may have left
    more), with the window's ``epoch`` and ``total`` at that save."""

    name: str
    width: int
    epoch: int
    total: int
    rows: int
    crc: int  # CRC-32 of the file's first ``rows`` rows
    itemsize: int = 8  # bytes a value: float64, or 4 for float32


class RowWindow:
    """The latest ``maxlen`` rows (all of one width) and one flag per row, oldest first.

    A row of another width than those kept (a metric added, or one joining the model)
    starts the window afresh: rows that lack a metric cannot train a model that has it."""

    itemsize = 8  # float64 rows (see Rows)

    def __init__(self, maxlen: int) -> None:
        self.maxlen = max(1, int(maxlen))
        self.width = 0
        self._x = np.empty((0, 0))
        self._f = np.empty(0, dtype=bool)
        self._start = 0  # index of the oldest row in the ring
        self._n = 0
        self.epoch = 0  # counts restarts of the window (clear)
        self.total = 0  # rows added since the last restart
        self.saved: SavedRows | None = None  # where a save last put them (RowsWriter)

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter(self.values())

    def clear(self) -> None:
        self._x = np.empty((0, self.width))
        self._f = np.empty(0, dtype=bool)
        self._start = self._n = self.total = 0
        self.epoch += 1

    def _order(self) -> np.ndarray:
        return (self._start + np.arange(self._n)) % max(len(self._x), 1)

    def values(self) -> np.ndarray:
        """The rows, oldest first (a copy)."""
        return self._x[self._order()]

    def flags(self) -> np.ndarray:
        """Whether each row was inside an anomaly, oldest first (a copy)."""
        return self._f[self._order()]

    def latest(self, k: int) -> np.ndarray:
        """The latest ``k`` rows (at most those kept), oldest first (a copy)."""
        k = min(k, self._n)
        at = (self._start + self._n - k + np.arange(k)) % max(len(self._x), 1)
        return self._x[at]

    def last(self) -> list[float]:
        return [float(v) for v in self._x[(self._start + self._n - 1) % len(self._x)]]

    def _grow(self, need: int) -> None:
        """Room for ``need`` rows (at most ``maxlen``), the kept ones laid out from 0."""
        cap = min(self.maxlen, max(need, 2 * len(self._x), 64))
        x, f = np.empty((cap, self.width)), np.zeros(cap, dtype=bool)
        order = self._order()
        x[: self._n], f[: self._n] = self._x[order], self._f[order]
        self._x, self._f, self._start = x, f, 0

    def extend(
        self, rows: Sequence[Sequence[float]] | np.ndarray, flags: Sequence[bool] | np.ndarray
    ) -> None:
        """Add rows with their flags; the oldest go once there are ``maxlen``."""
        if not len(rows):
            return
        x = np.asarray(rows, dtype=float).reshape(len(rows), -1)
        f = np.asarray(flags, dtype=bool)
        if x.shape[1] != self.width:
            self.width = x.shape[1]
            self.clear()
        self.total += len(x)
        if len(x) > self.maxlen:
            x, f = x[-self.maxlen :], f[-self.maxlen :]
        if self._n + len(x) > len(self._x) and len(self._x) < self.maxlen:
            self._grow(self._n + len(x))
        cap = len(self._x)
        at = (self._start + self._n + np.arange(len(x))) % cap
        self._x[at], self._f[at] = x, f
        n = self._n + len(x)
        if n > cap:
            self._start = (self._start + n - cap) % cap
            n = cap
        self._n = n

    def resize(self, maxlen: int) -> None:
        """Keep ``maxlen`` rows from now on (the latest of those kept)."""
        x, f = self.values(), self.flags()
        self.maxlen = max(1, int(maxlen))
        self.clear()
        self.extend(x, f)

    def state_dict(self, key: str = "rows") -> dict[str, Any]:
        """The rows packed (:func:`pack_floats`, with their width), or while a save takes
        the state (:data:`SAVING_TO`) where in a rows file they are (``key`` names the
        window in the file's name); the flags as runs of one value (``[value, count]``):
        a week of flags is a handful of runs."""
        f = self.flags()
        starts = np.flatnonzero(np.r_[True, f[1:] != f[:-1]]) if len(f) else np.zeros(0, int)
        sizes = np.diff(np.r_[starts, len(f)])
        runs = [[int(f[a]), int(n)] for a, n in zip(starts, sizes, strict=True)]
        rows: Any = []
        writer = SAVING_TO.get()
        if self._n:
            if writer is not None:
                rows = writer.stub(self, key)
            else:
                rows = {"width": self.width, **pack_floats(self.values().ravel())}
        return {"rows": rows, "flags": {"runs": runs}}

    def load_state(self, rows: Any, flags: Any) -> None:
        """Rows and flags as :meth:`state_dict` writes them (rows in a rows file read from
        the folder being loaded, :data:`LOADING_FROM`), or as saved before (rows as packed
        floats or lists, flags as a list of booleans)."""
        ref = rows if isinstance(rows, dict) and "file" in rows else None
        if ref is not None:
            x = read_ref(ref)
        elif isinstance(rows, dict):
            x = unpack_floats(rows).reshape(-1, int(rows["width"]))
        else:
            x = np.asarray([list(r) for r in rows], dtype=float)
        if isinstance(flags, dict):
            f = np.concatenate(
                [np.full(int(n), bool(v)) for v, n in flags["runs"]] or [np.zeros(0, bool)]
            )
        else:
            f = np.asarray([bool(v) for v in flags], dtype=bool)
        self.clear()
        if len(x):
            self.extend(x, f)
        self.saved = loaded(ref, self)


class RowsWriter:
    """A device's row windows to disk at a save, so a save writes the rows added since
    the last one instead of the whole window (a week of rows: megabytes a device).

    Each window has a rows file in the device folder, named for the device file, the
    window and a random token. :meth:`stub` (under the scoring lock) copies only what is
    to be written: the new rows, appended to the window's file; or the whole window, to a
    new file, on a first save, after the window restarted (a relearn, a new metric), when
    the file is not as the last save left it, or when it holds more rows the window has
    dropped than the window keeps (so a file stays under twice the window). :meth:`write`
    writes before the device's JSON refers to the files; :meth:`commit`, after it, removes
    the device's rows files that JSON no longer refers to. Rows beyond those the JSON
    counts (left by a save that did not finish) are cut before the next append. The JSON
    holds the CRC-32 of the file's rows up to its window's end, so a file the disk did not
    keep whole (a power cut before the data reached it) is refused at load instead of
    read as rows; that, not an fsync per file (a thousand one-metric devices would have
    made 8000 a save), is what makes it safe.
    """

    def __init__(self, folder: Path, device_file: str) -> None:
        self.folder, self.device_file = folder, device_file
        self._jobs: list[tuple[Rows, SavedRows, bytes, int]] = []

    def stub(self, window: Rows, key: str) -> dict[str, Any]:
        saved, width, n, size = window.saved, window.width, len(window), window.itemsize
        new = -1 if saved is None else window.total - saved.total
        append = (
            saved is not None
            and (saved.width, saved.epoch, saved.itemsize) == (width, window.epoch, size)
            and 0 <= new <= n
            and saved.rows + new - n <= window.maxlen
            and _size(self.folder / saved.name) >= saved.rows * width * size
        )
        if append and saved is not None:
            name, at, crc, data = saved.name, saved.rows, saved.crc, window.latest(new)
        else:
            name, at, crc, data = (
                f"{self.device_file}.{key}.{secrets.token_hex(4)}{ROWS_SUFFIX}",
                0,
                0,
                window.values(),
            )
        raw = np.ascontiguousarray(data, dtype="<f4" if size == 4 else "<f8").tobytes()
        rows, crc = at + len(data), zlib.crc32(raw, crc)
        saved_now = SavedRows(name, width, window.epoch, window.total, rows, crc, size)
        self._jobs.append((window, saved_now, raw, at))
        ref = {"file": name, "width": width, "offset": rows - n, "count": n, "crc": crc}
        return {**ref, "dtype": F4} if size == 4 else ref

    def write(self) -> None:
        for _, saved, raw, at in self._jobs:
            path = self.folder / saved.name
            with open(path, "r+b" if at else "wb") as fh:
                fh.truncate(at * saved.width * saved.itemsize)
                fh.seek(0, os.SEEK_END)
                fh.write(raw)

    def commit(self, before: set[str]) -> set[str]:
        """After the device's state is written: the rows files it refers to; those of
        ``before`` (the files the last save referred to) it no longer does are removed."""
        keep = set()
        for window, saved, _, _ in self._jobs:
            window.saved = saved
            keep.add(saved.name)
        for name in before - keep:
            (self.folder / name).unlink(missing_ok=True)
        return keep


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def referred_files(state: Any) -> set[str]:
    """The rows files a device's state refers to (anywhere in it)."""
    if isinstance(state, dict):
        if "file" in state and "crc" in state:
            return {str(state["file"])}
        return set().union(*(referred_files(v) for v in state.values()))
    if isinstance(state, list):
        return set().union(*(referred_files(v) for v in state))
    return set()


def owner(rows_file: str) -> str:
    """The device file a rows file belongs to (its name less ``.<window>.<token>.rows``)."""
    return rows_file.rsplit(".", 3)[0]


def read_rows(folder: Path, ref: dict[str, Any]) -> np.ndarray:
    """The rows a state's ``{"file", "width", "offset", "count", "crc"}`` refers to,
    checked against the CRC-32 of the file up to them."""
    width, offset, count = int(ref["width"]), int(ref["offset"]), int(ref["count"])
    itemsize = _itemsize(ref)
    path, size = folder / str(ref["file"]), (offset + count) * width * itemsize
    with open(path, "rb") as fh:
        raw = fh.read(size)
    if len(raw) != size:
        raise ValueError(f"{path.name}: {len(raw)} bytes where the state counts {size}")
    if zlib.crc32(raw) != int(ref["crc"]):
        raise ValueError(f"{path.name}: not as saved (CRC-32 differs)")
    x = np.frombuffer(raw, dtype="<f4" if itemsize == 4 else "<f8").astype(float)
    return x.reshape(-1, width)[offset:]


def _itemsize(ref: dict[str, Any]) -> int:
    dtype = ref.get("dtype")
    if dtype not in (None, F4):
        raise ValueError(f"{ref['file']}: unknown rows dtype {dtype!r}")
    return 4 if dtype == F4 else 8


# While a save takes a device's state, where its windows of rows go (RowsWriter); while a
# load restores one, the folder its rows files are in: the windows deep inside the
# detectors (a device model's rows, the per-metric calibrations' values) are saved and
# restored without every state_dict between them passing these along.
SAVING_TO: ContextVar[RowsWriter | None] = ContextVar("SAVING_TO", default=None)
LOADING_FROM: ContextVar[Path | None] = ContextVar("LOADING_FROM", default=None)


def read_ref(ref: dict[str, Any]) -> np.ndarray:
    """The rows a state refers to, from the folder being loaded (:data:`LOADING_FROM`)."""
    folder = LOADING_FROM.get()
    if folder is None:
        raise ValueError("the state refers to rows files; load it from its directory")
    return read_rows(folder, ref)


def loaded(ref: dict[str, Any] | None, window: Rows) -> SavedRows | None:
    """Where ``window``, just loaded from rows file ``ref`` (None: not from one), is
    saved, so the next save appends to that file; None when the window kept fewer rows
    than the file's (a shorter window now): the next save writes it afresh."""
    if ref is None or len(window) != int(ref["count"]):
        return None
    rows = int(ref["offset"]) + int(ref["count"])
    return SavedRows(
        str(ref["file"]),
        window.width,
        window.epoch,
        window.total,
        rows,
        int(ref["crc"]),
        _itemsize(ref),
    )
