"""Seed 003's baseline-loss step (``Maskpro/inference_loss_diffusion.py``): the diffusion loss of the ORIGINAL
(dense) network with the extracted masks applied, over a fixed set of (x0, t, ε), saved as ``.npy`` arrays.

Batch b holds dataset images ``b·B … min((b+1)·B, N) − 1`` (N = ``dataset_size``, at most ``max_batches``
batches); its timesteps t ~ U{0 … T−1} and noise ε ~ N(0, I) come from a CPU generator seeded by
``baseline_seed(seed, b)`` (t first, then ε), so every run and device sees the same draws. The per-sample loss
is ``GaussianDiffusion.training_losses`` (mean over C, H, W of the loss against the target), network in eval
mode (no dropout).

MaskPro here does not read these files: its baseline is *paired*, the loss of the initial masks on the same
batch at every step (``learn.py``), which the seed's precomputed per-batch loss approximates. They exist so
the seed's pipeline can be followed and its numbers compared.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..atomic import atomic_write
from ..errors import UserError
from ..training.sampler import mix_seed

# seed 003's --targets (diffusers block prefixes) → this project's module-name prefixes
TARGETS = {"all": "", "down_blocks": "downsamples.", "up_blocks": "upsamples.", "mid_block": "middle."}
LOSS_FILES = {"batch_losses": "batch_losses.npy", "sample_losses": "sample_losses.npy", "timesteps": "timesteps.npy"}
SUMMARY = "summary.json"
_STREAM = 0xBA5E  # separates this stream from the trainer's (mix_seed's third argument)


def target_masks(masks: dict[str, torch.Tensor], target: str) -> dict[str, torch.Tensor]:
    """The masks of the layers under ``target`` (a key of ``TARGETS``)."""
    if target not in TARGETS:
        raise UserError(f"unknown --targets {target!r}; choose one of {list(TARGETS)}")
    chosen = {k: v for k, v in masks.items() if k.startswith(TARGETS[target])}
    if not chosen:
        raise UserError(f"none of the {len(masks)} masks lies in --targets {target} (layers named "
                        f"'{TARGETS[target]}…'); pick another target or check the mask folder")
    return chosen


def baseline_seed(seed: int, batch: int) -> int:
    return mix_seed(seed, batch, _STREAM)


def batch_draws(seed: int, batch: int, size: int, timesteps: int, image_shape) -> tuple[torch.Tensor, torch.Tensor]:
    """(t [size] int64, ε [size, C, H, W] float32) of batch ``batch``, on the CPU."""
    g = torch.Generator().manual_seed(baseline_seed(seed, batch))
    t = torch.randint(timesteps, (size,), generator=g)
    return t, torch.randn((size, *image_shape), generator=g)


@torch.no_grad()
def baseline_losses(diffusion, model: nn.Module, dataset, dataset_size: int, batch_size: int,
                    max_batches: int | None = None, seed: int = 0, device="cpu") -> dict[str, np.ndarray]:
    """Per-batch mean losses [num_batches], per-sample losses [n] (float64) and their timesteps [n] (int64)."""
    n = min(int(dataset_size), len(dataset))
    if n < 1 or batch_size < 1 or (max_batches is not None and max_batches < 1):
        raise UserError(f"--dataset_size ({dataset_size}, dataset has {len(dataset)}), --batch_size ({batch_size}) "
                        f"and --max_batches ({max_batches}) must all be ≥ 1")
    num_batches = -(-n // batch_size)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    model.eval()
    losses, steps, means = [], [], []
    for b in range(num_batches):
        idx = range(b * batch_size, min((b + 1) * batch_size, n))
        x0 = torch.stack([dataset[i][0] for i in idx])
        t, noise = batch_draws(seed, b, len(idx), diffusion.timesteps, x0.shape[1:])
        loss = diffusion.training_losses(model, x0.to(device), t.to(device), noise.to(device)).double().cpu()
        losses.append(loss)
        steps.append(t)
        means.append(loss.mean())
    return {"batch_losses": torch.stack(means).numpy(), "sample_losses": torch.cat(losses).numpy(),
            "timesteps": torch.cat(steps).numpy()}


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def save_loss_arrays(out_dir: str | Path, arrays: dict[str, np.ndarray], info: dict) -> dict:
    """``batch_losses.npy``, ``sample_losses.npy``, ``timesteps.npy`` and ``summary.json`` (statistics + ``info``)."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {out} ({exc.strerror or exc}); choose a writable --output_dir") from None
    for key, name in LOSS_FILES.items():
        data = _npy_bytes(arrays[key])
        atomic_write(out / name, lambda f, d=data: f.write(d))
    s = arrays["sample_losses"]
    summary = {**info, "num_batches": len(arrays["batch_losses"]), "num_samples": len(s),
               "mean": float(s.mean()), "std": float(s.std()), "min": float(s.min()), "max": float(s.max()),
               "files": dict(LOSS_FILES)}
    text = json.dumps(summary, indent=2) + "\n"
    atomic_write(out / SUMMARY, lambda f: f.write(text.encode()))
    return summary
