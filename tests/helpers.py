"""Plain helpers shared by the test modules (tiny configs, in-process training, script runners, a 2-process
gloo spawn, fake data, model utilities). The fixtures built on them are in conftest.py. Test modules import
from here, never from each other."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from ddpm_curriculum.config import config_from_dict
from ddpm_curriculum.data.images import CELEBA_CROP
from ddpm_curriculum.models import UNet
from ddpm_curriculum.training import CurriculumTrainer

try:
    import diffusers
except ImportError:  # the agreement tests need the `test` extra
    diffusers = None
needs_diffusers = pytest.mark.skipif(diffusers is None, reason="diffusers is not installed")

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")

# ------------------------------------------------------------------------------- the tiny twoscale run

# 64 samples at global batch 8 → 8 steps per epoch; stage 1 (high noise) lasts 5 steps.
TINY = {
    "dataset": {"name": "twoscale", "image_size": 8, "num_samples": 64, "k1": 2, "k2": 2},
    "diffusion": {"timesteps": 100},
    "model": {"hid_channels": 32, "ch_multipliers": [1, 2], "num_res_blocks": 1,
              "apply_attn": [False, True], "drop_rate": 0.1},
    "train": {"steps": 14, "batch_size": 8, "lr": 1e-3, "warmup": 3, "ema_decay": 0.9, "log_intv": 2,
              "num_samples": 4, "image_intv": 1, "chkpt_intv": 1, "sample_steps": 3, "keep_checkpoints": 0},
    "curriculum": {"enabled": True, "stages": [{"t_min": 0.8, "t_max": 1.0, "steps": 5, "name": "high"},
                                               {"t_min": 0.0, "t_max": 1.0, "steps": 1, "name": "full"}]},
    "eval": {"num_samples": 16},
}

def tiny_cfg(*overrides):
    return config_from_dict(TINY, list(overrides))

def run(cfg, run_dir, **kw):
    trainer = CurriculumTrainer(cfg, run_dir, CPU, progress=False, **kw)
    trainer.train()
    return trainer

def assert_same_state(a: CurriculumTrainer, b: CurriculumTrainer, exact=True, atol=0.0):
    for name, x, y in [("model", a.model.state_dict(), b.model.state_dict()),
                       ("ema", a.ema.state_dict(), b.ema.state_dict())]:
        for k in x:
            if exact:
                assert torch.equal(x[k], y[k]), f"{name}.{k} differs"
            else:
                torch.testing.assert_close(x[k], y[k], atol=atol, rtol=0, msg=f"{name}.{k} differs")

def write_tiny(tmp_path, **train):
    cfg = json.loads(json.dumps(TINY))
    cfg["train"].update(train)
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(cfg))
    return path

# mode prune on TINY: a few MaskPro steps, no evaluation
PRUNE = ["maskpro.enabled=true", "eval.num_samples=0", "train.num_samples=0", "train.steps=8", "train.log_intv=1",
         "train.warmup=0", "model.drop_rate=0.0"]


THREE_STAGES = ('curriculum.stages=[{"t_min": 0.8, "t_max": 1.0, "steps": %d, "name": "high"}, '
                '{"t_min": 0.4, "t_max": 1.0, "steps": %d, "name": "mid"}, '
                '{"t_min": 0.0, "t_max": 1.0, "steps": 1, "name": "full"}]')

def cs_cfg(*overrides, stage_steps=5, steps=14):
    """TINY (64-channel bottleneck) in mode CS: 16 → 32 → 64 active channels over three stages."""
    return tiny_cfg("eval.num_samples=0", "train.num_samples=0", f"train.steps={steps}",
                    THREE_STAGES % (stage_steps, stage_steps), "sparsity.enabled=true", "sparsity.schedule=list",
                    "sparsity.per_stage=[0.75, 0.5, 0.0]", *overrides)


# ------------------------------------------------------------------------------- subprocesses


def run_script(*args, timeout=300, env=None, cwd=ROOT):
    """``python *args`` (a script of the repository, or ``-m module``) in ``cwd`` at one thread: the
    CompletedProcess (returncode, stdout, stderr as text)."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def train_script(*args, timeout=300, env=None, cwd=ROOT):
    """``python train_curriculum.py *args`` at one thread (see :func:`run_script`)."""
    return run_script(str(ROOT / "train_curriculum.py"), *args, timeout=timeout, env=env, cwd=cwd)


def ddp_spawn(worker, *args, world=2):
    """Run ``worker(rank, *args)`` in ``world`` spawned processes joined in one gloo group (one thread
    each), and wait for them. ``worker`` must be a module-level function (it is pickled by name)."""
    import torch.multiprocessing as mp

    from ddpm_curriculum.dist import free_port

    mp.spawn(_ddp_entry, args=(worker, world, free_port(), args), nprocs=world, join=True)


def _ddp_entry(rank, worker, world, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    from ddpm_curriculum import dist

    torch.set_num_threads(1)
    dist.init("cpu")
    try:
        worker(rank, *args)
    finally:
        dist.cleanup()


# ------------------------------------------------------------------------------- models

CIFAR10 = dict(in_channels=3, hid_channels=128, ch_multipliers=(1, 2, 2, 2), num_res_blocks=2,
               apply_attn=(False, True, False, False), drop_rate=0.1)


def tiny(**kw) -> UNet:
    cfg = dict(hid_channels=32, ch_multipliers=(1, 2), num_res_blocks=2, apply_attn=(False, True))
    cfg.update(kw)
    return UNet(**cfg)


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter a generic non-zero value (unit-scale weights, non-zero biases and norm affines).

    The real init zeroes (≈1e-10 scale) the last conv of each block and the output conv, which makes the
    network almost constant; equivalence tests on such a model would prove little.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim > 1:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
        elif "norm" in name and name.endswith("weight") or name == "out_conv.0.weight":
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def inputs(batch=2, size=16, channels=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, size, size, generator=gen), torch.randint(0, 1000, (batch,), generator=gen)


# hid 32 with multipliers (1, 2): a 64-channel bottleneck; attention at the deepest level makes the first up
# block a ResAttnBlock, the harder case for finding the consumer.
KW = dict(in_channels=3, hid_channels=32, ch_multipliers=(1, 2), num_res_blocks=1, apply_attn=(False, True),
          norm_groups=16)


# ------------------------------------------------------------------------------- diffusion

PRED_TYPES = ["eps", "x0", "v"]


DIFFUSERS_PRED = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def closed_alpha_bar(betas):
    """ᾱ_t = ∏_{s≤t}(1 − β_s) by an explicit float64 loop (independent of the package's cumprod)."""
    out, acc = [], 1.0
    for b in betas:
        acc *= 1.0 - float(b)
        out.append(acc)
    return np.array(out)


class Oracle:
    """A perfect network for one x0 [B, …]: returns the exact ε, x0 or v of whatever x_t it is given."""

    def __init__(self, x0, betas, prediction_type):
        self.x0, self.pred = x0, prediction_type
        self.alpha_bar = torch.from_numpy(closed_alpha_bar(betas))

    def __call__(self, x_t, t):
        a = self.alpha_bar.to(x_t.dtype)[t].view(-1, *([1] * (x_t.dim() - 1)))
        eps = (x_t - a.sqrt() * self.x0) / (1 - a).sqrt()
        return {"eps": eps, "x0": self.x0, "v": a.sqrt() * eps - (1 - a).sqrt() * self.x0}[self.pred]


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def float64_scheduler(cls, diffusion, **kwargs):
    """A diffusers scheduler whose ᾱ is replaced by ours in float64, so only the step math is compared."""
    sched = cls(num_train_timesteps=diffusion.timesteps, trained_betas=diffusion.betas.tolist(),
                clip_sample=False, **kwargs)
    sched.alphas_cumprod = torch.from_numpy(diffusion.alphas_bar)
    sched.one = torch.tensor(1.0, dtype=torch.float64)
    return sched


# ------------------------------------------------------------------------------- data, grids

EVAL_N = 66  # tests/test_eval.py's sample count: just above the 64 feature dims, so both covariances are full rank


def make_fake_celeba(root, n=3, partition=True):
    folder = root / "img_align_celeba"
    folder.mkdir(parents=True)
    top, left, h, w = CELEBA_CROP
    for i in range(n):
        img = np.zeros((218, 178, 3), dtype=np.uint8)
        img[:, :] = (255, 0, 0)  # outside the crop: red
        img[top:top + h, left:left + w] = (0, 40 * i, 255)  # inside: blue-ish
        Image.fromarray(img).save(folder / f"{i + 1:06d}.jpg", quality=95)
    if partition:
        (root / "list_eval_partition.txt").write_text("".join(f"{i + 1:06d}.jpg {0 if i < n - 1 else 2}\n"
                                                              for i in range(n)))


def write_grid(tmp_path, **changes):
    cfg = json.loads(json.dumps(TINY))
    cfg["train"].update(steps=6, num_samples=0)
    cfg["curriculum"]["stages"][0]["steps"] = 2
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    cfg["curriculum"]["enabled"] = False
    (tmp_path / "base.json").write_text(json.dumps(cfg))
    grid = {"_comment": "tiny", "base_config": str(tmp_path / "c.json"),
            "arms": [{"name": "baseline", "config": str(tmp_path / "base.json")}, {"name": "C"}],
            "seeds": [0, 1], "eval_at": [0.5, 1.0],
            "eval": {"num_samples": 8, "sample_steps": 2, "val_samples": 16},
            "quick": {"seeds": [3], "set": ["train.steps=4"]}}
    grid.update(changes)
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(grid))
    return path
