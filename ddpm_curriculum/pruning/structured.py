"""Structured (channel) pruning with Torch-Pruning: a smaller dense UNet, not a masked one.

Torch-Pruning (``torch-pruning`` on PyPI, the ``prune`` extra; imported only here, lazily) traces the network
into a dependency graph and removes *coupled* channel groups together: a residual block's output channels
with every tensor added to them (identity skips, attention residuals), the channels a skip concatenation
carries into the up-path convolution that reads it, the GroupNorm over them and the time projection ``fc``
added before ``norm2``. No pass is written by hand here. Channels under a GroupNorm are removed at the same
positions in every GroupNorm group (Torch-Pruning's channel groups), so every group keeps the same number of
channels and the group count stays valid; the remaining widths are multiples of the group count.

What is never pruned: the output channels of the protected layers (``masks.DEFAULT_PROTECT``, the same as
magnitude pruning: ``in_conv``, ``out_conv``, the time-embedding MLP ``embed``, a class embedding) and so of
every layer coupled to them (``in_conv`` fixes the level-0 residual stream it starts), the network's output
conv (its outputs are the image channels), and the q/k/v width of self-attention: ``project_in``'s outputs
and ``project_out``'s inputs. The attention block's residual width is pruned with its stream. (Pruning q/k
would also change the softmax temperature 1/√C; Torch-Pruning's graph does not follow this block's
flattened-token attention either.)

Criteria (``CRITERIA``): ``magnitude`` (L1 or L2 norm of each channel group's weights), ``taylor``
(Diff-Pruning, Fang et al. 2023: first-order Taylor |w·∂L/∂w| of the diffusion loss, with the gradient summed
over timesteps t = 0, 1, 2, … on one calibration batch and a fixed noise, stopping at the first t whose loss
falls below ``threshold`` × the largest loss so far: only the early, low-noise steps that carry the content
count; 0.05 as in Diff-Pruning), ``random`` (seeded control). ``pruning_ratio`` is the share of each group's
channels removed (``scope="global"`` ranks all groups together instead); parameters and MACs shrink roughly
by (1 − ratio)² in the layers pruned on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UserError
from .masks import DEFAULT_PROTECT, _compile

SCOPES = ("layer", "global")
DEFAULT_TAYLOR_THRESHOLD = 0.05  # Diff-Pruning's --thr


def require_torch_pruning():
    """The ``torch_pruning`` module, or a one-line UserError saying how to install it."""
    try:
        import torch_pruning
    except ImportError:
        raise UserError("structured pruning needs Torch-Pruning, which is not installed: "
                        "pip install -e '.[prune]' (or pip install torch-pruning)") from None
    return torch_pruning


# ------------------------------------------------------------------------------------------ criteria


def _magnitude(tp, opts):
    return tp.importance.GroupMagnitudeImportance(p=opts.norm)


def _taylor(tp, opts):
    return tp.importance.GroupTaylorImportance()


def _random(tp, opts):
    return tp.importance.RandomImportance()


@dataclass(frozen=True)
class Criterion:
    importance: object  # (torch_pruning, options) → a tp importance estimator
    needs_gradients: bool
    doc: str


CRITERIA = {
    "magnitude": Criterion(_magnitude, False, "L1/L2 norm of each coupled channel group's weights (--norm)"),
    "taylor": Criterion(_taylor, True, "Diff-Pruning: |w·∂L/∂w| of the diffusion loss over early timesteps"),
    "random": Criterion(_random, False, "uniformly random channels (seeded control)"),
}


@dataclass
class StructuredOptions:
    pruning_ratio: float = 0.5
    criterion: str = "magnitude"
    norm: int = 2  # magnitude: L1 or L2
    scope: str = "layer"
    protect: tuple = DEFAULT_PROTECT
    seed: int = 0

    def check(self) -> None:
        if not 0.0 <= self.pruning_ratio < 1.0:
            raise UserError(f"--pruning_ratio {self.pruning_ratio} must be in [0, 1) (the share of each channel "
                            f"group removed)")
        if self.criterion not in CRITERIA:
            raise UserError(f"unknown structured criterion {self.criterion!r}; choose one of {sorted(CRITERIA)}")
        if self.norm not in (1, 2):
            raise UserError(f"--norm {self.norm}: the magnitude criterion takes the L1 or L2 norm (1 or 2)")
        if self.scope not in SCOPES:
            raise UserError(f"unknown scope {self.scope!r}; choose one of {list(SCOPES)}")


@dataclass
class StructuredResult:
    """What was removed: ``kept[name] = {"out": [...], "in": [...]}`` original indices kept per pruned layer
    (a dimension that was not pruned is absent); GroupNorms list their kept channels under ``"out"``."""

    kept: dict = field(default_factory=dict)
    ignored: list = field(default_factory=list)


# ------------------------------------------------------------------------------------------ pruning


def protected_modules(model: nn.Module, protect=DEFAULT_PROTECT) -> dict[str, nn.Module]:
    """Modules whose output channels stay: ``protect`` regexes on Conv2d/Linear names, the last Conv2d/Linear
    (the output layer) and every attention ``project_in`` (q/k/v width)."""
    from ..models import AttentionBlock

    regexes = _compile(protect, "protect")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    out = {n: m for n, m in layers if any(r.search(n) for r in regexes)}
    out[layers[-1][0]] = layers[-1][1]
    for name, m in model.named_modules():
        if isinstance(m, AttentionBlock):
            out[f"{name}.project_in"] = m.project_in
    return out


def diffusion_loss_gradients(model: nn.Module, diffusion, x0: torch.Tensor, threshold: float = DEFAULT_TAYLOR_THRESHOLD,
                             generator: torch.Generator | None = None) -> list[float]:
    """Diff-Pruning's gradient: Σ_t ∂L_t/∂w accumulated in ``.grad`` for t = 0, 1, 2, … until
    L_t < ``threshold`` · max_{s≤t} L_s (or t = T−1). One batch ``x0`` [B, C, H, W] and one noise draw for
    every t; eval mode (no dropout). Returns the losses L_0, L_1, … of the timesteps used."""
    if not 0.0 < threshold <= 1.0:
        raise UserError(f"--taylor_threshold {threshold} must be in (0, 1] (Diff-Pruning uses 0.05)")
    model.eval()
    model.zero_grad(set_to_none=True)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    losses, loss_max = [], 0.0
    for t in range(diffusion.timesteps):
        tt = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
        loss = diffusion.training_losses(model, x0, tt, noise).mean()
        loss.backward()
        losses.append(loss.item())
        loss_max = max(loss_max, losses[-1])
        if losses[-1] < threshold * loss_max:
            break
    return losses


def _record(kept: dict, names: dict, group, is_out) -> None:
    """Remove from ``kept[name][dim]`` (original indices still present) the channels a Torch-Pruning group
    removes. A group's indices number the layer as it is now: a concatenation consumer (an up-path
    ``norm1``/``conv1``/``skip``) is cut by two groups, the second numbering it after the first's cut."""
    for dep, idxs in group.items:
        module = dep.target.module
        if id(module) not in names:  # an operation node (add, concat, split), not a layer
            continue
        name = names[id(module)]
        if isinstance(module, nn.GroupNorm) or is_out(dep.handler):
            dim, width = "out", module.weight.shape[0]
        else:
            dim, width = "in", module.weight.shape[1]
        alive = kept.setdefault(name, {}).setdefault(dim, list(range(width)))
        removed = {int(i) for i in idxs}
        alive[:] = [a for pos, a in enumerate(alive) if pos not in removed]


def structured_prune(model: nn.Module, example_inputs: tuple, opts: StructuredOptions,
                     gradients=None) -> StructuredResult:
    """Remove channel groups of ``model`` in place; returns which original channels each layer kept.

    ``example_inputs`` = (x [1, C, H, W], t [1]) for tracing. ``gradients()``: called before ranking when
    the criterion needs gradients (it fills ``.grad``, e.g. ``diffusion_loss_gradients``).
    """
    opts.check()
    tp = require_torch_pruning()
    crit = CRITERIA[opts.criterion]
    ignored = protected_modules(model, opts.protect)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(opts.seed)  # the random criterion draws from the global RNG
        pruner = tp.pruner.MetaPruner(model, example_inputs, importance=crit.importance(tp, opts),
                                      pruning_ratio=opts.pruning_ratio, global_pruning=opts.scope == "global",
                                      ignored_layers=list(ignored.values()))
        if crit.needs_gradients:
            if gradients is None:
                raise UserError(f"criterion {opts.criterion!r} needs the diffusion loss's gradients")
            gradients()
        names = {id(m): n for n, m in model.named_modules()}
        result = StructuredResult(ignored=sorted(ignored))
        for group in pruner.step(interactive=True):
            _record(result.kept, names, group, pruner.DG.is_out_channel_pruning_fn)
            group.prune()
    model.zero_grad(set_to_none=True)
    for name, m in model.named_modules():
        if isinstance(m, nn.GroupNorm) and m.num_channels % m.num_groups:
            raise UserError(f"structured pruning left GroupNorm '{name}' with {m.num_channels} channels for "
                            f"{m.num_groups} groups; lower --pruning_ratio or use --scope layer")
    return result



# ---------------------------------------------------------------------------- a loaded network


def calibration_batch(cfg, count: int, seed: int = 0) -> torch.Tensor:
    """``count`` training images of the network's dataset (seeded choice): the batch Taylor scores use."""
    from ..training import builders

    data = builders.make_dataset(cfg)
    if count < 1:
        raise UserError(f"--calib_samples {count} must be ≥ 1")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data), generator=g)[:count].tolist()
    items = [data[i] for i in idx]
    return torch.stack([it[0] if isinstance(it, (tuple, list)) else it for it in items])


def prune_network(net, opts: StructuredOptions, calibration: torch.Tensor | None = None,
                  taylor_threshold: float = DEFAULT_TAYLOR_THRESHOLD) -> tuple[nn.Module, dict, dict]:
    """Structurally prune a ``LoadedNetwork`` → (smaller model, its config dict with ``model.widths``, stats).

    The config records every layer width that differs from the unpruned build, so ``load_network`` and
    training rebuild this architecture from the config alone (``models/widths.py``).
    """
    from ..config import config_from_dict
    from ..models.widths import changed_widths, layer_widths
    from ..training import builders
    from .cost import count_macs

    cfg = net.config
    if cfg.sparsity.enabled or cfg.model.name != "unet":
        raise UserError(f"structured pruning supports the plain UNet (model.name 'unet', no mode CS gate); "
                        f"{net.source} is a {cfg.model.name!r} network" + (" with a sparsity gate" if
                                                                          cfg.sparsity.enabled else ""))
    model = net.model.cpu().to(memory_format=torch.contiguous_format)
    shape = builders.image_shape(cfg)
    example = (torch.zeros((1, *shape)), torch.zeros((1,), dtype=torch.long))
    before = {"params": sum(p.numel() for p in model.parameters()), "macs": count_macs(model, shape)}
    widths_before = layer_widths(model)
    losses = []

    def gradients():
        if calibration is None:
            raise UserError("the taylor criterion needs calibration images")
        losses.extend(diffusion_loss_gradients(model, net.diffusion, calibration, taylor_threshold,
                                               torch.Generator().manual_seed(opts.seed)))

    result = structured_prune(model, example, opts, gradients)
    raw = cfg.to_dict()
    raw["model"]["widths"] = None
    reference = builders.make_model(config_from_dict(raw))
    raw["model"]["widths"] = changed_widths(model, reference) or None
    after = {"params": sum(p.numel() for p in model.parameters()), "macs": count_macs(model, shape)}
    widths_after = layer_widths(model)
    stats = {"method": "structured", "criterion": opts.criterion, "pruning_ratio": opts.pruning_ratio,
             "scope": opts.scope, "norm": opts.norm if opts.criterion == "magnitude" else None,
             "seed": opts.seed, "source": str(net.source), "weights": net.weights,
             "not_pruned": result.ignored, "before": before, "after": after,
             "params_ratio": after["params"] / before["params"], "macs_ratio": after["macs"] / before["macs"],
             "layers": {n: {"before": widths_before[n], "after": w} for n, w in widths_after.items()
                        if widths_before[n] != w},
             "taylor": None if opts.criterion != "taylor" else {
                 "threshold": taylor_threshold, "timesteps_used": len(losses), "losses": losses,
                 "calib_samples": int(calibration.shape[0])}}
    return model, raw, stats

