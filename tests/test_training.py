"""CurriculumTrainer end to end on a tiny twoscale config: exact resume, DDP equivalence,
signals, divergence, bad checkpoints and the script's outputs."""

import copy
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from ddpm_curriculum.diffusion import time_range_indices
from ddpm_curriculum.errors import UserError
from ddpm_curriculum.training import CurriculumTrainer, TrainingDiverged
from ddpm_curriculum.training.checkpoint import latest_checkpoint, load_checkpoint

from .helpers import CPU, ROOT, assert_same_state, ddp_spawn, run, tiny_cfg, train_script as script, write_tiny


@pytest.mark.slow
def test_resume_is_bit_identical_mid_epoch_and_across_a_stage_boundary(tmp_path):
    cfg = tiny_cfg()
    full = run(cfg, tmp_path / "full")
    # stop at step 3 (mid-epoch, inside stage 1), resume and stop at 11 (mid-epoch 2, after the
    # stage boundary at 5), resume to the end
    part = tmp_path / "part"
    run(cfg, part, stop_at_step=3)
    assert load_checkpoint(part)["step"] == 3
    run(cfg, part, resume_state=load_checkpoint(part), stop_at_step=11)
    resumed = run(cfg, part, resume_state=load_checkpoint(part))
    assert resumed.step == full.step == 14
    assert_same_state(full, resumed)
    a, b = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(a[i]["exp_avg_sq"], b[i]["exp_avg_sq"]) for i in a)
    # the resumed run's metrics continue the same log
    steps = [json.loads(line)["step"] for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 14


@pytest.mark.slow
def test_timesteps_stay_inside_each_stage(tmp_path):
    cfg = tiny_cfg("train.log_intv=1")
    run(cfg, tmp_path)
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lo, hi = time_range_indices(0.8, 1.0, 100)
    for rec in recs:
        bins = [i for i, v in enumerate(rec["loss_per_t_bin"]) if v is not None]
        if rec["step"] <= 5:
            assert rec["stage"] == "high" and rec["t_range"] == [lo, hi] and set(bins) <= {8, 9}
        else:
            assert rec["stage"] == "full" and rec["t_range"] == [0, 99]
    assert len({i for r in recs if r["step"] > 5 for i, v in enumerate(r["loss_per_t_bin"]) if v}) > 4


@pytest.mark.slow
def test_nan_loss_stops_with_a_checkpoint_of_the_last_good_state(tmp_path):
    trainer = CurriculumTrainer(tiny_cfg(), tmp_path, CPU, progress=False)
    original = trainer.diffusion.training_losses

    def poisoned(model, x0, t, noise, **kw):
        loss = original(model, x0, t, noise, **kw)
        return loss * float("nan") if trainer.step == 4 else loss

    trainer.diffusion.training_losses = poisoned
    with pytest.raises(TrainingDiverged, match="NaN/inf at step 5"):
        trainer.train()
    state = load_checkpoint(tmp_path)
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.slow
def test_incompatible_checkpoint_is_a_clear_error(tmp_path):
    run(tiny_cfg("train.steps=6"), tmp_path)
    state = load_checkpoint(tmp_path)
    with pytest.raises(UserError, match="does not match the model"):
        CurriculumTrainer(tiny_cfg("model.hid_channels=64"), tmp_path / "x", CPU, resume_state=state)


def _ddp_worker(rank, run_dir, out):
    trainer = run(tiny_cfg("model.drop_rate=0.0", "eval.num_samples=0"), run_dir)
    torch.save({"model": trainer.model.state_dict(), "ema": trainer.ema.state_dict(),
                "step": trainer.step, "stage": trainer.stage.index}, f"{out}/rank{rank}.pt")


@pytest.mark.slow
def test_two_process_gloo_matches_one_process(tmp_path):
    ddp_spawn(_ddp_worker, str(tmp_path / "ddp"), str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["step"] == r1["step"] == 14 and r0["stage"] == r1["stage"] == 1
    for key in ("model", "ema"):
        for k in r0[key]:
            assert torch.equal(r0[key][k], r1[key][k]), f"ranks differ in {key}.{k}"
    single = run(tiny_cfg("model.drop_rate=0.0", "eval.num_samples=0"), tmp_path / "single")
    # Same batches, timesteps and noise → same losses at every logged step.
    log = lambda d: [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]
    torch.testing.assert_close(log(tmp_path / "ddp"), log(tmp_path / "single"), rtol=1e-5, atol=0)
    # Same function. (Biases right before a GroupNorm get pure rounding-noise gradients, which Adam
    # scales up to ±lr, so parameters are compared through the network's outputs and weight tensors.)
    for k, v in single.model.state_dict().items():
        if v.dim() > 1:
            torch.testing.assert_close(r0["model"][k], v, atol=1e-4, rtol=1e-3, msg=f"DDP vs single: {k}")
    ddp_model = copy.deepcopy(single.model)
    ddp_model.load_state_dict(r0["model"])
    x, t = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 30, 60, 99])
    with torch.no_grad():
        torch.testing.assert_close(ddp_model(x, t), single.model(x, t), atol=1e-4, rtol=1e-3)


# ------------------------------------------------------------------------- the script


@pytest.mark.slow
def test_script_run_directory_contents(tmp_path):
    cfg_path = write_tiny(tmp_path)
    res = script("--config-path", str(cfg_path), "--run-dir", str(tmp_path / "run"), "--device", "cpu",
                 "--no-progress")
    assert res.returncode == 0, res.stderr
    run_dir = tmp_path / "run"
    assert "mode C" in res.stdout and "1/1.75 epochs [full]: loss=" in res.stdout
    assert json.loads((run_dir / "config.json").read_text())["train"]["steps"] == 14
    rec = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("step", "epoch", "stage", "t_range", "loss", "lr", "grad_norm", "img_per_sec", "loss_per_t_bin"):
        assert key in rec
    assert len(rec["loss_per_t_bin"]) == 10
    assert latest_checkpoint(run_dir).name == "ckpt_00000014.pt"
    assert json.loads((run_dir / "checkpoints" / "ckpt_00000014.json").read_text())["mode"] == "C"
    grids = sorted(p.name for p in (run_dir / "samples").glob("*.png"))
    assert "step00000005_high.png" in grids and "step00000014_final.png" in grids
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["num_samples"] == 16 and 0.0 <= ev["metrics"]["major_coverage"] <= 1.0
    # a second start into the same directory must not overwrite it
    again = script("--config-path", str(cfg_path), "--run-dir", str(run_dir), "--device", "cpu")
    assert again.returncode == 2 and "pass --resume" in again.stderr


@pytest.mark.slow
def test_dry_run_prints_config_and_stage_plan():
    res = script("--config-path", str(ROOT / "tests/fixtures/seed001_celeba32_cs.json"), "--dry-run",
                 "--set", "dataset.name=twoscale", "--set", "dataset.image_size=32",
                 "--set", "dataset.num_samples=2560")
    assert res.returncode == 0, res.stderr
    assert "mode: CS" in res.stdout and "10 steps per epoch" in res.stdout
    assert "stage 1 stage1_high_noise: t in [800, 999]" in res.stdout
    assert "stage 5 stage5_full_range: t in [0, 999]" in res.stdout and "steps 50..999" in res.stdout


@pytest.mark.slow
@pytest.mark.parametrize("args, fragment", [
    (["--config-path", "nope.json"], "config file not found"),
    (["--config-path", "configs/quickstart.json", "--set", "train.lrr=1"], "did you mean 'lr'"),
    (["--resume", "missing_dir/ckpt.pt"], "checkpoint not found"),
    (["--config-path", "configs/celeba32_c.json", "--set", "dataset.root=/nonexistent"], "CelebA"),
])
def test_bad_input_gives_one_line_and_exit_code_2(args, fragment):
    res = script(*args, "--device", "cpu")
    assert res.returncode == 2, res.stderr
    assert fragment in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_truncated_checkpoint_and_wrong_model_are_exit_2(tmp_path):
    cfg_path = write_tiny(tmp_path, steps=6)
    run_dir = tmp_path / "run"
    assert script("--config-path", str(cfg_path), "--run-dir", str(run_dir), "--device", "cpu").returncode == 0
    ckpt = latest_checkpoint(run_dir)
    wrong = script("--config-path", str(cfg_path), "--run-dir", str(tmp_path / "w"), "--resume", str(ckpt),
                   "--set", "model.hid_channels=64", "--set", "train.steps=8", "--device", "cpu")
    # a fixed key is refused before the checkpoint meets the model (tests/test_resume_hardening.py)
    assert wrong.returncode == 2 and "cannot change model.hid_channels" in wrong.stderr, wrong.stderr
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(ckpt.read_bytes()[:1000])
    res = script("--resume", str(truncated), "--device", "cpu")
    assert res.returncode == 2 and "truncated" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_finishes(tmp_path):
    cfg_path = write_tiny(tmp_path, steps=100000, log_intv=1, image_intv=0, chkpt_intv=0)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_curriculum.py"), "--config-path", str(cfg_path),
                             "--run-dir", str(run_dir), "--device", "cpu", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "resume with" in out
    step = load_checkpoint(run_dir)["step"]
    assert step >= 3
    res = script("--run-dir", str(run_dir), "--resume", "--set", f"train.steps={step + 6}", "--device", "cpu",
                 "--no-progress")
    assert res.returncode == 0, res.stderr
    assert f"resumed at step {step}" in res.stdout
    assert load_checkpoint(run_dir)["step"] == step + 6


def test_ema_follows_the_warmed_up_decay_formula():
    from ddpm_curriculum.training.ema import EMA

    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.99)
    expected = [p.detach().clone() for p in model.parameters()]
    for n in range(1, 40):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        d = min(0.99, (1 + n) / (10 + n))
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, model.parameters(), strict=True)]
    for e, p in zip(expected, ema.model.parameters(), strict=True):
        torch.testing.assert_close(p, e, atol=1e-6, rtol=1e-6)
    assert ema.num_updates == 39


@pytest.mark.slow
def test_load_network_rebuilds_the_model_with_ema_or_raw_weights(tmp_path):
    from ddpm_curriculum.training.checkpoint import load_network

    trainer = run(tiny_cfg("train.steps=6", "eval.num_samples=0"), tmp_path)
    ema, raw = load_network(tmp_path), load_network(tmp_path, use_ema=False)
    assert (ema.weights, raw.weights, ema.step) == ("ema", "model", 6) and not ema.model.training
    for k, v in trainer.ema.state_dict().items():
        assert torch.equal(ema.model.state_dict()[k], v)
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(raw.model.state_dict()[k], v)
    assert ema.diffusion.timesteps == 100
    bare = tmp_path / "bare.pt"  # neither a project checkpoint nor a ddpm-torch UNet
    torch.save({"model": {"linear.weight": torch.zeros(2, 2)}}, bare)
    with pytest.raises(UserError, match="no stored config"):
        load_network(bare)


@pytest.mark.slow
def test_torchrun_two_process_gloo_launch(tmp_path):
    """The real launcher (torchrun, as in README and docs/scaling.md) with 2 CPU processes over gloo."""
    cfg_path = write_tiny(tmp_path, steps=6, num_samples=0)
    run_dir = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(ROOT / "train_curriculum.py"), "--config-path", str(cfg_path), "--distributed",
                          "--run-dir", str(run_dir), "--device", "cpu", "--no-progress"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("world size 2") == 1  # rank 0 speaks, rank 1 is silent
    state = load_checkpoint(run_dir)
    assert state["step"] == 6 and state["world_size"] == 2 and len(state["rng"]) == 2
