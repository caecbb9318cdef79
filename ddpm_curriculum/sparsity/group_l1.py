"""Mode CR: Group-L1 regularisation with a per-stage weight λ (seeds 000/001, RegNaiveUnet/RegUNet).

    L_reg = λ·Σ_layers Σ_c ‖W[c, :, :, :]‖₂        over every nn.Conv2d of the network (``conv_weight``)
    L_reg = λ·Σ_layers Σ_c |γ_c|                   over every GroupNorm scale (``norm_scale``, Slimming)

Both are Σ over "groups" = rows of a 2-D view of each tensor (a conv weight as [C_out, C_in·k·k], a GroupNorm
scale as [C, 1]), computed with one vector norm per layer (no Python loop over channels). The loss is
``mse + L_reg/batch_size`` (``reg_over_batch``, seed 001; the *global* batch size, so the result does not
depend on the number of processes) or ``mse + L_reg`` (``reg``, seed 000). ``reg`` in metrics.jsonl is the
term added to the loss, so loss = mse + reg.

Subgradient Adam rarely makes a group exactly zero, and with a GroupNorm right after a conv the penalty on
that conv is largely scale-invariant (it shrinks norms without selecting channels; REFERENCE §3). So every
stage end records the *structured sparsity* in ``structured_sparsity.jsonl`` (``on_stage_end`` returns the
record, the trainer appends it): per layer the share of groups whose norm is below ``threshold`` × the layer's
largest group norm, the total share, and every group norm (for histograms). ``prox: true`` replaces the
penalty's gradient by the proximal step of the same penalty after each optimizer step,
W_c ← W_c·max(0, 1 − lr·λ'/‖W_c‖) (λ' = the loss coefficient of Σ‖W_c‖, lr = that step's learning rate),
which sets weak groups exactly to zero.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import dist
from ..hooks import HookContext, TrainingExtension
from .schedules import stage_lambdas


def conv_groups(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, weight) of every Conv2d; the groups are output channels."""
    return [(name, m.weight) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def norm_scale_groups(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, γ) of every affine GroupNorm; the groups are single channels."""
    return [(name, m.weight) for name, m in model.named_modules() if isinstance(m, nn.GroupNorm) and m.affine]


TARGETS = {"conv_weight": conv_groups, "norm_scale": norm_scale_groups}


def group_rows(weight: torch.Tensor) -> torch.Tensor:
    """The 2-D view whose rows are the groups: [C_out, …] → [C_out, rest] (a 1-D γ → [C, 1])."""
    return weight.reshape(weight.shape[0], -1)


def group_norms(weight: torch.Tensor) -> torch.Tensor:
    """‖W[c]‖₂ of every group c: [C_out, …] → [C_out]."""
    return torch.linalg.vector_norm(group_rows(weight), dim=1)


def group_l1(weights: list[torch.Tensor]) -> torch.Tensor:
    """Σ_layers Σ_c ‖W[c]‖₂ (differentiable scalar)."""
    return torch.stack([group_norms(w).sum() for w in weights]).sum()


@torch.no_grad()
def prox_group_l1_(weights: list[torch.Tensor], threshold: float) -> None:
    """Proximal step of threshold·Σ_c ‖W[c]‖₂, in place: W[c] ← W[c]·max(0, 1 − threshold/‖W[c]‖)."""
    if threshold <= 0:
        return
    for w in weights:
        rows = group_rows(w)
        # a zero row gives 1 − inf = −inf → clamped to 0, and stays zero
        factor = (1.0 - threshold / torch.linalg.vector_norm(rows, dim=1)).clamp_(min=0.0)
        rows.mul_(factor.unsqueeze(1).to(rows.dtype))


@torch.no_grad()
def structured_sparsity(named_weights: list[tuple[str, torch.Tensor]], threshold: float) -> dict:
    """Share of groups with ‖W[c]‖ < threshold·max_c ‖W[c]‖ or exactly zero, per layer and in total (plus every
    norm)."""
    layers, below, total = {}, 0, 0
    for name, w in named_weights:
        norms = group_norms(w.detach().float()).cpu()
        # exact zeros count even when the whole layer is zero (then the relative threshold is 0 too)
        small = int(((norms < threshold * norms.max()) | (norms == 0)).sum()) if norms.numel() else 0
        layers[name] = {"share": small / max(norms.numel(), 1), "norms": norms.tolist()}
        below, total = below + small, total + norms.numel()
    return {"total_share": below / max(total, 1), "groups": total, "layers": layers}


class GroupL1(TrainingExtension):
    """CR: λ per stage, the penalty as a loss term (or a proximal step), structured sparsity at stage ends."""

    name = "group_l1"

    def __init__(self, cfg, model: nn.Module):
        reg = cfg.regularization
        self.named = TARGETS[reg.target](model)
        self.weights = [w for _, w in self.named]
        self.lambdas = stage_lambdas(cfg)
        self.per_batch = reg.combine == "reg_over_batch"
        self.batch_size = cfg.train.batch_size
        self.prox, self.threshold = reg.prox, reg.threshold
        self.lam, self._lr = self.lambdas[0], 0.0

    @property
    def coefficient(self) -> float:
        """λ' such that the loss term is λ'·Σ‖W_c‖."""
        return self.lam / self.batch_size if self.per_batch else self.lam

    def on_stage_start(self, ctx: HookContext, stage) -> dict:
        self.lam = self.lambdas[stage.index]
        dist.print0(f"CR: stage '{stage.name}': λ = {self.lam:.3g}")
        return {"lambda": self.lam}

    def loss_terms(self, ctx: HookContext) -> dict[str, torch.Tensor]:
        if self.lam == 0.0:
            return {"reg": torch.zeros((), device=self.weights[0].device)}
        # with prox the term is only reported; the proximal step minimises it instead of its gradient
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.prox):
            return {"reg": self.coefficient * group_l1(self.weights)}

    def after_backward(self, ctx: HookContext) -> None:
        self._lr = ctx.optimizer.param_groups[0]["lr"]  # the lr of the step about to be taken

    def after_step(self, ctx: HookContext) -> None:
        if self.prox:
            prox_group_l1_(self.weights, self._lr * self.coefficient)

    def on_stage_end(self, ctx: HookContext, stage) -> dict[str, dict]:
        report = structured_sparsity(self.named, self.threshold)
        dist.print0(f"CR: end of '{stage.name}': {report['total_share']:.1%} of {report['groups']} groups below "
                    f"{self.threshold:g}× their layer's largest norm")
        rec = {"step": ctx.step, "stage": stage.name, "stage_index": stage.index, "lambda": self.lam,
               "threshold": self.threshold, **report}
        return {"structured_sparsity.jsonl": rec}  # the trainer appends it (rank 0)

    def log_fields(self, ctx: HookContext) -> dict:
        with torch.no_grad():
            return {"lambda": self.lam, "group_l1": float(group_l1(self.weights))}

    def state_dict(self) -> dict:
        return {"lambda": self.lam}

    def load_state_dict(self, state: dict) -> None:
        self.lam = float(state["lambda"])
