"""Run an experiment grid: every arm × seed, evaluated at fixed points, resumable, optionally in parallel.

Each run trains in a subprocess of ``python -m ddpm_curriculum.train`` (the exact code ``train_curriculum.py``
runs) and stops at every evaluation point with ``--stop-at-step``; the checkpoint written there is scored by
``evaluate.py`` and one line per (arm, seed, step) is appended to ``results.jsonl``. Because training resumes
exactly, stopping at evaluation points changes nothing in the trained weights. A second invocation skips every
point already in ``results.jsonl`` and resumes unfinished runs from their latest checkpoint, so an interrupted
grid continues where it stopped. Output layout::

    OUT/results.jsonl          one JSON line per evaluated (arm, seed, step)
    OUT/report.md              mean ± std over seeds, paired differences to the baseline arm, plots
    OUT/<arm>/seed<S>/         the training run directory (config.json, metrics.jsonl, checkpoints/)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from ..atomic import append_line
from ..config import read_jsonl
from ..errors import UserError
from ..training import builders
from ..training.checkpoint import checkpoint_name, latest_checkpoint
from .attribution import attribution_lines
from .endpoints import drawn_per_t_bin
from .evaluate import evaluate_checkpoint
from .grid import GridEvalConfig, RunSpec, baseline_arm, eval_settings, expand_runs, load_grid
from .report import write_report

# The folder holding this ddpm_curriculum (a checkout or site-packages): on the child's path, so that
# ``-m ddpm_curriculum.train`` runs this same code from any working directory, installed or not.
PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])


def steps_per_epoch(cfg) -> int:
    return len(builders.make_dataset(cfg)) // cfg.train.batch_size


def read_results(path: Path) -> list[dict]:
    return read_jsonl(path)


def _train_until(run: RunSpec, run_dir: Path, step: int, threads: int) -> None:
    """Train ``run`` (resuming if it has a checkpoint) and stop with a checkpoint at ``step``."""
    total = run.eval_steps[-1]
    if latest_checkpoint(run_dir) is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg_path = run_dir / "grid_config.json"
        cfg_path.write_text(json.dumps(run.config.to_dict(), indent=2))
        args = ["--config-path", str(cfg_path)]
    else:
        args = ["--resume"]
    args += ["--run-dir", str(run_dir), "--device", "cpu", "--no-progress"]
    if step < total:
        args += ["--stop-at-step", str(step)]
    path = os.pathsep.join(p for p in (PACKAGE_PARENT, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=path)
    res = subprocess.run([sys.executable, "-m", "ddpm_curriculum.train", *args], capture_output=True, text=True,
                         env=env)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise RuntimeError(f"training {run.key} to step {step} failed (exit {res.returncode}): {last}")


def append_record(path: Path, rec: dict) -> None:
    """Append one record to ``results.jsonl`` (several grid jobs append at once)."""
    append_line(path, json.dumps(rec))


def execute_run(run: RunSpec, run_dir: Path, settings: GridEvalConfig, done_steps: set[int],
                threads: int, results_path: Path | None = None) -> list[dict]:
    """Train and evaluate one run at its missing evaluation points; returns one record per new point, each
    appended to ``results_path`` as soon as it exists (a grid stopped mid-run keeps its finished points)."""
    import torch

    torch.set_num_threads(threads)
    records = []
    batch = run.config.train.batch_size
    for step in run.eval_steps:
        if step in done_steps:
            continue
        ckpt = run_dir / "checkpoints" / checkpoint_name(step)
        start = time.perf_counter()
        if not ckpt.is_file():
            _train_until(run, run_dir, step, threads)
        train_sec = time.perf_counter() - start
        rec = {"arm": run.arm, "seed": run.seed, "step": step, "kimg": step * batch / 1000,
               "final": step == run.eval_steps[-1], "train_sec": round(train_sec, 2)}
        counts = drawn_per_t_bin(run_dir / "metrics.jsonl", step)
        if counts is not None:
            rec["drawn_per_t_bin"] = counts  # exposure: training samples per bin of t so far
        rec.update(evaluate_checkpoint(ckpt, settings))
        if results_path is not None:
            append_record(results_path, rec)
        records.append(rec)
    return records


def _job(run, run_dir, settings, done, threads, results_path):
    """Process-pool entry: a failed run becomes a record instead of killing the grid."""
    try:
        return execute_run(run, run_dir, settings, done, threads, results_path)
    except (RuntimeError, UserError) as exc:
        rec = {"arm": run.arm, "seed": run.seed, "error": str(exc)}
        append_record(results_path, rec)
        return [rec]


def run_grid(grid_path: str | Path, out_dir: str | Path, quick: bool = False, jobs: int = 1,
             threads: int | None = None, log=print, command: str | None = None) -> list[dict]:
    """Run (or continue) the grid; append to ``results.jsonl``; return all records."""
    grid = load_grid(grid_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / "results.jsonl"
    settings = eval_settings(grid, quick)
    runs = expand_runs(grid, quick, steps_per_epoch)
    done: dict[tuple, set[int]] = {}
    for rec in read_results(results_path):
        if "error" not in rec:
            done.setdefault((rec["arm"], rec["seed"]), set()).add(rec["step"])
    pending = [r for r in runs if set(r.eval_steps) - done.get((r.arm, r.seed), set())]
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    log(f"grid {grid_path}: {len(runs)} runs ({len(runs) - len(pending)} already done), "
        f"{jobs} job(s) × {threads} thread(s), output {out_dir}")
    started = time.perf_counter()

    def handle(records):  # already in results.jsonl (execute_run appends each point as it is scored)
        for rec in records:
            log(_describe(rec, time.perf_counter() - started))

    args = [(r, out_dir / r.arm / f"seed{r.seed}", settings, done.get((r.arm, r.seed), set()), threads,
             results_path) for r in pending]
    if jobs == 1:
        for a in args:
            handle(_job(*a))
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
            for fut in as_completed([pool.submit(_job, *a) for a in args]):
                handle(fut.result())
    records = read_results(results_path)
    write_report(records, grid, baseline_arm(grid), out_dir, quick=quick, command=command,
                 extra=attribution_lines(read_jsonl(out_dir / "attribution.jsonl"), out_dir / "plots"))
    return records


def _describe(rec: dict, elapsed: float) -> str:
    if "error" in rec:
        return f"[{elapsed:6.0f}s] {rec['arm']}/seed{rec['seed']}: FAILED: {rec['error']}"
    keys = [k for k in ("val_loss", "val_loss_low_t", "minor_present", "major_present") if k in rec]
    shown = ", ".join(f"{k}={rec[k]:.4g}" for k in keys)
    return (f"[{elapsed:6.0f}s] {rec['arm']}/seed{rec['seed']} step {rec['step']}: {shown} "
            f"(train {rec['train_sec']:.0f}s, eval {rec['eval_sec']:.0f}s)")
