from __future__ import annotations

import json
import shutil
from pathlib import Path

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
    bench_root: Path, tmp_path: Path
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
    out = tmp_path / "out.json"
    assert cli.main(["eval", "skab", "--data", str(tmp_path), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {"f1", "far", "mar"} <= set(data)


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
