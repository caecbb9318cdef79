"""Resume hardening (issue 14): --set on --resume takes effect or is refused, an escape from a divergence
that repeats, --stop-at-step at or before the current step, and stop signals outside the training loop."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

from ddpm_curriculum.config import TrainConfig
from ddpm_curriculum.errors import UserError
from ddpm_curriculum.training import CurriculumTrainer, TrainingDiverged
from ddpm_curriculum.training.checkpoint import latest_checkpoint, load_checkpoint
from ddpm_curriculum.training.cli import RESUME_RULES, parse_args, resolve
from .helpers import CPU, ROOT, run, train_script as script, tiny_cfg, write_tiny


def resumed(run_dir, *sets, **kw):
    """A trainer built the way train_curriculum.py --resume builds it (resolve: checkpoint config + --set)."""
    cfg, state = resolve(parse_args(["--resume", str(run_dir)] + [a for s in sets for a in ("--set", s)]))
    return CurriculumTrainer(cfg, run_dir, CPU, resume_state=state, progress=False, **kw)


def record_lrs(trainer):
    """The lr of every optimizer step, read when the step runs."""
    used, step = [], trainer.optimizer.step

    def recording(*a, **kw):
        used.append([g["lr"] for g in trainer.optimizer.param_groups])
        return step(*a, **kw)

    trainer.optimizer.step = recording
    return used


# ------------------------------------------------------------------ --set on --resume


@pytest.mark.slow
def test_resume_lr_and_warmup_overrides_drive_the_next_steps(tmp_path):
    run(tiny_cfg("train.warmup=10", "eval.num_samples=0"), tmp_path, stop_at_step=4)
    trainer = resumed(tmp_path, "train.lr=1e-5", "train.warmup=20", "train.weight_decay=0.01",
                      "train.betas=[0.5, 0.9]", stop_at_step=8)
    used = record_lrs(trainer)
    trainer.train()
    # step s (0-based) runs with lr · min(1, (s + 1) / warmup) of the *new* config
    assert used == [[1e-5 * min(1.0, (s + 1) / 20)] for s in range(4, 8)]
    group = trainer.optimizer.param_groups[0]
    assert group["weight_decay"] == 0.01 and tuple(group["betas"]) == (0.5, 0.9)
    state = load_checkpoint(tmp_path)
    assert state["config"]["train"]["lr"] == 1e-5 and state["scheduler"]["base_lrs"] == [1e-5]
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lrs[-1] == 1e-5 * (9 / 20)  # logged after step 8: the lr step 9 will use


@pytest.mark.slow
def test_resume_without_overrides_keeps_the_schedule_bit_for_bit(tmp_path):
    run(tiny_cfg("train.warmup=10", "eval.num_samples=0"), tmp_path, stop_at_step=4)
    trainer = resumed(tmp_path, stop_at_step=6)
    used = record_lrs(trainer)
    trainer.train()
    assert used == [[1e-3 * (5 / 10)], [1e-3 * (6 / 10)]]


@pytest.mark.slow
@pytest.mark.parametrize("override, key", [
    ("model.hid_channels=64", "model.hid_channels"),
    ("train.seed=1", "train.seed"),
    ("train.batch_size=16", "train.batch_size"),
    ("diffusion.timesteps=50", "diffusion.timesteps"),
    ("curriculum.stages.0.t_min=0.5", "curriculum.stages.0.t_min"),
    ("dataset.k1=3", "dataset.k1"),
])
def test_resume_refuses_fixed_keys_by_name(tmp_path, override, key):
    run(tiny_cfg("train.steps=6", "eval.num_samples=0"), tmp_path)
    with pytest.raises(UserError, match=rf"--resume cannot change {key.replace('.', '[.]')} \("):
        resolve(parse_args(["--resume", str(tmp_path), "--set", override, "--set", "train.steps=8"]))


@pytest.mark.slow
def test_resume_with_a_fixed_key_is_one_line_and_exit_2(tmp_path):
    run_dir = tmp_path / "run"
    run(tiny_cfg("train.steps=6", "eval.num_samples=0"), run_dir)
    config_before = "sentinel"
    (run_dir / "config.json").write_text(config_before)
    res = script("--run-dir", str(run_dir), "--resume", "--set", "model.ch_multipliers=[1, 1]", "--device", "cpu")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and "model.ch_multipliers" in res.stderr
    assert (run_dir / "config.json").read_text() == config_before  # nothing recorded


def test_every_train_key_has_a_resume_rule():
    """A new train.* key needs a decision (take effect or refuse), not the fallback."""
    patterns = {p for p, _ in RESUME_RULES}
    assert {f"train.{k}" for k in TrainConfig.__dataclass_fields__} <= patterns


@pytest.mark.slow
def test_resume_length_changes_may_not_rewrite_the_past(tmp_path):
    run(tiny_cfg("eval.num_samples=0"), tmp_path, stop_at_step=4)  # stage 'high' is steps 0..4
    with pytest.raises(UserError, match="move stages that already started"):
        resumed(tmp_path, "curriculum.stages.0.steps=3")  # 'full' would have started at step 3
    with pytest.raises(UserError, match="at step 4 but the run now lasts 3 steps"):
        resumed(tmp_path, "train.steps=3", "curriculum.stages.0.steps=2")
    longer = resumed(tmp_path, "curriculum.stages.0.steps=7", "train.steps=10")
    assert [(s.name, s.start_step) for s in longer.plan] == [("high", 0), ("full", 7)]
    longer.train()
    starts = [json.loads(x) for x in (tmp_path / "transitions.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in starts] == [("high", 0), ("full", 7)]


# ------------------------------------------------------------------ divergence


def poison(trainer, at_step):
    """NaN loss whenever the trainer is at ``at_step`` (the batch and noise of a step are fixed by it)."""
    original = trainer.diffusion.training_losses

    def poisoned(model, x0, t, noise, **kw):
        loss = original(model, x0, t, noise, **kw)
        return loss * float("nan") if trainer.step == at_step else loss

    trainer.diffusion.training_losses = poisoned


@pytest.mark.slow
def test_divergence_names_both_escapes_and_skipping_gets_past_the_step(tmp_path, capsys):
    first = CurriculumTrainer(tiny_cfg("eval.num_samples=0"), tmp_path, CPU, progress=False)
    poison(first, 4)
    with pytest.raises(TrainingDiverged) as info:
        first.train()
    msg = str(info.value)
    resume = f"python train_curriculum.py --run-dir {tmp_path} --resume"
    assert f"{resume} --set train.lr=0.0001" in msg and f"{resume} --set train.skip_nonfinite_steps=1" in msg
    good = load_checkpoint(tmp_path)
    assert good["step"] == 4

    again = resumed(tmp_path)  # a plain resume diverges at the same step
    poison(again, 4)
    with pytest.raises(TrainingDiverged, match="at step 5"):
        again.train()

    skip_cmd = shlex.split(msg.split("skip that step's batch: ")[1])
    assert skip_cmd[:2] == ["python", "train_curriculum.py"]
    cfg, state = resolve(parse_args(skip_cmd[2:]))
    # progress on: the bar shows a skipped step too
    escaped = CurriculumTrainer(cfg, tmp_path, CPU, resume_state=state, progress=True, stop_at_step=5)
    poison(escaped, 4)
    capsys.readouterr()
    escaped.train()
    assert "skipped step 5 (stage 'high'): non-finite loss, no update" in capsys.readouterr().out
    skipped = load_checkpoint(tmp_path)
    assert skipped["step"] == 5 and skipped["skipped_steps"] == [5] and skipped["scheduler"]["last_epoch"] == 5
    for key in ("model", "ema"):  # the skipped step changed no weight
        assert all(torch.equal(skipped[key][k], good[key][k]) for k in good[key])
    notes = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in notes if "skipped" in r] == [{"step": 5, "skipped": "non-finite loss", "stage": "high",
                                                     "skipped_so_far": 1, "skip_nonfinite_steps": 1}]

    rest = resumed(tmp_path)  # the budget is spent: a second bad step stops again, asking for 2
    poison(rest, 9)
    with pytest.raises(TrainingDiverged, match="at step 10.*skip_nonfinite_steps=2"):
        rest.train()
    assert load_checkpoint(tmp_path)["step"] == 9


# ------------------------------------------------------------------ --stop-at-step


@pytest.mark.slow
def test_stop_at_step_at_or_before_the_current_step_is_refused_without_training(tmp_path):
    run_dir = tmp_path / "run"
    run(tiny_cfg("eval.num_samples=0"), run_dir, stop_at_step=4)
    res = script("--run-dir", str(run_dir), "--resume", "--stop-at-step", "4", "--device", "cpu")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "--stop-at-step 4 is not after the current step 4" \
        in res.stderr
    with pytest.raises(UserError, match="--stop-at-step 2 is not after the current step 4"):
        resumed(run_dir, stop_at_step=2)
    assert latest_checkpoint(run_dir).name == "ckpt_00000004.pt"
    assert max(p.name for p in (run_dir / "checkpoints").glob("*.pt")) == "ckpt_00000004.pt"
    with pytest.raises(UserError, match="--stop-at-step 0 is not after the current step 0"):
        CurriculumTrainer(tiny_cfg(), tmp_path / "new", CPU, stop_at_step=0)


# ------------------------------------------------------------------ stop signals outside the loop

# Runs train_curriculum.py with one phase made slow; prints READY when the process is inside it.
SLOW_PHASE = """
import runpy, sys, time
from ddpm_curriculum.training import builders, trainer
def slow(fn):
    def wrapped(*a, **kw):
        print("READY", flush=True)
        time.sleep(120)
        return fn(*a, **kw)
    return wrapped
if sys.argv[1] == "startup":
    builders.make_dataset = slow(builders.make_dataset)
else:
    trainer.evaluate_samples = slow(trainer.evaluate_samples)
sys.argv = ["train_curriculum.py"] + sys.argv[2:]
runpy.run_path("train_curriculum.py", run_name="__main__")
"""


def signal_in_phase(phase, sig, *args):
    proc = subprocess.Popen([sys.executable, "-c", SLOW_PHASE, phase, *args, "--device", "cpu", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    for line in proc.stdout:
        if line.strip() == "READY" or time.time() > deadline:
            break
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_during_start_up_is_one_line_and_128_plus_signal(tmp_path, sig, code):
    cfg_path = write_tiny(tmp_path, steps=6, num_samples=0)
    rc, err = signal_in_phase("startup", sig, "--config-path", str(cfg_path), "--run-dir", str(tmp_path / "run"))
    assert rc == code, err
    assert err.strip().splitlines() == [(f"interrupted by {sig.name} during start-up, before the first training "
                                         f"step: no checkpoint was written; run the same command again")]
    assert latest_checkpoint(tmp_path / "run") is None


@pytest.mark.slow
def test_sigterm_during_final_evaluation_says_what_was_saved_and_the_rerun_works(tmp_path):
    cfg_path = write_tiny(tmp_path, steps=6, num_samples=0)
    run_dir = tmp_path / "run"
    rc, err = signal_in_phase("eval", signal.SIGTERM, "--config-path", str(cfg_path), "--run-dir", str(run_dir))
    assert rc == 143 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    final = run_dir / "checkpoints" / "ckpt_00000006.pt"
    assert f"during the final sample grid and evaluation; training is complete and saved in {final}" in err
    assert latest_checkpoint(run_dir) == final and not (run_dir / "eval.json").exists()
    cmd = shlex.split(err.split("make the grid and eval.json with: ")[1])
    res = script(*cmd[2:], "--device", "cpu", "--no-progress")
    assert res.returncode == 0, res.stderr
    assert json.loads((run_dir / "eval.json").read_text())["step"] == 6


@pytest.mark.slow
def test_a_stop_request_after_the_last_step_checkpoints_instead_of_evaluating(tmp_path):
    trainer = CurriculumTrainer(tiny_cfg("train.steps=6"), tmp_path, CPU, progress=False)
    after = trainer._after_step

    def late_signal(stage, bar):  # as if SIGTERM arrived after the last step's stop check
        after(stage, bar)
        trainer._stop_requested = trainer.step == 6

    trainer._after_step = late_signal
    assert trainer.train() == {"stopped": True, "step": 6}
    assert load_checkpoint(tmp_path)["step"] == 6 and not (tmp_path / "eval.json").exists()
