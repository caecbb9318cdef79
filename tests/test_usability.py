"""What a new user hit (issue 14 item 10): dry runs on too small a dataset, thread counts, the progress bar,
the launch flags' help, and prune.py errors that must name the fix."""

import json
import os

import pytest
import torch

from ddpm_curriculum import dist
from ddpm_curriculum.errors import run_cli
from ddpm_curriculum.training import CurriculumTrainer
from ddpm_curriculum.training.cli import main as train_main
from tests.test_training import TINY


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
