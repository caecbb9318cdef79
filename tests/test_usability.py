"""What a new user hit (issue 14 item 10): dry runs on too small a dataset, thread counts, the progress bar,
the launch flags' help, and prune.py errors that must name the fix."""

import json

import pytest

from ddpm_curriculum.errors import run_cli
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
