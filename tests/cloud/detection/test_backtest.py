"""The backtest's replay gives what the live engine gives, however the history is cut."""

from __future__ import annotations

import numpy as np
import pytest

from millstream_cloud.detection import backtest as bt
from millstream_cloud.detection.engine import EngineSettings
from millstream_cloud.model import Reading

T0 = 1_772_352_000_000_000_000


def history() -> list[Reading]:
    rng = np.random.default_rng(3)
    data = {m: 20.0 + rng.normal(0.0, 1.0, 3000) for m in ("a", "b", "c")}
    # One metric moves alone: above the bar of a one-metric device (0.5), below that of a
    # lone metric on a device with several (0.7).
    data["a"][2000:2040] += 4.0
    data["b"][2500] += 40.0  # a spike clearly out of its own history: raised
    return [
        Reading("press-01", "plant-a", m, T0 + i * 10**9, float(data[m][i]))
        for i in range(3000)
        for m in ("a", "b", "c")
    ]


@pytest.mark.parametrize("batch", [30, 900, 1_000_000])
def test_replay_does_not_depend_on_how_the_history_is_batched(
    batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Live, a device's first batch is one message; a backtest's can be all of its history.
    # A device counted its metrics once per batch, so a whole-history batch passed for a
    # one-metric device and raised the lone level shift too (found by a backtest in the demo).
    monkeypatch.setattr(bt, "BATCH_READINGS", batch)
    found = bt.replay(history(), EngineSettings(), (), lambda _d: None)
    assert [((a.time_ns - T0) // 10**9, a.metric) for a in found] == [(2500, "b")]


def test_batches_never_split_a_timestamp() -> None:
    from millstream_cloud.storage.base import row_batches

    batches = list(row_batches(history()[:30], 4))
    assert sum(len(b) for b in batches) == 30
    assert all(len({r.time_ns for r in b}) * 3 == len(b) for b in batches)


def test_replay_says_when_detection_fails_instead_of_finding_nothing() -> None:
    from millstream_cloud.detection.engine import check_rules
    from millstream_cloud.detection.rules import parse_rules

    # Each rule alone is consistent with the settings; together (a press that is also
    # press-01) they put the device model's off level above its on level.
    rules = parse_rules(
        [
            {"match": {"kind": "press"}, "mv_off": 5.0},
            {"match": {"device": "press-*"}, "mv_on": 4.0},
        ]
    )
    # (rows a second apart, each one for the model)
    quick = EngineSettings(
        mv_train_rows=500, mv_retrain_rows=500, mv_window_rows=1000, mv_resolution_s=0.0
    )
    check_rules(quick, rules)
    with pytest.raises(bt.ReplayFailed, match=r"device 'press-01': ValueError: .*off level 5"):
        bt.replay(history(), quick, rules, lambda _d: "press")
    bt.replay(history(), quick, rules[:1], lambda _d: "press")  # one of them: no failure
