"""The command line: `python -m benchmarks.bench_pareto ...` or `python benchmarks/bench_pareto ...` (see the package
docstring). Each phase runs in a subprocess of its own, this folder run again with `--phase <name>`."""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a path: import the package from the repo root, not this folder's files as modules
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import subprocess  # noqa: E402

import benchmarks.bench_pareto as package  # noqa: E402
from benchmarks._paths import resolve_cache_dir  # noqa: E402
from benchmarks.bench_pareto.measure import log  # noqa: E402
from benchmarks.bench_pareto.palette import parse_stitches  # noqa: E402
from benchmarks.bench_pareto.settings import ANCHORS, DEFAULT_PHASES, PHASES, SETTINGS, Run, sources  # noqa: E402

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_pareto", description=package.__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="reduced")
    parser.add_argument("--anchors", choices=sorted(ANCHORS), default=None, help="overrides the setting's anchors")
    parser.add_argument("--cache-dir", default=None, help="where prepare_anchors/prepare_data wrote their outputs")
    parser.add_argument("--out", default="docs/results", help="folder for JSON, PNG and markdown results")
    parser.add_argument(
        "--stitches", default=None, help="hybrids as 'n:j,n:j' (anchors always added), 'all', or default 'auto'"
    )
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per method (overrides the setting)")
    parser.add_argument("--device", default=None, help="cpu or cuda (overrides the setting)")
    parser.add_argument("--snnet-optimizer", choices=["adamw", "adafactor-fused"], default=None)
    parser.add_argument(
        "--phases", default=",".join(DEFAULT_PHASES), help=f"comma-separated subset of {','.join(PHASES)}"
    )
    parser.add_argument(
        "--no-map-first-token", action="store_true", help="plain least-squares stitches (no first-token mapping)"
    )
    parser.add_argument("--force", action="store_true", help="rerun phases whose results exist")
    parser.add_argument("--work-dir", default=None, help="scratch (stitching layers, trainer output)")
    parser.add_argument("--phase", default=None, help=argparse.SUPPRESS)  # internal: run one phase in-process
    return parser.parse_args(argv)


def make_run(args: argparse.Namespace) -> Run:
    """The setting with the command line's overrides (`dataclasses.replace`), its inputs and output folders."""
    overrides: dict = {"map_first_token": not args.no_map_first_token}
    if args.steps is not None:
        overrides["steps"] = args.steps
    if args.device is not None:
        overrides["device"] = args.device
        if args.device == "cpu":
            overrides["amp_bf16"] = False
    if args.snnet_optimizer is not None:
        overrides["snnet_optimizer"] = args.snnet_optimizer
    if args.anchors is not None:
        overrides["anchors"] = args.anchors
    stitches = parse_stitches(args.stitches)
    if stitches == []:  # "all": the default palette
        overrides["num_hybrids"], stitches = None, None
    setting = dataclasses.replace(SETTINGS[args.setting], **overrides)
    cache = resolve_cache_dir(args.cache_dir)
    return Run(
        setting=setting,
        cache=cache,
        sources=sources(setting, cache),
        stitches=stitches,
        work=Path(args.work_dir) if args.work_dir else cache / "bench_pareto" / args.setting,
        raw=Path(args.out) / "raw" / args.setting,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run = make_run(args)
    if args.phase is not None:
        from benchmarks.bench_pareto.phases import run_phase

        run_phase(run, args.phase)
        return

    missing = run.sources.missing()
    if missing:
        raise SystemExit(f"Missing {missing}: run benchmarks/prepare_anchors.py and benchmarks/prepare_data.py first.")
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(phases) - set(PHASES)
    if unknown:
        raise SystemExit(f"Unknown phases {sorted(unknown)}: choose among {', '.join(PHASES)}.")
    for phase in phases:
        if phase == "report":
            continue
        if (run.raw / f"{phase}.json").exists() and not args.force:
            log(f"{phase}: results exist, skipped (--force reruns)")
            continue
        if phase != "init" and not (run.raw / "init.json").exists():
            raise SystemExit("Run the init phase first: the methods start from its stitching layers.")
        log(f"running phase {phase}")
        passthrough = _strip_phases(argv if argv is not None else sys.argv[1:])
        subprocess.run([sys.executable, str(HERE), *passthrough, "--phase", phase], check=True)
    if "report" in phases:
        from benchmarks.bench_pareto.report import build_report

        out = Path(args.out)
        build_report(out, sorted(d.name for d in (out / "raw").iterdir() if d.is_dir()))


def _strip_phases(argv: list[str]) -> list[str]:
    """The command line without `--phases X` / `--phases=X` / `--force` (the parent handles those)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--phases":
            skip = True
            continue
        if a.startswith("--phases=") or a == "--force":
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    main()
