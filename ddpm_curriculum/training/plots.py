"""Figures of a run directory (``scripts/plot_run.py RUN_DIR``), written to ``RUN_DIR/plots/``:

    loss.png            loss (and mse / reg when they differ) against the step, stage starts as lines
    loss_per_t_bin.png  the per-timestep-bin loss over training as a heatmap (log colour scale)
    channels.png        CS: active bottleneck channels over training and the stage each channel was born in
    channel_norms.png   CR: per layer, histograms of the group norms ‖W_c‖ at the end of every stage

Reads ``metrics.jsonl``, ``transitions.jsonl`` and ``structured_sparsity.jsonl``. Needs matplotlib
(``pip install -e ".[plot]"``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..config import read_jsonl
from ..errors import UserError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError('plotting needs matplotlib; install it with: pip install -e ".[plot]"') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the figures that apply to this run; returns their paths."""
    run_dir = Path(run_dir)
    metrics = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]  # not the skipped-step notes
    if not metrics:
        raise UserError(f"{run_dir / 'metrics.jsonl'} is missing or empty; pass a run directory written by "
                        f"train_curriculum.py")
    plt = _pyplot()
    out = Path(out_dir) if out_dir else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    transitions = read_jsonl(run_dir / "transitions.jsonl")
    starts = [(r["step"], r["stage"]) for r in transitions if r["step"] > 0]
    files = [_loss(plt, metrics, starts, out / "loss.png"), _t_bins(plt, metrics, starts, out / "loss_per_t_bin.png")]
    if any("active_channels" in r for r in metrics):
        files.append(_channels(plt, metrics, transitions, starts, out / "channels.png"))
    norms = read_jsonl(run_dir / "structured_sparsity.jsonl")
    if norms:
        files.append(_channel_norms(plt, norms, out / "channel_norms.png"))
    return files


def _stage_lines(ax, starts) -> None:
    for step, name in starts:
        ax.axvline(step, color="0.6", linestyle="--", linewidth=0.8)
        ax.text(step, 1.0, f" {name}", transform=ax.get_xaxis_transform(), fontsize=7, va="top", rotation=90)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    fig.clf()
    return path


def _loss(plt, metrics, starts, path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps = [r["step"] for r in metrics]
    ax.plot(steps, [r["loss"] for r in metrics], label="loss")
    mse = [r.get("mse", r["loss"]) for r in metrics]
    if not np.allclose(mse, [r["loss"] for r in metrics]):
        ax.plot(steps, mse, label="mse")
    if any(r.get("reg") for r in metrics):
        ax.plot(steps, [r.get("reg", 0.0) for r in metrics], label="reg")
    ax.set(xlabel="step", ylabel="loss", yscale="log", title="training loss (stage starts dashed)")
    ax.legend()
    _stage_lines(ax, starts)
    return _save(fig, path)


def _t_bins(plt, metrics, starts, path) -> Path:
    grid = np.array([[np.nan if v is None else v for v in r["loss_per_t_bin"]] for r in metrics], dtype=float).T
    steps = [r["step"] for r in metrics]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    finite = grid[np.isfinite(grid) & (grid > 0)]
    from matplotlib.colors import LogNorm

    norm = LogNorm(vmin=finite.min(), vmax=finite.max()) if finite.size else None
    mesh = ax.pcolormesh(_edges(steps), np.arange(grid.shape[0] + 1) / grid.shape[0], np.ma.masked_invalid(grid),
                         norm=norm, shading="flat", cmap="viridis")
    fig.colorbar(mesh, ax=ax, label="mean loss in the bin")
    ax.set(xlabel="step", ylabel="t / T (bin)", title="loss per timestep bin (blank = not trained)")
    _stage_lines(ax, starts)
    return _save(fig, path)


def _edges(steps: list[int]) -> np.ndarray:
    """Cell edges for log lines at ``steps`` (each line covers the steps since the previous one)."""
    return np.array([0] + list(steps), dtype=float)


def _channels(plt, metrics, transitions, starts, path) -> Path:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    rows = [r for r in metrics if "active_channels" in r]
    ax1.step([r["step"] for r in rows], [r["active_channels"] for r in rows], where="post")
    ax1.set(xlabel="step", ylabel="active bottleneck channels", title="active channels")
    _stage_lines(ax1, starts)
    total = next((r["channels"] for r in transitions if "channels" in r), None)
    birth = np.full(total or 0, np.nan)
    for r in transitions:
        for c in r.get("regrown", []):
            birth[c] = r["stage_index"] + 1
    ax2.bar(np.arange(len(birth)), np.nan_to_num(birth), width=1.0)
    ax2.set(xlabel="channel", ylabel="birth stage (1 = initially active, 0 = never)",
            title="stage in which each channel became active")
    return _save(fig, path)


def _channel_norms(plt, records, path) -> Path:
    layers = list(records[0]["layers"])
    cols = math.ceil(math.sqrt(len(layers)))
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 1.9 * rows), squeeze=False)
    for ax, name in zip(axes.flat, layers, strict=False):
        for rec in records:
            norms = np.asarray(rec["layers"][name]["norms"], dtype=float)
            ax.hist(np.log10(np.maximum(norms, 1e-12)), bins=20, histtype="step", label=rec["stage"])
        ax.set_title(name, fontsize=6)
        ax.tick_params(labelsize=5)
    for ax in axes.flat[len(layers):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=5)
    fig.suptitle("log10 channel norms per layer at each stage end")
    return _save(fig, path)
