from __future__ import annotations

import json
import math
import shutil
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from millstream_cloud.detection.eval import cli, runners, skab


def test_skab_frozen_settings_meet_the_targets(bench_root: Path) -> None:
    res = runners.run_skab(bench_root / "skab" / "data", runners.load_frozen())
    assert res["f1"] >= 0.80 and res["far"] <= 15.0 and res["mar"] <= 25.0


def test_skab_unscored_tail_leaves_each_runs_last_rows_out(bench_root: Path) -> None:
    """Like for like with Conv-AE's predictions: the last 118 test rows of each run unscored."""
    settings = runners.load_frozen()
    whole = runners.run_skab(bench_root / "skab" / "data", settings)
    cut = runners.run_skab(bench_root / "skab" / "data", settings, unscored_tail=118)
    rows = sum(whole["counts"].values()) - sum(cut["counts"].values())
    assert rows == 20 * 118
    assert cut["f1"] >= 0.85 and cut["far"] <= 10.0


def test_skab_scorer_counts_flag_everything_like_the_readme(bench_root: Path) -> None:
    runs = skab.load_runs(bench_root / "skab" / "data")
    assert len(runs) == 20
    sc = skab.score_runs((r.anomaly[400:], r.anomaly[400:] * 0 + 1) for r in runs)
    assert (sc.tp + sc.fp, sc.tp) == (14472, 7826)
    assert (sc.f1, sc.far, sc.mar) == (0.70, 100.0, 0.0)


def test_skab_loader_tolerates_missing_anomaly_free_readme_and_mixed_line_endings(
    bench_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = bench_root / "skab" / "data" / "valve1" / "0.csv"
    (tmp_path / "valveX").mkdir()
    raw = src.read_bytes().replace(b"\r\n", b"\n")
    lines = raw.split(b"\n")
    mixed = b"".join(ln + (b"\r\n" if i % 2 else b"\n") for i, ln in enumerate(lines) if ln)
    (tmp_path / "valveX" / "0.csv").write_bytes(mixed)
    shutil.copy(src, tmp_path / "valveX" / "1.csv")
    (tmp_path / "README.md").write_text("# not data\n")
    (tmp_path / "notes.csv").write_text("just,some\n1,2\n")
    runs = skab.load_runs(tmp_path)
    assert [r.name for r in runs] == ["valveX/0.csv", "valveX/1.csv"]
    assert runs[0].values.shape == runs[1].values.shape
    assert (runs[0].anomaly == runs[1].anomaly).all()
    (tmp_path / "anomaly-free").mkdir()
    (tmp_path / "anomaly-free" / "anomaly-free.csv").write_text("datetime;Pressure\n")
    out = tmp_path / "out.json"
    assert cli.main(["eval", "skab", "--data", str(tmp_path), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {"f1", "far", "mar"} <= set(data)
    # The unlabelled table is said to be left out; SKAB's own anomaly-free/ is expected.
    assert data["unlisted_files"] == ["notes.csv"]
    err = capsys.readouterr().err
    assert "1 CSV file(s) without an 'anomaly' column (or unreadable), not scored: notes.csv" in err


def test_skab_empty_dir_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="anomaly"):
        skab.load_runs(tmp_path)


@pytest.mark.slow
def test_nab_cli_frozen_run_writes_contract_keys(bench_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "nab.json"
    nab = bench_root / "nab"
    rc = cli.main(
        [
            "eval",
            "nab",
            "--data",
            str(nab / "data"),
            "--labels",
            str(nab / "labels"),
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    assert {"standard", "low_fp", "low_fn", "thresholds"} <= set(data)
    assert data["threshold_mode"] == "frozen"
    # The targets on the shared files, with the frozen settings.
    assert data["standard"] >= 70.0 and data["low_fp"] >= 60.0 and data["low_fn"] >= 75.0


def test_sim_cli_small_fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from millstream_cloud.detection.eval import sim

    small = sim.SimConfig(
        seed=4, devices=2, hours=18, fault_after_h=13, faults=("overheating", "stuck")
    )
    orig = runners.run_sim
    monkeypatch.setattr(
        runners, "run_sim", lambda settings, seed=0, config=None: orig(settings, seed, small)
    )
    out = tmp_path / "sim.json"
    assert cli.main(["eval", "sim", "--seed", "4", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {"recall", "precision", "median_delay_s"} <= set(data)
    assert data["recall"] == 1.0


def test_parser_registers_eval_subcommands() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    cli.add_parser(sub)
    for name in ("nab", "skab", "sim"):
        args = parser.parse_args(["eval", name])
        assert callable(args.func)
    assert parser.parse_args(["eval", "nab", "--sweep"]).sweep is True


def _tiny_nab(root: Path, rows: int = 400) -> tuple[Path, Path]:
    """One NAB-style file of ``rows`` 5-minute values with one window, and its labels."""
    (root / "data" / "cat").mkdir(parents=True)
    (root / "labels").mkdir()
    start = datetime(2014, 4, 1)
    lines = ["timestamp,value"]
    lines += [f"{start + timedelta(minutes=5 * i)},{i % 7}" for i in range(rows)]
    (root / "data" / "cat" / "a.csv").write_text("\n".join(lines) + "\n")
    windows = {"cat/a.csv": [["2014-04-01 20:00:00.000000", "2014-04-01 22:00:00.000000"]]}
    (root / "labels" / "combined_windows.json").write_text(json.dumps(windows))
    return root / "data", root / "labels"


def _eval(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = cli.main(["eval", *args])
    return rc, capsys.readouterr().err


def test_nab_bad_value_is_refused_with_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, labels = _tiny_nab(tmp_path, rows=288)
    csv_path = data / "cat" / "a.csv"
    lines = csv_path.read_text().splitlines()
    lines[40] = lines[40].split(",")[0] + ","  # a blank value on file line 41
    csv_path.write_text("\n".join(lines) + "\n")
    rc, err = _eval(["nab", "--data", str(data), "--labels", str(labels)], capsys)
    assert rc == 2
    assert f"{csv_path} line 41: value '' is not a finite number" in err
    lines[40] = lines[40] + "nan"
    csv_path.write_text("\n".join(lines) + "\n")
    assert _eval(["nab", "--data", str(data), "--labels", str(labels)], capsys)[0] == 2


def test_nab_missing_labels_bad_header_and_bad_settings_say_what(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, labels = _tiny_nab(tmp_path, rows=288)
    rc, err = _eval(["nab", "--data", str(data), "--labels", str(data)], capsys)
    assert rc == 2 and "combined_windows.json: not found" in err
    (tmp_path / "bad.json").write_text('{"streaming": ')
    args = ["nab", "--data", str(data), "--labels", str(labels), "--settings"]
    rc, err = _eval([*args, str(tmp_path / "bad.json")], capsys)
    assert rc == 2 and "bad.json: not JSON" in err
    (tmp_path / "bad.json").write_text('{"streaming": {}}')
    rc, err = _eval([*args, str(tmp_path / "bad.json")], capsys)
    assert rc == 2 and "no nab, skab section" in err
    csv_path = data / "cat" / "a.csv"
    csv_path.write_text(csv_path.read_text().replace("timestamp,value", "time,value", 1))
    rc, err = _eval(["nab", "--data", str(data), "--labels", str(labels)], capsys)
    assert rc == 2 and "no 'timestamp' column (header: time, value)" in err


def test_nab_reads_iso_times_and_reports_unlabelled_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from millstream_cloud.detection.eval import nab

    data, labels = _tiny_nab(tmp_path)
    plain = nab.read_series(data / "cat" / "a.csv")
    csv_path = data / "cat" / "a.csv"
    text = csv_path.read_text()
    csv_path.write_text(text.replace(" ", "T"))
    assert nab.read_series(csv_path)[0] == plain[0]
    csv_path.write_text(text.replace(":00,", ":00+02:00,").replace(" ", "T"))
    shifted = nab.read_series(csv_path)[0]
    assert [a - b for a, b in zip(plain[0], shifted, strict=True)] == [timedelta(hours=2)] * 400
    csv_path.write_text(text)
    (data / "cat" / "stray.csv").write_text("timestamp,value\n")
    out = tmp_path / "nab.json"
    rc, err = _eval(
        ["nab", "--data", str(data), "--labels", str(labels), "--json", str(out)], capsys
    )
    assert rc == 0
    assert "1 CSV file(s) not in combined_windows.json, not scored: cat/stray.csv" in err
    assert json.loads(out.read_text())["unlisted_files"] == ["cat/stray.csv"]


def test_skab_ragged_or_non_numeric_row_is_refused_with_its_line(
    bench_root: Path, tmp_path: Path
) -> None:
    from millstream_cloud.detection.eval import EvalInputError

    src = bench_root / "skab" / "data" / "valve1" / "0.csv"
    (tmp_path / "v").mkdir()
    lines = src.read_text().splitlines()
    fields = lines[11].split(";")
    lines[11] = ";".join(fields[:3] + fields[4:])
    (tmp_path / "v" / "0.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(EvalInputError, match=r"0\.csv line 12: 10 fields, the header has 11"):
        skab.load_runs(tmp_path)
    fields[2] = "n/a"
    lines[11] = ";".join(fields)
    (tmp_path / "v" / "0.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(EvalInputError, match=r"line 12: Accelerometer2RMS 'n/a' is not a number"):
        skab.load_runs(tmp_path)
    # The changepoint score places windows by time: a row without one names its line.
    fields = lines[11].split(";")
    fields[2], fields[0] = "0.04", "yesterday"
    lines[11] = ";".join(fields)
    (tmp_path / "v" / "0.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(EvalInputError, match=r"line 12: datetime 'yesterday' is not a time"):
        skab.load_runs(tmp_path)


def test_sim_cli_takes_the_reading_interval_and_fleet_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sim.json"
    args = ["sim", "--seed", "4", "--devices", "1", "--hours", "17", "--step-s", "5"]
    rc, _ = _eval([*args, "--json", str(out)], capsys)
    assert rc == 0
    data = json.loads(out.read_text())
    assert (data["step_s"], data["hours"], data["devices"]) == (5.0, 17.0, 1)
    assert data["readings"] == 17 * 720 * 4 and len(data["faults"]) == 1
    rc, err = _eval(["sim", "--hours", "10"], capsys)
    assert rc == 2 and "--hours 10: at least 17" in err
    rc, err = _eval(["sim", "--step-s", "0"], capsys)
    assert rc == 2 and "--step-s 0: from 0.1" in err and "--devices" not in err
    rc, err = _eval(["sim", "--devices", "0"], capsys)
    assert rc == 2 and "--devices 0: at least 1" in err and "--step-s" not in err


def test_the_simulators_curves_bend_the_metrics_and_keep_the_draws(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--curves``: a pump's pressure follows the square of its load, its current the
    cube (the affinity laws); the random draws are the linear fleet's, so the two are
    compared fault for fault."""
    from millstream_cloud.detection.eval import sim

    cfg = {"seed": 5, "devices": 2, "hours": 24.0, "faults": ("level_shift",)}
    line, curve = (sim.simulate(sim.SimConfig(**cfg, curves=c)) for c in (False, True))
    assert line.faults == curve.faults
    flow = line.series[("pump-01", "flow_l_min")]
    assert np.array_equal(flow, curve.series[("pump-01", "flow_l_min")])

    for metric in ("pressure_bar", "motor_current_a"):
        bent, straight = curve.series[("pump-01", metric)], line.series[("pump-01", metric)]
        # the flow's own noise aside, a line fits the linear pump; a cubic, the curved one
        assert _misfit(flow, bent) > 3 * _misfit(flow, straight)
        assert _misfit(flow, bent) > 2 * _misfit(flow, bent, 3)
    out = tmp_path / "sim.json"
    rc, _ = _eval(
        ["sim", "--devices", "1", "--hours", "17", "--curves", "--json", str(out)], capsys
    )
    assert rc == 0 and json.loads(out.read_text())["curves"] is True


def test_a_stopped_machine_on_curves_keeps_the_draws_and_stops_alike() -> None:
    """``stopped(curves=True)`` (``bench/detection_restart.py --curves``): the pump's
    pressure on the square of its load, the same draws, and the same stop (about zero)."""
    from millstream_cloud.detection.eval import sim

    def series(curves: bool) -> dict[str, np.ndarray]:
        batches = sim.stopped("pump", "motor_current_a", 0.0, 2, 0, 30.0, curves=curves)
        rows: dict[str, list[float]] = {}
        for batch in batches:
            for r in batch:
                rows.setdefault(r.metric, []).append(r.value)
        return {m: np.array(v) for m, v in rows.items()}

    line, curve = series(False), series(True)
    assert np.array_equal(line["flow_l_min"], curve["flow_l_min"])
    stop = slice(20 * 360 + 30, 22 * 360)  # the stop, after the load's own lag
    sigma = sim.KINDS["pump"]["pressure_bar"][2]
    assert np.abs(curve["pressure_bar"][stop]).max() < 5 * sigma
    run = slice(0, 20 * 360)
    flow = line["flow_l_min"][run]
    bent, straight = curve["pressure_bar"][run], line["pressure_bar"][run]
    assert _misfit(flow, bent) > 1.5 * _misfit(flow, straight)  # 1.9: a daily wave of +-0.2 load


def _misfit(x: np.ndarray, y: np.ndarray, degree: int = 1) -> float:
    """The spread of ``y`` around a polynomial of ``x`` (a line by default) fitted to it."""
    return float(np.std(y - np.polyval(np.polyfit(x, y, degree), x)))


def _one_window(pred_rows: list[int], cp_row: int = 100, n: int = 200) -> skab.ChangepointScore:
    """One run of ``n`` rows a second, a true changepoint at ``cp_row``, predictions on at
    ``pred_rows``."""
    seconds = np.arange(n, dtype=float)
    truth = np.zeros(n, dtype=np.int8)
    truth[cp_row] = 1
    pred = np.zeros(n, dtype=np.int8)
    pred[pred_rows] = 1
    return skab.score_changepoints([(seconds, truth, pred)])


def test_skab_changepoints_are_the_predictions_switches_scored_in_60_s_windows() -> None:
    assert skab.predicted_changepoints(np.array([1, 1, 0, 0, 1])).tolist() == [1, 0, 1, 0, 1]
    assert not skab.predicted_changepoints(np.array([0, 0, 0])).any()
    # A window of 60 s right of each changepoint; an overlapping later one starts later.
    wins = skab.changepoint_windows(np.arange(100.0), np.isin(np.arange(100), [0, 30]))
    assert wins == [(0.0, 60.0), (60.0, 90.0)]
    # On at the changepoint (and on to the end): the perfect score.
    perfect = _one_window(list(range(100, 200)))
    assert (perfect.standard, perfect.low_fp, perfect.low_fn) == (100.0, 100.0, 100.0)
    assert (perfect.missed_cps, perfect.fps, perfect.windows) == (0, 0, 1)
    # Nothing predicted: the null detector's 0; only the first switch in a window counts,
    # and a later one there (the alarm clearing) is no false positive.
    assert _one_window([]).standard == 0.0 and _one_window([]).missed_cps == 1
    assert _one_window(list(range(100, 130))).as_dict() == perfect.as_dict()
    # Halfway through the window: A_FP + (A_TP - A_FP)/2 (1 - tanh(x)/tanh(pi/2)), x ~ 0.
    half = _one_window([130])
    reward = -0.11 + 1.11 / 2 * (1 - math.tanh(math.pi * (30 / 60 - 0.5)) / math.tanh(math.pi / 2))
    assert half.standard == pytest.approx(100 * (reward + 1) / 2, abs=0.2)
    assert 0.0 < half.standard < perfect.standard
    # A blip at row 10 switches on and off outside every window: two false positives, a
    # flat A_FP each (0.11, 0.22 with low FP; a missed window costs 2 with low FN).
    blip = _one_window([10, *range(100, 200)])
    assert blip.fps == 2
    assert (blip.standard, blip.low_fp) == (89.0, 78.0)
    assert blip.low_fn == round(100 * (1 - 0.22 + 2) / 3, 2)


def test_skab_changepoint_score_is_reported_and_needs_the_labelled_columns(
    bench_root: Path, tmp_path: Path
) -> None:
    res = runners.run_skab(bench_root / "skab" / "data", runners.load_frozen())
    cp = res["changepoint"]
    assert cp["windows"] == 79  # the subset's 79 changepoints after the training rows
    assert set(cp) == {"standard", "low_fp", "low_fn", "missed_cps", "fps", "windows"}
    # A copy without the changepoint and datetime columns still scores F1/FAR/MAR.
    src = bench_root / "skab" / "data" / "valve1" / "0.csv"
    lines = src.read_text().splitlines()
    (tmp_path / "v").mkdir()
    trimmed = [";".join(ln.split(";")[1:-1]) for ln in lines]
    (tmp_path / "v" / "0.csv").write_text("\n".join(trimmed) + "\n")
    res = runners.run_skab(tmp_path, runners.load_frozen())
    assert res["changepoint"] is None and res["f1"] > 0
