"""The demo's closing report: injected faults (the simulator's ground truth) against the
anomalies the API lists."""

from __future__ import annotations

import json
from pathlib import Path

from millstream_cloud.detection.eval import groundtruth

SPIKE = {
    "device": "m1",
    "fault": "spike",
    "metrics": ["voltage_v"],
    "start": "2026-11-26T10:00:00Z",
    "end": "2026-11-26T10:00:01Z",
}
STUCK = {
    "device": "m2",
    "fault": "stuck",
    "metrics": ["temp_c", "speed_rpm"],
    "start": "2026-11-26T10:05:00+00:00",
    "end": "2026-11-26T10:10:00+00:00",
}


def _api_row(device: str, metric: str | None, time: str, top: str | None = None) -> dict:
    contributions = [{"metric": top, "value": 1.0, "expected": 0.0, "sigma": 5.0}] if top else []
    return {"device": device, "metric": metric, "time": time, "contributions": contributions}


def test_a_fault_is_found_by_an_anomaly_naming_its_device_and_metric_in_time() -> None:
    rows = [
        _api_row("m1", "voltage_v", "2026-11-26T10:00:40Z"),  # 39 s after the spike's end
        _api_row("m2", None, "2026-11-26T10:06:00Z", top="speed_rpm"),  # a device model's
        _api_row("m2", "temp_c", "2026-11-26T10:12:00Z"),  # 2 min after: stray
        _api_row("m1", "current_a", "2026-11-26T10:00:00Z"),  # another metric: stray
    ]
    raised = groundtruth.from_api(rows)
    result = groundtruth.compare([SPIKE, STUCK], raised)
    assert result["faults"] == {"spike": {"found": 1, "of": 1}, "stuck": {"found": 1, "of": 1}}
    assert result["stray"] == [2, 3] and result["recent"] == 0
    # The last was raised during the spike on its device, on another metric: seen, named
    # wrong; the one after the stuck sensor's end is outside any fault.
    assert result["misnamed"] == [3]
    late = groundtruth.compare([SPIKE], [groundtruth.from_api(rows)[0]], slack_s=30.0)
    assert late["faults"] == {"spike": {"found": 0, "of": 1}}
    assert groundtruth.summary_lines(result, len(raised)) == [
        "injected faults  2 (spike 1, stuck 1)",
        "found            spike 1 of 1, stuck 1 of 1",
        "anomalies        4: 2 during an injected fault, 2 outside one (1 of them during a "
        "fault of the same device, named on another metric)",
    ]


def test_a_fault_injected_in_the_last_seconds_is_not_counted_missed() -> None:
    judged_before = groundtruth.timestamp("2026-11-26T10:04:55Z")
    result = groundtruth.compare([SPIKE, STUCK], [], judged_before_s=judged_before)
    assert result["faults"] == {"spike": {"found": 0, "of": 1}} and result["recent"] == 1
    assert groundtruth.summary_lines(result, 0)[0] == (
        "injected faults  1 (spike 1) (1 more injected in the last seconds, not judged yet)"
    )
    assert groundtruth.summary_lines(groundtruth.compare([], []), 3) == [
        "no fault injected yet; anomalies 3"
    ]


def test_the_ground_truth_file_is_read_while_the_fleet_still_writes_it(tmp_path: Path) -> None:
    path = tmp_path / "faults.jsonl"
    assert groundtruth.read_faults(path) == []  # none injected yet: no file
    path.write_text(
        json.dumps(SPIKE) + "\n" + "\n" + json.dumps({"note": "not a fault"}) + "\n"
        + json.dumps(STUCK)[:40],  # a line the writer has not finished
        encoding="utf-8",
    )  # fmt: skip
    assert groundtruth.read_faults(path) == [SPIKE]


def test_a_shift_is_judged_only_after_its_settling_time() -> None:
    # The device model reports a level shift once its averaged residual has moved, minutes
    # in: a shift begun 5 minutes before the report, not found yet, is not a miss; a
    # stuck sensor begun as long ago is.
    shift = {**STUCK, "fault": "shift", "metrics": ["temp_c"]}
    judged_before = groundtruth.timestamp("2026-11-26T10:10:00Z")
    result = groundtruth.compare(
        [shift, STUCK], [], judged_before_s=judged_before, settle_s=groundtruth.SETTLE_S
    )
    assert result["faults"] == {"stuck": {"found": 0, "of": 1}} and result["recent"] == 1
    lines = groundtruth.summary_lines(result, 0, history=True)
    assert (
        lines[0]
        == "injected faults  1 (stuck 1) (1 more injected in the last minutes, not judged yet)"
    )
    assert lines[-1].startswith("(a modelled device's single-reading spike")
    later = groundtruth.timestamp("2026-11-26T10:16:00Z")
    result = groundtruth.compare(
        [shift, STUCK], [], judged_before_s=later, settle_s=groundtruth.SETTLE_S
    )
    assert result["faults"]["shift"] == {"found": 0, "of": 1} and result["recent"] == 0


def test_a_reading_and_its_expected_value_show_their_difference() -> None:
    from millstream_cloud.detection.explain import describe, numbers
    from millstream_cloud.model import Contribution

    # Four significant digits when they show it; more decimals when they would hide it.
    assert numbers(19.24, 18.08) == ("19.24", "18.08")
    assert numbers(0.9149, 0.9079) == ("0.9149", "0.9079")
    assert numbers(1521.3, 1519.6) == ("1521.3", "1519.6")
    assert numbers(1_000_003.0, 1_000_000.0) == ("1000003.0", "1000000.0")
    assert numbers(5.0, 5.0) == ("5", "5")
    c = Contribution(metric="speed", value=1521.34, expected=1519.61, sigma=7.4)
    assert describe(c, "what the other metrics predict for this load") == (
        "speed 7.4\u03c3 above what the other metrics predict for this load (1521.3, expected 1519.6)"
    )


def test_a_reading_back_across_its_expected_value_is_said_to_be_so() -> None:
    from millstream_cloud.detection.explain import describe
    from millstream_cloud.model import Contribution

    # The device model's sigma is its residuals' 30-minute average; the reading quoted is
    # now. On the other side of its expected value, the sentence says which is which.
    c = Contribution(metric="fluid_temp_c", value=57.77, expected=56.63, sigma=-7.0)
    assert describe(c, "what the other metrics predict for this load") == (
        "fluid_temp_c 7.0\u03c3 below what the other metrics predict for this load on average"
        " (now 57.77, expected 56.63)"
    )
