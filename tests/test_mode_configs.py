"""The shipped mode configs: every one dry-runs, the twoscale family shares one budget, the seeds' celeba32
C/CS/CR configs train on a fake CelebA, and the plotting script runs on tiny runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ddpm_curriculum.config import load_config
from ddpm_curriculum.training.cli import main as train_main
from ddpm_curriculum.training.plots import plot_run
from .helpers import ROOT, make_fake_celeba, train_script as script

CONFIGS = sorted((ROOT / "configs").glob("*.json"))
SEED_CS = ROOT / "tests" / "fixtures" / "seed001_celeba32_cs.json"
FAMILY = ["baseline", "c", "cs", "cr", "anti", "minsnr", "p2", "matched", "cs_random", "cs_decoder"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_dry_runs_and_prints_its_plan(path, capsys):
    assert train_main(["--config-path", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    cfg = load_config(path)
    assert f"mode: {cfg.mode}" in out
    if cfg.mode == "CS":
        what = {"bottleneck": "bottleneck channels", "decoder": "decoder input channels"}[cfg.sparsity.location]
        assert out.count(what) == len(cfg.curriculum.stages)
    if cfg.mode == "CR":
        assert out.count("λ = ") == len(cfg.curriculum.stages)


def test_required_configs_exist_and_the_twoscale_family_shares_one_budget():
    names = {p.stem for p in CONFIGS}
    for want in ["celeba32_c", "celeba32_cs", "celeba32_cr", "celeba64_c", "celeba64_cs", "celeba64_cr",
                 "cifar10_baseline", "cifar10_c", "cifar10_cs", "cifar10_cr"] + [f"twoscale_{f}" for f in FAMILY]:
        assert want in names, want
    family = {f: load_config(ROOT / "configs" / f"twoscale_{f}.json").to_dict() for f in FAMILY}
    base = family["baseline"]
    for name, cfg in family.items():
        for section in ("dataset", "diffusion", "model", "eval"):
            assert cfg[section] == base[section], (name, section)
        train = {k: v for k, v in cfg["train"].items() if not k.startswith(("loss_weighting", "min_snr", "p2_"))}
        assert train == {k: v for k, v in base["train"].items() if k in train}, name
    small = {f: load_config(ROOT / "configs" / f"cifar10_small_{f}.json").to_dict() for f in ("baseline", "c", "anti")}
    for name, cfg in small.items():  # the real-image comparison: arms differ only in their curriculum (and so mode)
        assert {k: v for k, v in cfg.items() if k not in ("curriculum", "mode")} == \
            {k: v for k, v in small["baseline"].items() if k not in ("curriculum", "mode")}, name
    c, anti = small["c"]["curriculum"]["stages"], small["anti"]["curriculum"]["stages"]
    assert [(s["steps"], s["t_max"]) for s in anti] == [(s["steps"], pytest.approx(1 - s["t_min"])) for s in c]
    assert sum(s["steps"] for s in c) == small["baseline"]["train"]["steps"]
    assert family["c"]["curriculum"]["stages"] == family["cs"]["curriculum"]["stages"] \
        == family["cr"]["curriculum"]["stages"] == family["matched"]["curriculum"]["stages"]
    assert [s["t_max"] for s in family["anti"]["curriculum"]["stages"]] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert family["cs_random"]["sparsity"]["regrowth_method"] == "random"
    assert family["cs_decoder"]["sparsity"] == {**family["cs"]["sparsity"], "location": "decoder"}


SHRINK = ["model.hid_channels=32", "model.num_res_blocks=1", "model.norm_groups=16", "train.batch_size=3",
          "train.epochs=10", "train.warmup=2", "train.num_samples=2", "train.sample_steps=2",
          "train.image_intv=0", "train.chkpt_intv=0", "train.log_intv=2", "eval.num_samples=0"]


@pytest.fixture(scope="module")
def celeba_runs(tmp_path_factory):
    """The seeds' celeba32 C, CS (the seed's own file and ours) and CR configs, trained on 6 fake images
    (2 steps per epoch)."""
    root = tmp_path_factory.mktemp("celeba")
    make_fake_celeba(root, n=6, partition=False)
    runs = {}
    for name, path in [("c", ROOT / "configs/celeba32_c.json"), ("seed_cs", SEED_CS),
                       ("cs", ROOT / "configs/celeba32_cs.json"), ("cr", ROOT / "configs/celeba32_cr.json")]:
        runs[name] = root / name
        args = ["--config-path", str(path), "--run-dir", str(runs[name]), "--device", "cpu", "--no-progress",
                "--set", f"dataset.root={root}"]
        assert train_main(args + [a for s in SHRINK for a in ("--set", s)]) == 0
    return runs


@pytest.mark.slow
def test_seed_celeba32_configs_train_on_a_fake_celeba(celeba_runs):
    for name, run_dir in celeba_runs.items():
        recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert recs[-1]["step"] == 20 and recs[-1]["stage"] == "stage5_full_range", name
        starts = [json.loads(x) for x in (run_dir / "transitions.jsonl").read_text().splitlines()]
        assert [s["step"] for s in starts] == [0, 2, 4, 6, 10], name
    cs = [json.loads(x) for x in (celeba_runs["seed_cs"] / "transitions.jsonl").read_text().splitlines()]
    assert [s["active_channels"] for s in cs] == [12, 26, 38, 51, 64]  # 64-channel bottleneck after --set
    assert cs[1]["regrowth_method"] == "gradient"
    cr = [json.loads(x) for x in (celeba_runs["cr"] / "metrics.jsonl").read_text().splitlines()]
    assert cr[0]["lambda"] == 3e-5 and cr[-1]["lambda"] == 0.0 and "reg" in cr[0]


@pytest.mark.slow
def test_plot_run_writes_the_figures_of_each_mode(celeba_runs):
    want = {"c": {"loss.png", "loss_per_t_bin.png"}, "cs": {"loss.png", "loss_per_t_bin.png", "channels.png"},
            "cr": {"loss.png", "loss_per_t_bin.png", "channel_norms.png"}}
    for name, files in want.items():
        paths = plot_run(celeba_runs[name])
        assert {p.name for p in paths} == files, name
        assert all(p.is_file() and p.stat().st_size > 1000 for p in paths)


@pytest.mark.slow
def test_plot_script_and_bad_mode_configs_exit_2_with_one_line(tmp_path, celeba_runs):
    res = subprocess.run([sys.executable, str(ROOT / "scripts/plot_run.py"), str(celeba_runs["cs"]),
                          "--out", str(tmp_path / "p")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "p" / "channels.png").stat().st_size > 1000
    res = subprocess.run([sys.executable, str(ROOT / "scripts/plot_run.py"), str(tmp_path / "nothing")],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 2 and "metrics.jsonl" in res.stderr and "Traceback" not in res.stderr
    res = script("--config-path", str(ROOT / "configs/celeba32_cs.json"), "--set", "sparsity.schedule=list",
                 "--set", "sparsity.per_stage=[0.5, 0.8, 0.4, 0.2, 0.0]", "--device", "cpu")
    assert res.returncode == 2 and "must not increase" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
