"""RowWindow: the rows a device model learns from, kept as one NumPy ring."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from millstream_cloud.detection.window import RowWindow


def rows(start: int, n: int, width: int = 3) -> np.ndarray:
    return np.arange(start, start + n, dtype=float)[:, None] * np.ones(width)


def test_keeps_the_latest_rows_in_order_across_growth_and_wrap() -> None:
    w = RowWindow(100)
    expect_x, expect_f = np.zeros((0, 3)), np.zeros(0, bool)
    start = 0
    for n in (1, 7, 60, 33, 99, 5, 250, 3):  # grows 64 -> 100, then wraps many times
        x, f = rows(start, n), np.arange(start, start + n) % 3 == 0
        w.extend(x.tolist(), f.tolist())
        expect_x, expect_f = np.vstack([expect_x, x])[-100:], np.r_[expect_f, f][-100:]
        start += n
        assert len(w) == len(expect_x)
        np.testing.assert_array_equal(w.values(), expect_x)
        np.testing.assert_array_equal(w.flags(), expect_f)
        assert w.last() == expect_x[-1].tolist()
    assert w._x.shape == (100, 3)  # never more than maxlen rows held


def test_a_row_of_another_width_starts_afresh() -> None:
    w = RowWindow(10)
    w.extend(rows(0, 4), [False] * 4)
    w.extend(rows(4, 2, width=4), [True, False])
    assert len(w) == 2 and w.width == 4
    np.testing.assert_array_equal(w.flags(), [True, False])


def test_resize_keeps_the_latest() -> None:
    w = RowWindow(50)
    w.extend(rows(0, 40), [False] * 40)
    w.resize(10)
    np.testing.assert_array_equal(w.values()[:, 0], np.arange(30, 40))
    w.resize(1000)
    w.extend(rows(40, 5), [True] * 5)
    assert len(w) == 15 and w.flags().sum() == 5


def test_state_round_trip_is_exact_and_small() -> None:
    rng = np.random.default_rng(0)
    w = RowWindow(60_480)
    x = rng.normal(size=(60_480 + 77, 4))
    f = np.zeros(len(x), bool)
    f[1000:1360] = True  # one incident
    w.extend(x, f)
    state = json.loads(json.dumps(w.state_dict()))
    assert state["flags"] == {"runs": [[0, 923], [1, 360], [0, 59_197]]}
    back = RowWindow(60_480)
    back.load_state(state["rows"], state["flags"])
    np.testing.assert_array_equal(back.values(), x[-60_480:])
    np.testing.assert_array_equal(back.flags(), f[-60_480:])
    # Saved before: rows as lists, flags as a list of booleans.
    old = RowWindow(10)
    old.load_state([[1.0, 2.0], [3.0, 4.0]], [False, True])
    assert old.values().tolist() == [[1.0, 2.0], [3.0, 4.0]] and old.flags().tolist() == [0, 1]
    empty = RowWindow(10)
    empty.load_state(*RowWindow(10).state_dict().values())
    assert len(empty) == 0 and not empty


def test_a_window_counts_the_rows_added_since_it_last_restarted() -> None:
    # A save appends the rows added since the last one: the window says how many
    # (total) and whether it restarted in between (epoch), and hands the latest out.
    w = RowWindow(5)
    w.extend([[float(i), 0.0] for i in range(7)], [False] * 7)
    assert (w.total, len(w)) == (7, 5)
    assert w.latest(2).tolist() == [[5.0, 0.0], [6.0, 0.0]]
    assert w.latest(9).tolist() == w.values().tolist()
    epoch = w.epoch
    w.extend([[1.0, 2.0, 3.0]], [True])  # another width: the window starts afresh
    assert (w.total, w.epoch) == (1, epoch + 1)


def _save(window: object, folder: Path) -> dict:
    """``window``'s state as a save writes it: its values to a rows file in ``folder``."""
    from millstream_cloud.detection.window import SAVING_TO, RowsWriter

    writer = RowsWriter(folder, "dev.json")
    token = SAVING_TO.set(writer)
    try:
        state = window.state_dict()  # type: ignore[attr-defined]
    finally:
        SAVING_TO.reset(token)
    writer.write()
    writer.commit(set())
    return json.loads(json.dumps(state))


def _load(state: dict, folder: Path, compact: bool) -> object:
    from millstream_cloud.detection.calibration import RollingRobust
    from millstream_cloud.detection.window import LOADING_FROM

    window = RollingRobust(10, compact=compact)
    token = LOADING_FROM.set(folder)
    try:
        window.load_state(state)
    finally:
        LOADING_FROM.reset(token)
    return window


def test_a_compact_window_saves_float32_rows_and_takes_over_float64_ones(
    tmp_path: Path,
) -> None:
    import pytest

    from millstream_cloud.detection.calibration import RollingRobust

    values = np.random.default_rng(1).normal(size=300)
    whole = RollingRobust(200)
    for v in values:
        whole.add(float(v))
    # A window saved before it was compact (float64 rows) loads into a compact one ...
    state = _save(whole, tmp_path)
    assert "dtype" not in state["buf"] and state["buf"]["count"] == 200
    compact = _load(state, tmp_path, compact=True)
    assert np.array_equal(compact.buf, whole.buf.astype(np.float32))  # type: ignore[attr-defined]
    # ... and its next save writes it afresh as float32: half the bytes, loaded exactly.
    again = _save(compact, tmp_path)
    assert again["buf"]["dtype"] == "f4" and again["buf"]["file"] != state["buf"]["file"]
    assert (tmp_path / again["buf"]["file"]).stat().st_size == 200 * 4
    restored = _load(again, tmp_path, compact=True)
    assert np.array_equal(restored.buf, compact.buf)  # type: ignore[attr-defined]
    for v in values[:20]:
        assert restored.tail(float(v), True) == compact.tail(float(v), True)  # type: ignore[attr-defined]
    # Then it appends: ten new values, forty bytes.
    for w in (compact, restored):
        for v in values[:10]:
            w.add(float(v))  # type: ignore[attr-defined]
    appended = _save(restored, tmp_path)
    assert appended["buf"]["file"] == again["buf"]["file"]
    assert (tmp_path / appended["buf"]["file"]).stat().st_size == 210 * 4
    assert np.array_equal(_load(appended, tmp_path, True).buf, compact.buf)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="unknown rows dtype 'f2'"):
        _load({**again, "buf": {**again["buf"], "dtype": "f2"}}, tmp_path, compact=True)
