from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from millstream_cloud.detection.eval import nab


@pytest.fixture(scope="module")
def corpus(bench_root: Path) -> tuple[list[nab.NabFile], list[np.ndarray]]:
    files = nab.load_corpus(bench_root / "nab" / "data", bench_root / "nab" / "labels")
    return files, nab.published_scores(bench_root / "nab" / "results", "ARTime", files)


def test_artime_corpus_thresholds_reproduce_reference_row(bench_root: Path, corpus) -> None:
    files, scores = corpus
    cfg = json.loads((bench_root / "nab" / "config" / "thresholds.json").read_text())["ARTime"]
    res = nab.score_corpus(files, scores, {k: v["threshold"] for k, v in cfg.items()})
    got = [round(res[p].normalised, 1) for p in nab.PROFILES]
    assert got == [65.2, 53.7, 71.5]


def test_a_corpus_raw_score_is_the_sum_of_its_files_at_a_fixed_threshold(corpus) -> None:
    # What bench/detection_nab_unseen.py's bootstrap over files rests on.
    files, scores = corpus
    thresholds = {p: 0.6 for p in nab.PROFILES}
    whole = nab.score_corpus(files, scores, thresholds)
    each = [nab.score_corpus([f], [s], thresholds) for f, s in zip(files, scores, strict=True)]
    windows = sum(len(f.windows) for f in files)
    for p, prof in nab.PROFILES.items():
        raw = sum(r[p].raw for r in each)
        assert raw == pytest.approx(whole[p].raw)
        assert nab.normalise(raw, windows, prof) == pytest.approx(whole[p].normalised)


def test_artime_reoptimised_thresholds_reproduce_reference_row(corpus) -> None:
    files, scores = corpus
    res = nab.score_corpus(files, scores)
    assert [round(res[p].normalised, 1) for p in nab.PROFILES] == [67.1, 58.1, 72.7]


def test_profiles_match_published_config(bench_root: Path) -> None:
    cfg = json.loads((bench_root / "nab" / "config" / "profiles.json").read_text())
    for name, prof in nab.PROFILES.items():
        cm = cfg[name]["CostMatrix"]
        assert (prof["tp"], prof["fp"], prof["fn"]) == (
            cm["tpWeight"],
            cm["fpWeight"],
            cm["fnWeight"],
        )


def _toy(n: int = 1000) -> nab.NabFile:
    t0 = datetime(2020, 1, 1)
    ts = [t0 + timedelta(minutes=5 * i) for i in range(n)]
    return nab.NabFile("toy/x.csv", ts, np.zeros(n), [(ts[500], ts[599])])


def test_null_and_perfect_detectors_normalise_to_0_and_100() -> None:
    f = _toy()
    null = nab.score_corpus([f], [np.zeros(1000)], {p: 0.5 for p in nab.PROFILES})
    assert all(r.normalised == pytest.approx(0.0) for r in null.values())
    perfect = np.zeros(1000)
    perfect[500] = 1.0
    res = nab.score_corpus([f], [perfect], {p: 0.5 for p in nab.PROFILES})
    assert all(r.normalised == pytest.approx(100.0) for r in res.values())


def test_probation_rows_are_ignored_and_late_fp_costs_full_weight() -> None:
    f = _toy()
    s = np.zeros(1000)
    s[10] = 1.0  # inside probation (150 rows): free
    res = nab.score_corpus([f], [s], {p: 0.5 for p in nab.PROFILES})
    assert res["standard"].raw == pytest.approx(-1.0)
    s[200] = 1.0  # before the first window: full A_FP
    res = nab.score_corpus([f], [s], {p: 0.5 for p in nab.PROFILES})
    assert res["standard"].raw == pytest.approx(-1.11)
    assert nab.probation_length(100_000) == 750


def test_sweep_never_worse_than_a_fixed_threshold() -> None:
    f = _toy()
    rng = np.random.default_rng(0)
    s = rng.random(1000)
    swept = nab.score_corpus([f], [s])
    fixed = nab.score_corpus([f], [s], {p: 0.9 for p in nab.PROFILES})
    for p in nab.PROFILES:
        assert swept[p].raw >= fixed[p].raw - 1e-12
