"""Command line of ``scripts/run_experiments.py``."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from ..atomic import atomic_write
from ..config import read_jsonl
from ..errors import UserError
from .attribution import attribute_grid, attribution_lines
from .evaluate import real_image_floor
from .grid import baseline_arm, eval_settings, expand_runs, load_grid
from .report import floor_lines, write_report
from .runner import read_results, run_grid


def write_floor(grid, out_dir: Path, quick: bool = False) -> Path:
    """``floor.json``: ``evaluate.real_image_floor`` for the baseline arm's dataset under the grid's eval settings."""
    base = baseline_arm(grid)
    cfg = next(r.config for r in expand_runs(grid, quick, steps_per_epoch=lambda c: 1) if r.arm == base)
    floor = {"arm": base, **real_image_floor(cfg, eval_settings(grid, quick))}
    path = out_dir / "floor.json"
    atomic_write(path, lambda f: f.write(json.dumps(floor, indent=2).encode()))
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Run an experiment grid (arms × seeds at equal budget) and "
                                            "write results.jsonl and report.md.")
    p.add_argument("grid", help="grid JSON, e.g. configs/experiments/twoscale_modes.json")
    p.add_argument("--out", help="output directory (default runs/experiments/<grid name>[-quick])")
    p.add_argument("--quick", action="store_true", help="the grid's quick settings: minutes instead of an hour")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (each gets cores/jobs threads)")
    p.add_argument("--threads", type=int, help="torch threads per job (default cores/jobs)")
    p.add_argument("--report-only", action="store_true", help="rewrite report.md from results.jsonl")
    p.add_argument("--floor", action="store_true",
                   help="score held-out real images as if they were samples (floor.json: what a perfect generator "
                        "scores with the grid's sample count and reference), then rewrite report.md")
    p.add_argument("--attribute", action="store_true",
                   help="attribute the finished runs' final networks to channel groups (attribution.jsonl; "
                        "each run once), then rewrite report.md; needs the run folders' final checkpoints")
    args = p.parse_args(argv)
    if args.jobs < 1:
        raise UserError(f"--jobs {args.jobs} must be at least 1")
    out = Path(args.out or Path("runs/experiments") / (Path(args.grid).stem + ("-quick" if args.quick else "")))
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    if args.report_only or args.attribute or args.floor:
        grid = load_grid(args.grid)
        records = read_results(out / "results.jsonl")
        if not records:
            raise UserError(f"no results in {out / 'results.jsonl'}; run the grid first")
        attributed = (attribute_grid(grid, out, records, quick=args.quick) if args.attribute
                      else read_jsonl(out / "attribution.jsonl"))
        if args.floor:
            write_floor(grid, out, quick=args.quick)
        extra = floor_lines(out / "floor.json") + attribution_lines(attributed, out / "plots")
        print(write_report(records, grid, baseline_arm(grid), out, quick=args.quick, command=command, extra=extra))
        return 0
    run_grid(args.grid, out, quick=args.quick, jobs=args.jobs, threads=args.threads, command=command)
    print(f"report: {out / 'report.md'}")
    return 0
