"""What a run reports: ``metrics.jsonl`` lines (optionally mirrored to TensorBoard), sample grids and the
end-of-training ``eval.json``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torchvision.utils import save_image

from .. import dist
from ..atomic import atomic_write
from ..diffusion import ddim_sample
from ..errors import UserError


def append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON line (callers write on rank 0 only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def scalar_fields(record: dict, prefix: str = "") -> list[tuple[str, float]]:
    """The numeric fields of a metrics record as (tag, value): ints and floats as they are, lists and dicts
    flattened to ``name/i`` and ``name/key`` (``loss_per_t_bin/3``); strings, bools and None are left out, as
    is the top-level ``step`` (it is the x-axis)."""
    out = []
    for key, value in record.items():
        tag = f"{prefix}{key}"
        if isinstance(value, bool) or value is None or (not prefix and key == "step"):
            continue
        if isinstance(value, (int, float)):
            out.append((tag, value))
        elif isinstance(value, (list, tuple)):
            out.extend(scalar_fields(dict(enumerate(value)), f"{tag}/"))
        elif isinstance(value, dict):
            out.extend(scalar_fields(value, f"{tag}/"))
    return out


class TensorBoardSink:
    """TensorBoard scalars fed from the ``metrics.jsonl`` records (the jsonl stays the source of truth): each
    record's ``scalar_fields`` at its ``step`` (stored as float32, as TensorBoard scalars are). ``train.tensorboard``
    turns it on; only rank 0 writes, to ``<run_dir>/tensorboard/``.

    ``torch.utils.tensorboard`` is imported here, so only runs that ask for it need the ``tensorboard`` extra;
    constructing the sink checks that it is installed (a UserError at start-up), the event file is opened at the
    first record and closed by ``close`` at the end of training."""

    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError('train.tensorboard = true needs the tensorboard package: pip install -e ".[tensorboard]" '
                            "(or set train.tensorboard=false)") from None
        self.log_dir, self._writer_cls, self.writer = Path(log_dir), SummaryWriter, None

    def write(self, record: dict) -> None:
        if self.writer is None:
            self.writer = self._writer_cls(log_dir=str(self.log_dir))
        for tag, value in scalar_fields(record):
            self.writer.add_scalar(tag, value, global_step=record["step"])
        self.writer.flush()  # one flush per log line: a live TensorBoard sees each line as the jsonl does

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class MetricsLog:
    """Accumulates per-step statistics on the device; ``flush`` reduces them over ranks and writes one line.

    ``loss`` is the training objective: the mean of w(t)·per-sample loss plus the mean of the modes' loss
    terms; ``mse`` is the mean unweighted per-sample diffusion loss (what ``loss_per_t_bin`` bins, and what
    runs with different weightings can be compared on); each loss term (e.g. ``reg``) is also reported.
    Both ``flush`` and ``epoch_summary`` are collectives: every rank calls them at the same steps. Each line
    written to ``path`` also goes to ``sink`` (a ``TensorBoardSink``) when given; ``close`` closes it.
    """

    def __init__(self, path: Path | None, num_bins: int, timesteps: int, device: torch.device,
                 sink: TensorBoardSink | None = None):
        self.path, self.num_bins, self.timesteps, self.device = path, num_bins, timesteps, device
        self.sink = sink
        # [objective_sum, mse_sum, count, grad_norm_sum, steps, bin_loss_sum × bins, bin_count × bins, terms…]
        self.acc = torch.zeros(5 + 2 * num_bins, dtype=torch.float64, device=device)
        # [objective_sum, mse_sum, count, steps, terms…]
        self.epoch_acc = torch.zeros(4, dtype=torch.float64, device=device)
        self.term_names: list[str] | None = None  # fixed at the first step that has terms
        self.t_last = time.perf_counter()

    def add(self, per_sample: torch.Tensor, weights: torch.Tensor | None, t: torch.Tensor,
            grad_norm: torch.Tensor, n: int, terms: dict | None = None) -> None:
        """One step: unweighted per-sample losses [B] with their weights [B] (or None) and timesteps [B]."""
        loss = per_sample.double()
        objective = loss.sum() if weights is None else (loss * weights.double()).sum()
        terms = terms or {}
        if terms and self.term_names is None:
            self.term_names = list(terms)
            extra = torch.zeros(len(terms), dtype=torch.float64, device=self.device)
            self.acc, self.epoch_acc = torch.cat([self.acc, extra]), torch.cat([self.epoch_acc, extra])
        bins = (t * self.num_bins // self.timesteps).clamp_(max=self.num_bins - 1)
        self.acc[0] += objective
        self.acc[1] += loss.sum()
        self.acc[2] += n
        self.acc[3] += grad_norm.double()
        self.acc[4] += 1
        self.acc[5:5 + self.num_bins].index_add_(0, bins, loss)
        self.acc[5 + self.num_bins:5 + 2 * self.num_bins].index_add_(0, bins, torch.ones_like(loss))
        self.epoch_acc[:4] += torch.stack([objective, loss.sum(), loss.new_tensor(float(n)), loss.new_tensor(1.0)])
        if self.term_names:
            values = torch.stack([terms[k].detach().double().reshape(()) for k in self.term_names])
            self.acc[5 + 2 * self.num_bins:] += values
            self.epoch_acc[4:] += values

    def _terms(self, sums: list[float], steps: float) -> dict:
        # every rank adds the same (replicated) term, so the mean divides by the summed step count
        return {k: v / max(steps, 1) for k, v in zip(self.term_names or [], sums, strict=True)}

    def flush(self, **fields) -> dict | None:
        acc = dist.all_reduce_sum(self.acc.clone()).tolist()
        self.acc.zero_()
        now = time.perf_counter()
        elapsed, self.t_last = now - self.t_last, now
        objective, mse, count, gn_sum, steps = acc[:5]
        if count == 0:
            return None
        b = self.num_bins
        terms = self._terms(acc[5 + 2 * b:], steps)
        rec = dict(fields)
        rec.update(loss=objective / count + sum(terms.values()), mse=mse / count, **terms,
                   grad_norm=gn_sum / max(steps, 1), img_per_sec=count / max(elapsed, 1e-9),
                   loss_per_t_bin=[s / c if c else None
                                   for s, c in zip(acc[5:5 + b], acc[5 + b:5 + 2 * b], strict=True)],
                   samples_per_t_bin=[int(c) for c in acc[5 + b:5 + 2 * b]],
                   steps_in_interval=int(steps / dist.world_size()))
        if self.path is not None:
            append_jsonl(self.path, rec)
            if self.sink is not None:
                self.sink.write(rec)
        return rec

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()

    def epoch_summary(self) -> dict[str, float]:
        """Means over the steps since the last call: ``loss`` (objective), ``mse`` and each loss term."""
        acc = dist.all_reduce_sum(self.epoch_acc.clone()).tolist()
        self.epoch_acc.zero_()
        objective, mse, count, steps = acc[:4]
        if not count:
            return {"loss": float("nan")}
        terms = self._terms(acc[4:], steps)
        return {"loss": objective / count + sum(terms.values()), "mse": mse / count, **terms}


@torch.no_grad()
def generate(diffusion, model, x_T: torch.Tensor, steps: int, generator=None) -> torch.Tensor:
    """Samples from noise ``x_T`` [N,C,H,W]: DDIM with ``steps`` steps (η=0), or ancestral when 0."""
    was_training = model.training
    model.eval()
    try:
        if steps > 0:
            return ddim_sample(diffusion, model, x_T, steps=steps, eta=0.0, generator=generator)
        return diffusion.p_sample_loop(model, x_T, generator=generator)
    finally:
        model.train(was_training)


def to_uint8_range(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] model space → [0, 1] quantised to 256 levels, as saved PNGs are."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 255.0


def save_grid(diffusion, model, noise: torch.Tensor, steps: int, path: Path, device, batch_size: int = 256,
              nrow: int | None = None):
    """Sample from fixed ``noise`` and save an image grid at ``path`` (``nrow`` images per row; default square).

    A ``ClassConditioned`` model's labels are sliced along with the noise batches."""
    from ..sampling.guidance import ClassConditioned

    g = torch.Generator(device=device).manual_seed(0)
    out = []
    for i in range(0, len(noise), batch_size):
        part = model if not isinstance(model, ClassConditioned) else \
            ClassConditioned(model.model, model.y[i:i + batch_size], model.guidance)
        out.append(generate(diffusion, part, noise[i:i + batch_size].to(device), steps, g).cpu())
    x = torch.cat(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(to_uint8_range(x), path, nrow=nrow or max(1, int(len(x) ** 0.5)))


@torch.no_grad()
def eval_samples(diffusion, model, shape, num_samples: int, sample_steps: int, seed: int, batch_size: int,
                 device) -> torch.Tensor:
    """uint8 [N, H, W, C]: images 0 … num_samples−1 exactly as ``generate.py --seed seed`` makes them (DDIM with
    ``sample_steps`` steps and η = 0, or ancestral when 0; one noise stream per image), quantised like saved PNGs.
    A class-conditional network samples ``--classes balanced`` (image i has class i mod num_classes), w = 0."""
    from ..sampling import SamplerSpec, sample_batch, to_uint8
    from ..sampling.guidance import image_labels, num_classes_of

    k = num_classes_of(model)

    spec = SamplerSpec(use_ddim=sample_steps > 0, steps=max(sample_steps, 1))
    was_training = model.training
    model.eval()
    try:
        return torch.cat([to_uint8(sample_batch(diffusion, model, spec, batch, seed, shape, device,
                                                labels=image_labels("balanced", batch, k) if k else None))
                          for lo in range(0, num_samples, batch_size)
                          for batch in [range(lo, min(num_samples, lo + batch_size))]])
    finally:
        model.train(was_training)


def sample_oracle_metrics(diffusion, model, dataset, num_samples: int, sample_steps: int, seed: int,
                          batch_size: int, device) -> dict:
    """``eval_samples`` scored with the twoscale oracle metrics."""
    from ..metrics.oracle import twoscale_oracle_metrics
    from ..sampling import from_uint8

    images = eval_samples(diffusion, model, dataset.image_shape, num_samples, sample_steps, seed, batch_size, device)
    return twoscale_oracle_metrics(from_uint8(images), dataset)


def evaluate_samples(cfg, diffusion, model, dataset, device, out_path: Path, step: int) -> dict:
    """Generate ``eval.num_samples`` images and score them with the dataset's metrics and the opt-in
    ``eval.metrics`` (evaluation/extra.py) → ``eval.json``."""
    from ..evaluation.extra import extra_metrics, needs_samples

    n, ev = cfg.eval.num_samples, cfg.eval
    result = {"step": step, "num_samples": n, "sampler": _sampler_name(cfg), "seed": cfg.train.seed,
              "metrics": {}}
    if n == 0 and not ev.metrics:
        return result
    twoscale = cfg.dataset.name == "twoscale"
    if not twoscale and not ev.metrics:
        result["note"] = "no built-in metric for this dataset; use eval.py for FID"
    images = None
    if n and (twoscale or needs_samples(ev)):
        images = eval_samples(diffusion, model, dataset.image_shape if twoscale else _shape(cfg), n,
                              cfg.train.sample_steps, cfg.train.seed, ev.batch_size, device)
    if twoscale and images is not None:
        from ..metrics.oracle import twoscale_oracle_metrics
        from ..sampling import from_uint8

        result["metrics"] = twoscale_oracle_metrics(from_uint8(images), dataset)
    if ev.metrics:
        if n == 0 and needs_samples(ev):
            result["note"] = "eval.num_samples = 0: the sample metrics of eval.metrics were skipped"
        wanted = ev if n or not needs_samples(ev) else _without_sample_metrics(ev)
        result["metrics"].update(extra_metrics(wanted, cfg, diffusion, model, images, cfg.train.seed, device))
    atomic_write(out_path, lambda f: f.write(json.dumps(result, indent=2).encode()))
    dist.print0("eval: " + json.dumps(result["metrics"]))
    return result


def _shape(cfg):
    from .builders import image_shape

    return image_shape(cfg)


def _without_sample_metrics(ev):
    import dataclasses

    from ..evaluation.extra import EXTRA_METRICS

    return dataclasses.replace(ev, metrics=[m for m in ev.metrics if not EXTRA_METRICS[m][1]])


def _sampler_name(cfg) -> str:
    s = cfg.train.sample_steps
    return f"ddim-{s} (eta 0)" if s > 0 else f"ancestral-{cfg.diffusion.timesteps}"
