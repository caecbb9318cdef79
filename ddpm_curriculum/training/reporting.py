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
def sample_images(diffusion, model, spec, indices, seed: int, shape, device, batch_size: int,
                  labels=None) -> torch.Tensor:
    """uint8 [N, H, W, C]: images ``indices`` exactly as ``generate.py --seed seed`` makes them with ``spec``
    (``sampling.sample_batch``: one noise stream per image, on ``device``), quantised like saved PNGs; ``labels``
    (one per index) for a class-conditional network. The model is sampled in eval mode."""
    from ..sampling import sample_batch, to_uint8

    indices = list(indices)
    if not indices:
        return torch.empty((0, *shape[1:], shape[0]), dtype=torch.uint8)
    labels = None if labels is None else [int(y) for y in labels]
    was_training = model.training
    model.eval()
    try:
        return torch.cat([to_uint8(sample_batch(diffusion, model, spec, indices[lo:lo + batch_size], seed, shape,
                                                device, labels=None if labels is None else labels[lo:lo + batch_size]))
                          for lo in range(0, len(indices), batch_size)])
    finally:
        model.train(was_training)


def save_grid(diffusion, model, spec, seed: int, num_images: int, image_shape, path: Path, device,
              batch_size: int = 256, nrow: int | None = None, labels=None) -> None:
    """Images 0 … num_images−1 of ``generate.py --seed seed`` with sampler ``spec`` (``sample_images``) as one
    grid PNG at ``path`` (``nrow`` images per row; default square). The same seed gives the same noise every
    time, so grids over training are comparable. ``labels``: the class of each image (conditional networks)."""
    images = sample_images(diffusion, model, spec, range(num_images), seed, image_shape, device, batch_size, labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    # k/255 → save_image's round(·255) gives back k: every tile is generate.py's PNG, byte for byte
    save_image(images.permute(0, 3, 1, 2).float() / 255, path, nrow=nrow or max(1, int(num_images ** 0.5)))


@torch.no_grad()
def eval_samples(diffusion, model, shape, num_samples: int, sampler, seed: int, batch_size: int,
                 device) -> torch.Tensor:
    """uint8 [N, H, W, C]: images 0 … num_samples−1 exactly as ``generate.py --seed seed`` makes them with
    ``sampler``: a ``SamplerSpec`` (``sampling.sampler_spec(cfg)``), or the seeds' ``sample_steps`` integer
    (``spec_from_sample_steps``: DDIM with that many steps and η = 0, or ancestral when 0). A class-conditional
    network samples ``--classes balanced`` (image i has class i mod num_classes), w = 0."""
    from ..sampling import SamplerSpec, spec_from_sample_steps
    from ..sampling.guidance import image_labels, num_classes_of

    spec = sampler if isinstance(sampler, SamplerSpec) else spec_from_sample_steps(sampler)
    k = num_classes_of(model)
    labels = image_labels("balanced", range(num_samples), k) if k else None
    return sample_images(diffusion, model, spec, range(num_samples), seed, shape, device, batch_size, labels)


def sample_oracle_metrics(diffusion, model, dataset, num_samples: int, sampler, seed: int,
                          batch_size: int, device) -> dict:
    """``eval_samples`` (``sampler``: a ``SamplerSpec`` or a ``sample_steps`` integer) scored with the twoscale
    oracle metrics."""
    from ..metrics.oracle import twoscale_oracle_metrics
    from ..sampling import from_uint8

    images = eval_samples(diffusion, model, dataset.image_shape, num_samples, sampler, seed, batch_size, device)
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
                              _spec(cfg), cfg.train.seed, ev.batch_size, device)
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


def _spec(cfg):
    from ..sampling import sampler_spec

    return sampler_spec(cfg)


def _sampler_name(cfg) -> str:
    return _spec(cfg).describe(cfg.diffusion.timesteps)
