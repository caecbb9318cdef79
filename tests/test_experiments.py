"""Experiment runner: grid parsing, statistics against scipy, end-to-end quick grid, resumability."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from ddpm_curriculum.errors import UserError
from ddpm_curriculum.experiments import expand_runs, load_grid, run_grid
from ddpm_curriculum.experiments import runner as runner_module
from ddpm_curriculum.experiments.report import compare, index, mean_std, paired_interval, verdict
from .helpers import ROOT, write_grid


def test_mean_std_and_paired_interval_match_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 0.3, 5), rng.normal(0.8, 0.3, 5)
    mean, sd = mean_std(list(a))
    assert mean == pytest.approx(a.mean()) and sd == pytest.approx(a.std(ddof=1))
    d_mean, half = paired_interval(list(a - b))
    ci = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert d_mean - half == pytest.approx(ci.low) and d_mean + half == pytest.approx(ci.high)
    assert paired_interval([0.3]) == (0.3, None)


@pytest.mark.parametrize("mean, half, direction, base, expected", [
    (0.1, 0.05, +1, None, "better"), (0.1, 0.05, -1, None, "worse"), (0.1, 0.2, +1, None,
                                                                       "no detectable difference"),
    (-5.0, 1.0, 0, 20.0, "better"),  # residual ratio 20 → 15: closer to the ideal 1
    (0.3, 0.1, 0, 0.9, "worse"),  # amplitude 0.9 → 1.2: further from 1
    (0.1, None, +1, None, "no detectable difference"),
])
def test_verdict(mean, half, direction, base, expected):
    assert verdict(mean, half, direction, base) == expected


def test_compare_pairs_by_seed_and_ignores_unpaired_seeds():
    recs = [{"arm": "b", "seed": s, "step": 10, "m": v} for s, v in [(0, 1.0), (1, 2.0), (2, 3.0)]]
    recs += [{"arm": "a", "seed": s, "step": 10, "m": v} for s, v in [(0, 1.5), (1, 2.4)]]
    mean, half, n = compare(index(recs), "a", "b", 10, "m")
    assert n == 2 and mean == pytest.approx(0.45)
    assert half == pytest.approx(stats.t.ppf(0.975, 1) * np.std([0.5, 0.4], ddof=1) / np.sqrt(2))


def test_runs_expand_with_overrides_in_order_and_eval_points(tmp_path):
    grid = load_grid(write_grid(tmp_path, set=["train.lr=0.002"],
                                arms=[{"name": "C", "set": ["train.lr=0.003"]}]))
    runs = expand_runs(grid, steps_per_epoch=lambda cfg: 8)
    assert [(r.arm, r.seed) for r in runs] == [("C", 0), ("C", 1)]
    assert runs[0].config.train.lr == 0.003 and runs[1].config.train.seed == 1
    assert runs[0].eval_steps == (3, 6) and runs[0].config.eval.num_samples == 0
    quick = expand_runs(grid, quick=True, steps_per_epoch=lambda cfg: 8)
    assert [r.seed for r in quick] == [3] and quick[0].eval_steps == (2, 4)


@pytest.mark.parametrize("change, fragment", [
    ({"arms": []}, "at least one arm"),
    ({"arms": [{"name": "a"}, {"name": "a"}]}, "unique"),
    ({"baseline_arm": "zzz"}, "baseline_arm 'zzz'"),
    ({"eval_at": [0.0]}, "fractions in (0, 1]"),
    ({"seedz": [1]}, "did you mean 'seeds'"),
    ({"eval": {"num_samples": 8, "fid_ref": "dataset", "fid_dims": 64}}, "more samples than feature dims"),
    ({"eval": {"num_samples": 99, "fid_ref": "nowhere/stats.npz", "fid_dims": 64}},
     "fid_ref nowhere/stats.npz not found"),
])
def test_bad_grids_are_one_line_errors(tmp_path, change, fragment):
    with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_grid(write_grid(tmp_path, **change))


@pytest.mark.slow
def test_grid_end_to_end_then_resumes_without_retraining(tmp_path, monkeypatch):
    grid_path, out = write_grid(tmp_path), tmp_path / "out"
    records = run_grid(grid_path, out, log=lambda *_: None)
    assert sorted((r["arm"], r["seed"], r["step"]) for r in records) == \
        [(a, s, st) for a in ("C", "baseline") for s in (0, 1) for st in (3, 6)]
    rec = records[-1]
    for key in ("val_loss", "val_loss_low_t", "val_loss_high_t", "minor_present", "residual_ratio", "kimg"):
        assert key in rec
    report = (out / "report.md").read_text()
    assert "| C (n=2) |" in report and "Differences to `baseline`" in report
    # same seed → same initial weights and data: the two arms differ only after the curriculum matters
    assert (out / "C" / "seed0" / "metrics.jsonl").is_file()
    # drop the final evaluations: a rerun re-scores the existing checkpoints and trains nothing
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(line for line in lines if '"final": true' not in line) + "\n")
    monkeypatch.setattr(runner_module, "_train_until", lambda *a: pytest.fail("retrained a finished run"))
    again = run_grid(grid_path, out, log=lambda *_: None)
    assert len(again) == 8
    finals = {(r["arm"], r["seed"]): r["val_loss"] for r in records if r["final"]}
    assert {(r["arm"], r["seed"]): r["val_loss"] for r in again if r["final"]} == finals


@pytest.mark.slow
def test_script_quick_mode_and_bad_grid(tmp_path):
    grid_path = write_grid(tmp_path, arms=[{"name": "C"}])
    res = subprocess.run([sys.executable, str(ROOT / "scripts/run_experiments.py"), str(grid_path), "--quick",
                          "--out", str(tmp_path / "q")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    recs = [json.loads(x) for x in (tmp_path / "q" / "results.jsonl").read_text().splitlines()]
    assert [(r["seed"], r["step"]) for r in recs] == [(3, 2), (3, 4)]
    assert "quick mode" in (tmp_path / "q" / "report.md").read_text()
    bad = subprocess.run([sys.executable, str(ROOT / "scripts/run_experiments.py"), str(tmp_path / "nope.json")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "grid file not found" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_repository_grid_quick_mode_runs_every_arm(tmp_path):
    """configs/experiments/twoscale_modes.json --quick: every arm trains, is scored and lands in the report."""
    grid = ROOT / "configs/experiments/twoscale_modes.json"
    res = subprocess.run([sys.executable, str(ROOT / "scripts/run_experiments.py"), str(grid), "--quick",
                          "--jobs", "2", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    recs = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    arms = [a["name"] for a in json.loads(grid.read_text())["arms"]]
    assert sorted(r["arm"] for r in recs) == sorted(arms) and not any("error" in r for r in recs)
    assert all(r["final"] and r["step"] == 100 for r in recs)
    report = (tmp_path / "report.md").read_text()
    assert all(f"| {a} (n=1) |" in report for a in arms)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated")
def test_checkpoint_fid_equals_generate_then_eval(setup, tmp_path):  # noqa: F811  (setup: tests/test_eval.py)
    """With eval.fid_ref a checkpoint's score includes FID, equal to generate.py + eval.py on the same images."""
    from ddpm_curriculum.evaluation import EvalSettings, evaluate
    from ddpm_curriculum.experiments.evaluate import evaluate_checkpoint
    from ddpm_curriculum.experiments.grid import GridEvalConfig
    from ddpm_curriculum.sampling import SamplerSpec, generate_to_folder

    n = 66
    settings = GridEvalConfig(num_samples=n, sample_steps=3, batch_size=32, val_samples=16, seed=7,
                              fid_ref=str(setup["ref"]), fid_dims=64, inception_weights=str(setup["weights_path"]))
    metrics = evaluate_checkpoint(setup["run"], settings)
    assert metrics["fid"] > 0 and "minor_present" in metrics
    generate_to_folder(setup["net"], SamplerSpec(use_ddim=True, steps=3), tmp_path / "s", n, 33, seed=7,
                       device="cpu", grid=0, progress=False)
    direct = evaluate(EvalSettings(samples=str(tmp_path / "s"), ref_folder=str(setup["ref"]), metrics=["fid"],
                                   dims=64, inception_weights=str(setup["weights_path"]), progress=False), "cpu")
    assert metrics["fid"] == pytest.approx(direct["metrics"]["fid"], rel=1e-9)


@pytest.mark.slow
def test_a_run_that_fails_midway_keeps_its_finished_points(tmp_path, monkeypatch):
    """Each evaluation point lands in results.jsonl when it is scored, not when its run ends, so a grid
    stopped (or failing) mid-run keeps what it finished and continues from there."""
    grid_path, out = write_grid(tmp_path, arms=[{"name": "C"}], seeds=[0]), tmp_path / "out"
    original, calls = runner_module.evaluate_checkpoint, []

    def fail_second(path, settings, *args):
        calls.append(path)
        if len(calls) == 2:
            raise RuntimeError("killed while scoring the second point")
        return original(path, settings, *args)

    monkeypatch.setattr(runner_module, "evaluate_checkpoint", fail_second)
    run_grid(grid_path, out, log=lambda *_: None)
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r.get("step") for r in lines] == [3, None] and "killed while scoring" in lines[1]["error"]
    monkeypatch.setattr(runner_module, "evaluate_checkpoint", original)
    again = run_grid(grid_path, out, log=lambda *_: None)  # continues: scores only the missing point
    assert sorted(r["step"] for r in again if "error" not in r) == [3, 6]


@pytest.mark.slow
def test_cifar10_small_grid_quick_mode_on_a_class_folder_tree(tmp_path):
    """configs/experiments/cifar10_small.json --quick on a tiny train/test class tree (IMAGE_FOLDER_PATH): every
    arm trains and gets bits/dim and the spectrum error; --floor scores the held-out images into the report."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 6)):
        for name in ("a", "b"):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
                    tmp_path / "data" / split / name / f"{i}.png")
    grid = ROOT / "configs/experiments/cifar10_small.json"
    env = {**os.environ, "IMAGE_FOLDER_PATH": str(tmp_path / "data"), "OMP_NUM_THREADS": "1"}
    for extra in ([], ["--floor"]):
        res = subprocess.run([sys.executable, str(ROOT / "scripts/run_experiments.py"), str(grid), "--quick",
                              "--out", str(tmp_path / "out"), *extra], capture_output=True, text=True,
                             timeout=600, cwd=ROOT, env=env)
        assert res.returncode == 0, res.stderr[-2000:]
    recs = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert sorted({r["arm"] for r in recs}) == ["C", "anti", "baseline"] and not any("error" in r for r in recs)
    assert all(np.isfinite(r["nll_bpd"]) and r["spectrum_high_error"] >= 0 for r in recs)
    floor = json.loads((tmp_path / "out" / "floor.json").read_text())
    report = (tmp_path / "out" / "report.md").read_text()
    assert floor["num_images"] == 8 and "## Floor: 8 held-out real images" in report
