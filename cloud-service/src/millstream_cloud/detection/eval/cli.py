"""``millstream-cloud eval {nab,skab,sim}``: score the frozen detectors on a benchmark."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import EvalInputError, runners


def _bench_default(*parts: str) -> Path | None:
    """``<repo>/../shared/benchmarks/...`` when it exists (the layout of our CI)."""
    here = Path(__file__).resolve()
    candidates = [Path.cwd() / ".." / "shared" / "benchmarks"]
    if len(here.parents) > 5:
        candidates.insert(0, here.parents[5] / ".." / "shared" / "benchmarks")
    for base in candidates:
        p = base.joinpath(*parts)
        if p.is_dir():
            return p.resolve()
    return None


def _write_json(path: str | None, data: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        print(f"wrote {path}")


def _require_dir(value: Path | None, flag: str) -> Path:
    if value is None:
        raise SystemExit(
            f"eval: {flag} is required (no ../shared/benchmarks found beside the repo)"
        )
    if not value.is_dir():
        raise SystemExit(f"eval: {flag} {value} is not a directory")
    return value


def _not_scored(name: str, why: str, files: list[str]) -> None:
    """Say which CSV files in the folder were left out, so a score over fewer files than
    the folder holds is not taken for the whole folder's."""
    if files:
        print(
            f"eval {name}: {len(files)} CSV file(s) {why}, not scored: "
            + ", ".join(files[:5])
            + (" ..." if len(files) > 5 else ""),
            file=sys.stderr,
        )


def cmd_nab(args: argparse.Namespace) -> int:
    settings = runners.load_frozen(args.settings)
    data = _require_dir(args.data, "--data")
    labels = _require_dir(args.labels, "--labels")
    out = runners.run_nab(data, labels, settings, sweep=args.sweep)
    _not_scored("nab", "not in combined_windows.json", out["unlisted_files"])
    mode = (
        "thresholds SWEPT on these files (NAB's optimiser; not the frozen ones)"
        if args.sweep
        else "frozen thresholds from the settings file (no re-tuning)"
    )
    print(f"NAB: {out['files']} files, {out['windows']} windows, {mode}, {out['seconds']} s")
    print(f"{'detector':<34}{'standard':>10}{'low FP':>10}{'low FN':>10}")
    print(
        f"{'Millstream ensemble (this run)':<34}{out['standard']:>10.1f}"
        f"{out['low_fp']:>10.1f}{out['low_fn']:>10.1f}"
    )
    print("published, on the 18-file subset:")
    for name, (a, b, c) in runners.NAB_REFERENCE_SUBSET.items():
        print(f"  {name:<32}{a:>10.1f}{b:>10.1f}{c:>10.1f}")
    print("published, full 58-file corpus (not comparable with a subset):")
    for name, (a, b, c) in runners.NAB_REFERENCE_CORPUS.items():
        print(f"  {name:<32}{a:>10.1f}{b:>10.1f}{c:>10.1f}")
    print("thresholds used:", ", ".join(f"{k}={v:.4g}" for k, v in out["thresholds"].items()))
    _write_json(args.json, out)
    return 0


def cmd_skab(args: argparse.Namespace) -> int:
    settings = runners.load_frozen(args.settings)
    data = _require_dir(args.data, "--data")
    out = runners.run_skab(data, settings)
    _not_scored("skab", "without an 'anomaly' column (or unreadable)", out["unlisted_files"])
    print(
        f"SKAB: {out['runs']} runs, first {settings['skab']['train_rows']} rows of each for "
        f"training, pooled over the rest; {out['seconds']} s"
    )
    print(f"{'detector':<34}{'F1':>8}{'FAR %':>9}{'MAR %':>9}")
    name = "Millstream PCA T2/Q (this run)"
    print(f"{name:<34}{out['f1']:>8.2f}{out['far']:>9.2f}{out['mar']:>9.2f}")
    print("published, valve1 + valve2 subset:")
    for name, (f1, far, mar) in runners.SKAB_REFERENCE_SUBSET.items():
        print(f"  {name:<32}{f1:>8.2f}{far:>9.2f}{mar:>9.2f}")
    cp = out["changepoint"]
    if cp is not None:
        print(
            f"changepoints (SKAB's NAB-style score, {cp['windows']} windows of 60 s; the "
            "predictions above, each switch on or off a changepoint):"
        )
        print(f"{'detector':<34}{'std':>8}{'low FP':>8}{'low FN':>8}{'missed':>8}{'FPs':>6}")
        cells = (cp["standard"], cp["low_fp"], cp["low_fn"], cp["missed_cps"], cp["fps"])
        _changepoint_row("Millstream PCA T2/Q (this run)", cells)
        print("published, valve1 + valve2 subset (their prediction files, rescored):")
        for name, row in runners.SKAB_CHANGEPOINT["valve"].items():
            _changepoint_row(f"  {name}", row)
    print(
        "channels left to the per-metric detectors (slow in training):",
        ", ".join(out["slow_channels_excluded"]) or "none",
    )
    _write_json(args.json, out)
    return 0


def _changepoint_row(name: str, row: tuple[float, float, float, int, int]) -> None:
    std, low_fp, low_fn, missed, fps = row
    print(f"{name:<34}{std:>8.2f}{low_fp:>8.2f}{low_fn:>8.2f}{missed:>8d}{fps:>6d}")


def cmd_sim(args: argparse.Namespace) -> int:
    from .sim import SimConfig, least_hours

    settings = runners.load_frozen(args.settings)
    cfg = SimConfig(
        seed=args.seed,
        devices=args.devices,
        hours=args.hours,
        step_s=args.step_s,
        curves=args.curves,
    )
    # Faults start after the model's learning time and must end, with an hour to spare.
    least_h = least_hours(cfg.fault_after_h)
    if args.hours < least_h:
        raise EvalInputError(
            f"--hours {args.hours:g}: at least {least_h:g} (faults start after "
            f"{cfg.fault_after_h:g} h of normal running and last up to 2 h)"
        )
    if not 0.1 <= args.step_s <= 3600:
        raise EvalInputError(f"--step-s {args.step_s:g}: from 0.1 to 3600 seconds")
    if args.devices < 1:
        raise EvalInputError(f"--devices {args.devices}: at least 1")
    out = runners.run_sim(settings, seed=args.seed, config=cfg)
    out.update(step_s=cfg.step_s, hours=cfg.hours, devices=cfg.devices, curves=cfg.curves)
    shape = ", metrics on curves of the load" if cfg.curves else ""
    print(
        f"simulator (seed {out['seed']}, {cfg.devices} devices read every {cfg.step_s:g} s "
        f"for {cfg.hours:g} h{shape}): {out['readings']} readings, "
        f"{len(out['faults'])} faults, {out['anomalies']} anomalies, {out['seconds']} s"
    )
    print(
        f"recall {out['recall']:.2f}  precision {out['precision']:.2f}  "
        f"median delay {out['median_delay_s']} s  ({out['us_per_reading']} us/reading)"
    )
    for f in out["faults"]:
        status = f"after {f['delay_s']:.0f} s" if f["detected"] else "MISSED"
        print(f"  {f['device']:<10} {f['kind']:<12} {f['metric']:<16} {status}")
    _write_json(args.json, out)
    return 0


def _reporting(
    name: str, cmd: Callable[[argparse.Namespace], int]
) -> Callable[[argparse.Namespace], int]:
    """``cmd`` with unreadable inputs reported in one line (exit 2) instead of a traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return cmd(args)
        except (EvalInputError, OSError) as exc:
            print(f"eval {name}: {exc}", file=sys.stderr)
            return 2

    return run


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``eval`` and its sub-commands on the top-level CLI."""
    p = sub.add_parser(
        "eval", help="score the detectors on NAB, SKAB or the fault simulator", description=__doc__
    )
    esub = p.add_subparsers(dest="eval_command", metavar="BENCHMARK")
    esub.required = True

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--settings",
            type=Path,
            default=None,
            help="settings file (default: the committed frozen.json)",
        )
        sp.add_argument("--json", metavar="PATH", help="also write the scores to PATH")

    nab = esub.add_parser("nab", help="Numenta Anomaly Benchmark, scored by NAB's rules")
    nab.add_argument(
        "--data",
        type=Path,
        default=_bench_default("nab", "data"),
        help="folder of NAB data CSVs (category/file.csv)",
    )
    nab.add_argument(
        "--labels",
        type=Path,
        default=_bench_default("nab", "labels"),
        help="folder holding combined_windows.json",
    )
    nab.add_argument(
        "--sweep",
        action="store_true",
        help="sweep each profile's threshold on these files instead of the frozen ones",
    )
    common(nab)
    nab.set_defaults(func=_reporting("nab", cmd_nab))

    skab = esub.add_parser("skab", help="Skoltech Anomaly Benchmark, pooled F1/FAR/MAR")
    skab.add_argument(
        "--data",
        type=Path,
        default=_bench_default("skab", "data"),
        help="folder of SKAB runs (any depth; unlabelled files are skipped)",
    )
    common(skab)
    skab.set_defaults(func=_reporting("skab", cmd_skab))

    sim = esub.add_parser("sim", help="the built-in fault simulator")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument(
        "--step-s",
        type=float,
        default=10.0,
        help="seconds between readings (the agent's default interval is 1)",
    )
    sim.add_argument("--hours", type=float, default=36.0, help="hours simulated (at least 17)")
    sim.add_argument(
        "--devices", type=int, default=12, help="devices (the first 10 get a fault each)"
    )
    sim.add_argument(
        "--curves",
        action="store_true",
        help="metrics follow powers of the load (a pump's pressure and power by the "
        "affinity laws) instead of straight lines",
    )
    common(sim)
    sim.set_defaults(func=_reporting("sim", cmd_sim))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="millstream-cloud")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
