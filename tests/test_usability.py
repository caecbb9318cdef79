"""What a new user hit (issue 14 item 10): dry runs on too small a dataset, thread counts, the progress bar,
the launch flags' help, and prune.py errors that must name the fix."""

import io
import json
import os
import sys

import pytest
import torch

from ddpm_curriculum import dist
from ddpm_curriculum.errors import run_cli
from ddpm_curriculum.training import CurriculumTrainer
from ddpm_curriculum.training.cli import main as train_main
from .helpers import TINY, run_script as script, tiny_cfg


@pytest.fixture
def tiny_json(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path


def test_dry_run_on_a_dataset_smaller_than_one_batch_reports_what_a_real_run_reports(tiny_json, tmp_path, capsys):
    small = ["--config-path", str(tiny_json), "--set", "dataset.num_samples=5", "--device", "cpu"]
    assert run_cli(train_main, [*small, "--dry-run"]) == 2
    dry = capsys.readouterr().err.strip()
    assert run_cli(train_main, [*small, "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    real = capsys.readouterr().err.strip()
    assert dry == real and dry.startswith("error: the dataset has 5 samples, fewer than 'train.batch_size' = 8")
    assert len(dry.splitlines()) == 1


@pytest.fixture
def threads_restored():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("flag, expected", [([], None), (["--threads", "1"], 1), (["--threads", "3"], 3)])
def test_threads_flag_is_in_force_in_the_training_worker(tiny_json, tmp_path, monkeypatch, capsys, threads_restored,
                                                          flag, expected):
    seen = []
    monkeypatch.setattr(CurriculumTrainer, "train", lambda self: seen.append(torch.get_num_threads()) or {})
    default = torch.get_num_threads()
    args = ["--config-path", str(tiny_json), "--run-dir", str(tmp_path / "run"), "--device", "cpu", *flag]
    assert train_main(args) == 0
    assert seen == [expected or default]
    assert f"CPU threads per process: {expected or default}" in capsys.readouterr().out


def test_spawned_ranks_split_the_cores_unless_told_otherwise(monkeypatch, threads_restored):
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert dist.set_threads() == 2 and torch.get_num_threads() == 2
    assert dist.set_threads(3) == 3  # an explicit count wins
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # so does the user's environment (torch read it at start)
    torch.set_num_threads(1)
    assert dist.set_threads() == 1


def test_bad_thread_count_is_one_line(tiny_json, capsys):
    assert run_cli(train_main, ["--config-path", str(tiny_json), "--threads", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --threads 0: need at least 1"


@pytest.mark.slow
def test_progress_bar_keeps_lines_intact_and_shows_stage_and_loss_from_step_one(tmp_path, monkeypatch):
    from ddpm_curriculum.training import trainer as trainer_module

    posts = []

    class EveryDraw(trainer_module.tqdm):  # draw on every update, record every postfix
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "mininterval": 0, "miniters": 1})

        def set_postfix_str(self, s="", refresh=True):
            posts.append((self.n, s))
            super().set_postfix_str(s, refresh)

    monkeypatch.setattr(trainer_module, "tqdm", EveryDraw)
    out = io.StringIO()  # one stream for prints and bar, as a terminal shows them
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", out)
    cfg = tiny_cfg("train.steps=8", "train.image_intv=0", "train.chkpt_intv=0", "train.num_samples=0",
                   "eval.num_samples=0")
    CurriculumTrainer(cfg, tmp_path / "run", torch.device("cpu"), progress=True).train()
    # stage 'high' is steps 1-5, then 'full'; the postfix names the step's stage and its loss from step 1 on
    assert [n for n, _ in posts] == list(range(8))
    assert all(s.startswith("high t∈[80,99] loss=") for _, s in posts[:5])
    assert all(s.startswith("full t∈[0,99] loss=") for _, s in posts[5:])
    segments = [seg for line in out.getvalue().split("\n") for seg in line.split("\r")]
    messages = [seg for seg in segments if "epochs [" in seg or "' done at step" in seg]
    assert messages == ["stage 1/2 'high' done at step 5; next: 'full'", "1/1 epochs [full]: loss=" +
                        messages[-1].rsplit("=", 1)[-1]]  # each on its own, not glued onto a bar
    visible = [line.split("\r")[-1] for line in out.getvalue().split("\n")]  # what a terminal leaves on each line
    assert sum("8/8 [" in line for line in visible) == 1  # the final bar is shown once


@pytest.mark.parametrize("flags, note", [
    (["--distributed"], "note: --distributed alone trains one process; launch with torchrun"),
    (["--rigid-launch"], "note: --rigid-launch has no effect without --num-gpus N"),
    (["--distributed", "--rigid-launch", "--num-gpus", "2"], None),
])
def test_seed_launch_flags_do_what_their_help_says(tiny_json, tmp_path, monkeypatch, capsys, flags, note):
    from ddpm_curriculum.training import cli

    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--distributed accepted for the seeds' commands, no effect" in help_text
    assert "--rigid-launch accepted for the seeds' commands, no effect" in help_text
    # what happens: one process unless --num-gpus N > 1 (or torchrun), with or without the two flags
    launched = []
    monkeypatch.setattr(cli, "worker", lambda *a: launched.append("worker") or 0)
    monkeypatch.setattr(cli.dist, "spawn", lambda fn, n, a: launched.append(f"spawn {n}"))
    args = ["--config-path", str(tiny_json), "--run-dir", str(tmp_path / "run"), "--device", "cpu", *flags]
    assert train_main(args) == 0
    assert launched == (["spawn 2"] if "--num-gpus" in flags else ["worker"])
    out = capsys.readouterr().out
    assert (note in out) if note else "note:" not in out


@pytest.fixture(scope="module")
def pruned_twoscale(tmp_path_factory):
    """A briefly trained tiny twoscale run and prune.py's output folder for it."""
    from ddpm_curriculum.pruning.cli import main as prune_main

    root = tmp_path_factory.mktemp("pruned")
    cfg = tiny_cfg("train.steps=6", "train.image_intv=0", "train.chkpt_intv=0", "train.num_samples=0",
                   "eval.num_samples=0")
    CurriculumTrainer(cfg, root / "run", torch.device("cpu"), progress=False).train()
    assert prune_main(["--model_path", str(root / "run"), "--save_path", str(root / "out"), "--device", "cpu",
                       "--eval_samples", "0", "--preview_samples", "0"]) == 0
    return root


@pytest.mark.slow
@pytest.mark.parametrize("model_path, extra, expected", [
    ("out", [], "{root}/out is a prune.py output folder, not a run directory; pass {root}/out/pruned.pt"),
    ("google/ddpm-cifar10-32", [], "checkpoint not found: google/ddpm-cifar10-32; a Hugging Face Hub id is not "
     "downloaded here: fetch it where there is internet (huggingface-cli download google/ddpm-cifar10-32 "
     "--local-dir ddpm-cifar10-32) and pass that diffusers folder"),
    ("run", ["--dataset", "cifar10"], "--dataset cifar10, but {root}/run/checkpoints/ckpt_00000006.pt was "
     "trained on 'twoscale' (its stored config says so); --dataset only names the dataset of an imported "
     "ddpm-torch/diffusers network: drop it"),
])
def test_prune_errors_name_the_fix(pruned_twoscale, tmp_path, capsys, model_path, extra, expected):
    from ddpm_curriculum.pruning.cli import main as prune_main

    root = pruned_twoscale
    path = str(root / model_path) if (root / model_path.split("/")[0]).exists() else model_path
    argv = ["--model_path", path, "--save_path", str(tmp_path / "p"), "--device", "cpu", "--eval_samples", "0",
            "--preview_samples", "0", *extra]
    assert run_cli(prune_main, argv) == 2  # what prune.py runs
    assert capsys.readouterr().err.strip() == "error: " + expected.format(root=root)
    if "Hub" in expected:  # and once through the script itself
        res = script("prune.py", *argv)
        assert res.returncode == 2 and res.stderr.strip() == "error: " + expected


@pytest.mark.slow
def test_prune_dataset_of_an_imported_network_is_applied(pruned_twoscale, tmp_path):
    from ddpm_curriculum.pruning.cli import main as prune_main

    state = torch.load(pruned_twoscale / "out" / "pruned.pt", weights_only=True)
    torch.save({"model": state["model"]}, tmp_path / "ddpm_torch.pt")  # a ddpm-torch-style checkpoint
    assert prune_main(["--model_path", str(tmp_path / "ddpm_torch.pt"), "--save_path", str(tmp_path / "p"),
                       "--dataset", "celeba64", "--device", "cpu", "--eval_samples", "0",
                       "--preview_samples", "0"]) == 0
    assert torch.load(tmp_path / "p" / "pruned.pt", weights_only=True)["config"]["dataset"]["name"] == "celeba64"
