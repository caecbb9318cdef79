"""Shared fixtures. Session-scoped ones are built once for the whole run and only read by the tests that
use them (a test that changes a run directory makes its own). Plain helpers are in helpers.py."""

import pytest
import torch

from ddpm_curriculum.evaluation.sources import DatasetImages
from ddpm_curriculum.metrics.inception import random_state_dict
from ddpm_curriculum.sampling import SamplerSpec, generate_to_folder
from ddpm_curriculum.sampling.folder import write_png
from ddpm_curriculum.training.checkpoint import load_network

from .helpers import EVAL_N, run, tiny_cfg


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A briefly trained tiny twoscale model (8×8, T = 100) in a run directory (read only)."""
    run_dir = tmp_path_factory.mktemp("tiny_run")
    run(tiny_cfg("train.steps=6", "eval.num_samples=0", "train.image_intv=0"), run_dir)
    return run_dir


@pytest.fixture(scope="session")
def setup(tiny_run, tmp_path_factory):
    """tiny_run's EVAL_N DDIM samples, a fake reference folder (the first EVAL_N twoscale training images)
    and random Inception weights (read only)."""
    N = EVAL_N
    root = tmp_path_factory.mktemp("eval")
    net = load_network(tiny_run)
    generate_to_folder(net, SamplerSpec(use_ddim=True, steps=5), root / "samples", N, 33, seed=0, device="cpu",
                       grid=4, progress=False)
    ref = root / "reference"  # a tiny fake reference: the first N twoscale training images as PNGs
    ref.mkdir()
    for i, image in enumerate(DatasetImages(tiny_cfg(f"dataset.num_samples={N}")).load(range(N))):
        write_png(ref / f"{i:03d}.png", image)
    weights = random_state_dict(seed=1)
    torch.save(weights, root / "inception.pth")
    return {"root": root, "samples": root / "samples", "ref": ref, "weights": weights,
            "weights_path": root / "inception.pth", "net": net, "run": tiny_run}
