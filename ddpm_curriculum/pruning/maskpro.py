"""MaskPro for diffusion: N:M masks learned by policy gradient, with a paired baseline (REFERENCE §4).

Notation per N:M group of M weights: logits z [M] (float32, a buffer: never trained by backprop), position
probabilities p = softmax(z). A mask keeps N distinct positions S drawn **without replacement** from p
(Plackett–Luce; Gumbel-top-N is the same distribution). For an ordering σ of S,

    P_σ = Π_{k=0}^{N−1} p_{σ_k} / R_k,    R_k = Σ_{i ∈ Rem_k} p_i,   Rem_k = positions not in σ_0..σ_{k−1}

and P(S) = Σ_σ P_σ over the N! orderings. Its score function, used by the update, is

    ∂ log P_σ / ∂z_i = [i ∈ S] − p_i · Σ_k [i ∈ Rem_k] / R_k,
    ∇ log P(S) = Σ_σ (P_σ / P(S)) · ∇ log P_σ

(for N = 2 the reference's closed form P({i, j}) = p_i p_j (1/(1−p_i) + 1/(1−p_j)) is differentiated
directly). R_k is computed as a sum of the remaining probabilities, never as 1 − (sum of chosen ones), so
peaked logits do not cancel to 0.

One update per minibatch b, with all layers' masks sampled jointly (log P of the whole network's mask is
the sum over groups, so each group's logits get their own score):

    r = L(sampled masks; b) − L(initial masks; b)     both on the SAME (x0, t, ε): the paired baseline
    δ ← β·δ + (1 − β)·r
    z ← z − lr·(r − δ)·∇_z log P(sampled)

Defaults lr = 50, logit magnitude c = 10 (initial logits = initial mask · c), β = 0.99. The final mask is
the top-N logits of each group. Groups are processed as tensors (no Python loop over groups); the float64
score is computed in chunks of groups to bound its temporary memory.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .masks import DEFAULT_PROTECT, select_layers, sparsity_summary
from .nm import (check_nm, kept_per_group, nm_eligible, nm_groups, nm_mask, nm_ungroup, positions_to_groups,
                 top_n_positions)

DEFAULT_LR, DEFAULT_LOGITS_MAGNITUDE, DEFAULT_BETA = 50.0, 10.0, 0.99
# How to get a mask MaskPro can start from. MaskPro learns N:M masks only: it keeps exactly N of every group
# of M, so an unstructured mask (seed 003 starts from a 30% magnitude prune) has no N:M distribution to start at.
NM_INITIAL_MASK_HINT = ("MaskPro learns N:M masks and starts from exact {n}:{m} masks, not unstructured ones (such as "
                        "a magnitude/random --pruning_ratio prune): make them from the dense network with "
                        "prune.py --method nm --n {n} --m {m} --model_path DENSE --save_path DIR and set "
                        "maskpro.masks=DIR/masks.pt (without maskpro.masks each layer starts from its {n}:{m} "
                        "magnitude mask)")
GENERAL_N_CHUNK = 1 << 16  # groups per chunk of the N! orderings tensor [chunk, N!, N] (float64)
PAIR_CHUNK = 1 << 20  # groups per chunk of the N = 2 closed form ([chunk, M] float64 temporaries)


# ----------------------------------------------------------------------------------- distribution


def gumbel_top_n(logits: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample N distinct positions per group from softmax(logits) without replacement.

    logits [G, M] → positions [G, N] (ascending). argtop-N of z + Gumbel noise equals sequential sampling
    without replacement (Plackett–Luce).
    """
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
    gumbel = -torch.log(-torch.log(u.clamp_(1e-20, 1.0 - 1e-7)))
    return top_n_positions(logits.float() + gumbel, n)


def _orderings(n: int, device) -> torch.Tensor:
    return torch.tensor(list(itertools.permutations(range(n))), dtype=torch.long, device=device)  # [N!, N]


def _ordering_terms(logits: torch.Tensor, positions: torch.Tensor):
    """float64 pieces shared by log P and its gradient for one chunk.

    Returns p [G, M], p_S [G, N], perms [P, N], log P_σ [G, P], 1/R_k [G, P, N] (R along each ordering).
    """
    logp = torch.log_softmax(logits.double(), dim=1)
    p = logp.exp()
    p_s = p.gather(1, positions)  # [G, N]
    not_s = torch.ones_like(p, dtype=torch.bool).scatter_(1, positions, False)
    outside = (p * not_s).sum(1, keepdim=True)  # Σ_{i∉S} p_i, summed from the non-chosen entries
    perms = _orderings(positions.shape[1], logits.device)
    p_sigma = p_s[:, perms]  # [G, P, N]
    # R_k = Σ_{i∉S} p_i + Σ_{j≥k} p_{σ_j}: remaining mass before picking σ_k (a reverse cumulative sum)
    rem = p_sigma.flip(-1).cumsum(-1).flip(-1) + outside[:, :, None]
    log_p_sigma = (logp.gather(1, positions)[:, perms] - rem.log()).sum(-1)  # [G, P]
    return p, p_s, perms, log_p_sigma, 1.0 / rem


def plackett_luce_log_prob(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """log P(S) of the unordered sets S = ``positions`` [G, N] under softmax(``logits`` [G, M]) → [G] float64
    (log-sum over the N! orderings)."""
    return torch.logsumexp(_ordering_terms(logits, positions)[3], dim=1)


def _grad_general(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    p, p_s, perms, log_p_sigma, inv_rem = _ordering_terms(logits, positions)
    w = torch.softmax(log_p_sigma, dim=1)  # P_σ / P(S), [G, P]
    # i ∉ S is in every Rem_k: score −p_i Σ_k 1/R_k
    grad = -p * (w * inv_rem.sum(-1)).sum(1, keepdim=True)
    # i = σ_j ∈ S is in Rem_0..Rem_j: score 1 − p_i Σ_{k≤j} 1/R_k; map ordering slots back to S's slots
    cum = inv_rem.cumsum(-1)  # [G, P, N], indexed by ordering slot j
    slot_of = torch.argsort(perms, dim=1)  # where each S slot sits in the ordering
    cum_by_slot = cum.gather(2, slot_of[None].expand(cum.shape[0], -1, -1))  # [G, P, N] by S slot
    chosen = 1.0 - p_s * (w[:, :, None] * cum_by_slot).sum(1)
    return grad.scatter(1, positions, chosen)


def _grad_pair(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """N = 2 closed form. With q_i = 1 − p_i, log P({i, j}) = log p_i + log p_j + log(1/q_i + 1/q_j), so

        ∇ = (1 + α)·e_i + (1 + β)·e_j − (2 + α + β)·p,
        α = p_i·q_j / (q_i·s),  β = p_j·q_i / (q_j·s),  s = q_i + q_j.

    α and β blow up as p_i or p_j → 1, so they are only used in the bounded products α·q_i, α·p_k (p_k ≤ q_i
    for k ≠ i) and likewise for β; q_i is summed from the other probabilities, and s ≥ 1.
    """
    p = torch.softmax(logits.double(), dim=1)
    e_i = torch.zeros_like(p, dtype=torch.bool).scatter_(1, positions[:, :1], True)
    e_j = torch.zeros_like(p, dtype=torch.bool).scatter_(1, positions[:, 1:], True)
    p_i, p_j = p.gather(1, positions[:, :1]), p.gather(1, positions[:, 1:])
    q_i, q_j = (p * ~e_i).sum(1, keepdim=True), (p * ~e_j).sum(1, keepdim=True)
    s = q_i + q_j
    alpha_q_i, beta_q_j = p_i * q_j / s, p_j * q_i / s  # α·q_i and β·q_j
    p_rest = p * ~(e_i | e_j)
    grad = -2 * p_rest - alpha_q_i * p_rest / q_i - beta_q_j * p_rest / q_j
    grad_i = q_i - p_i + alpha_q_i - beta_q_j * p_i / q_j  # (1+α)·q_i − (1+β)·p_i
    grad_j = q_j - p_j + beta_q_j - alpha_q_i * p_j / q_i
    return grad.scatter(1, positions[:, :1], grad_i).scatter(1, positions[:, 1:], grad_j)


def log_prob_grad(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Exact ∇_logits log P(S) for sets ``positions`` [G, N] under softmax(``logits`` [G, M]) → [G, M]
    (logits' dtype). Closed form for N = 2, ordering sum otherwise."""
    fn, chunk = (_grad_pair, PAIR_CHUNK) if positions.shape[1] == 2 else (_grad_general, GENERAL_N_CHUNK)
    out = torch.empty_like(logits)
    for s in range(0, logits.shape[0], chunk):
        out[s:s + chunk] = fn(logits[s:s + chunk], positions[s:s + chunk]).to(logits.dtype)
    return out


# ------------------------------------------------------------------------------------------ layers


class MaskProLayer(nn.Module):
    """A Conv2d or Linear whose weight is multiplied by an N:M mask drawn from learned logits.

    ``weight`` and ``bias`` are the wrapped layer's own Parameters (frozen: ``requires_grad=False``), so the
    network's state-dict keys do not change. Buffers (not saved with the network; ``MaskProLearner`` saves
    them): ``logits`` [G, M] float32, ``initial_mask`` and ``mask`` (the one ``forward`` uses) of the
    weight's shape. ``forward(x)`` is the layer with weight ⊙ mask.
    """

    def __init__(self, original_layer: nn.Conv2d | nn.Linear, n: int = 2, m: int = 4,
                 initial_mask: torch.Tensor | None = None, order: str = "asp",
                 logits_magnitude: float = DEFAULT_LOGITS_MAGNITUDE):
        # ``original_layer`` and the 2:4 defaults are seed 004's spelling: MaskProLayer(original_layer=conv, n=2, m=4)
        super().__init__()
        check_nm(n, m, order)
        layer = original_layer
        if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":
            raise UserError(f"MaskProLayer supports zero-padded convolutions only, got {layer.padding_mode!r}")
        if not nm_eligible(layer.weight.shape, m, order):
            raise UserError(f"a layer with weight {tuple(layer.weight.shape)} is not N:M eligible for M={m}")
        self.n, self.m, self.order = n, m, order
        self.weight, self.bias = layer.weight, layer.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.conv = {k: getattr(layer, k) for k in ("stride", "padding", "dilation", "groups")} \
            if isinstance(layer, nn.Conv2d) else None
        init = nm_mask(self.weight, n, m, order) if initial_mask is None else initial_mask.bool()
        init = init.to(self.weight.device)
        if tuple(init.shape) != tuple(self.weight.shape) or not bool((kept_per_group(init, m, order) == n).all()):
            raise UserError(f"the initial mask of a {tuple(self.weight.shape)} layer is not exactly {n}:{m} "
                            f"({order} order); {NM_INITIAL_MASK_HINT.format(n=n, m=m)}")
        self.register_buffer("initial_mask", init.clone(), persistent=False)
        self.register_buffer("mask", init.clone(), persistent=False)
        self.register_buffer("logits", nm_groups(init, m, order).float() * logits_magnitude, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight * self.mask
        if self.conv is None:
            return F.linear(x, weight, self.bias)
        return F.conv2d(x, weight, self.bias, **self.conv)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Positions [G, N] of a mask drawn from softmax(logits) without replacement."""
        return gumbel_top_n(self.logits, self.n, generator)

    def mask_of(self, positions: torch.Tensor) -> torch.Tensor:
        """[G, N] positions → bool mask of the weight's shape."""
        return nm_ungroup(positions_to_groups(positions, self.m), self.weight.shape, self.order)

    def top_mask(self) -> torch.Tensor:
        """The learned mask: top-N logits of each group (ties → the lower position)."""
        return self.mask_of(top_n_positions(self.logits, self.n))

    @torch.no_grad()
    def to_module(self) -> nn.Conv2d | nn.Linear:
        """A plain layer with the top-N mask baked into the weight (pruned entries exactly 0)."""
        w = self.weight
        if self.conv is None:
            layer = nn.Linear(w.shape[1], w.shape[0], bias=self.bias is not None, device=w.device, dtype=w.dtype)
        else:
            layer = nn.Conv2d(w.shape[1] * self.conv["groups"], w.shape[0], tuple(w.shape[2:]),
                              bias=self.bias is not None, device=w.device, dtype=w.dtype, **self.conv)
        layer.weight.copy_(w * self.top_mask())
        if self.bias is not None:
            layer.bias.copy_(self.bias)
        return layer

    def extra_repr(self) -> str:
        return f"{'conv' if self.conv else 'linear'} {tuple(self.weight.shape)}, {self.n}:{self.m} ({self.order})"


def maskpro_layers(model: nn.Module) -> dict[str, MaskProLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MaskProLayer)}


def wrap_model_with_maskpro(model: nn.Module, n: int = 2, m: int = 4, target_layers=(), *,
                            initial_masks: dict | None = None, order: str = "asp",
                            logits_magnitude: float = DEFAULT_LOGITS_MAGNITUDE,
                            protect=DEFAULT_PROTECT) -> dict[str, MaskProLayer]:
    """Replace the chosen Conv2d/Linear layers of ``model`` (in place) by MaskProLayers; returns them by name.

    Chosen: layers matching a ``target_layers`` regex (all when empty), not ``protect``-ed, and N:M eligible;
    with ``initial_masks`` only the layers it names (their masks must be exact N:M). Without initial masks
    each layer starts from its N:M magnitude mask. The whole network's weights are frozen.
    """
    check_nm(n, m, order)
    layers, _ = select_layers(model, include=target_layers, protect=protect)
    if initial_masks is not None:
        unknown = [k for k in initial_masks if k not in dict(model.named_modules())]
        if unknown:
            raise UserError(f"the initial masks name layers this network does not have: {unknown[:5]}; "
                            f"use masks made for this network")
        layers = {k: v for k, v in layers.items() if k in initial_masks}
        ineligible = [k for k, v in layers.items() if not nm_eligible(v.weight.shape, m, order)]
        if ineligible:
            raise UserError(f"the initial masks cover layers that cannot be {n}:{m} ({order} order): "
                            f"{ineligible[:5]}; make the masks with prune.py --method nm")
        not_nm = {k: kept_per_group(initial_masks[k].bool(), m, order) for k, v in layers.items()
                  if tuple(initial_masks[k].shape) == tuple(v.weight.shape) and nm_eligible(v.weight.shape, m, order)}
        not_nm = {k: g for k, g in not_nm.items() if not bool((g == n).all())}
        if not_nm:
            name, kept = next(iter(not_nm.items()))
            raise UserError(f"{len(not_nm)} of the {len(layers)} initial masks are not exactly {n}:{m} (e.g. "
                            f"'{name}' keeps {int(kept.min())}..{int(kept.max())} of every {m}, "
                            f"{100 * float(kept.sum()) / (kept.numel() * m):.1f}% overall); "
                            + NM_INITIAL_MASK_HINT.format(n=n, m=m))
    layers = {k: v for k, v in layers.items() if nm_eligible(v.weight.shape, m, order)}
    if not layers:
        raise UserError("no layer to learn a mask for (check maskpro.target_layers and the mask file)")
    model.requires_grad_(False)
    wrapped = {}
    for name, layer in layers.items():
        init = None if initial_masks is None else initial_masks[name]
        wrapped[name] = MaskProLayer(layer, n, m, init, order, logits_magnitude)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, wrapped[name])
    return wrapped


def unwrap(model: nn.Module) -> dict[str, torch.Tensor]:
    """Replace every MaskProLayer by a plain layer with its top-N mask baked in (in place); returns the masks."""
    masks = {}
    for name, layer in maskpro_layers(model).items():
        masks[name] = layer.top_mask().cpu()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.to_module())
    return masks


def get_model_sparsity_summary(model: nn.Module, n: int | None = None, m: int | None = None,
                               order: str | None = None) -> dict:
    """Per-layer and overall sparsity and N:M compliance of a (possibly MaskPro-wrapped) network.

    Wrapped layers report their learned top-N mask; other Conv2d/Linear layers their weights' nonzeros.
    N, M and the order default to the wrapped layers' (2:4, asp without any). Keys: ``layers``, ``totals``
    (see ``sparsity_summary``) and ``overall_stats`` (seed 004's name: see ``overall_stats``).
    """
    wrapped = maskpro_layers(model)
    first = next(iter(wrapped.values()), None)
    n = n or (first.n if first else 2)
    m = m or (first.m if first else 4)
    order = order or (first.order if first else "asp")
    masks = {name: layer.top_mask() for name, layer in wrapped.items()}
    names = [k for k, v in model.named_modules() if isinstance(v, (nn.Conv2d, nn.Linear, MaskProLayer))]
    summary = sparsity_summary(model, masks, n, m, order, layers=names)
    summary["overall_stats"] = overall_stats(summary, list(wrapped) or names)
    return summary


def overall_stats(summary: dict, names: list[str]) -> dict:
    """Seed 004's ``summary['overall_stats']``: sparsity and N:M compliance over the MaskPro layers ``names``
    (``overall_sparsity`` = 0.5 for 2:4 masks); ``network_sparsity`` is the whole network's (``totals``)."""
    rows = [summary["layers"][k] for k in names]
    params, kept = sum(r["params"] for r in rows), sum(r["kept"] for r in rows)
    eligible = [r for r in rows if r["nm_compliance"] is not None]
    weight = sum(r["params"] for r in eligible)
    return {"layers": len(rows), "total_params": params, "kept_params": kept, "pruned_params": params - kept,
            "overall_sparsity": 1.0 - kept / max(params, 1),
            "nm_compliance": sum(r["nm_compliance"] * r["params"] for r in eligible) / weight if weight else None,
            "network_sparsity": summary["totals"]["overall_sparsity"]}


# ------------------------------------------------------------------------------------------- update


class MaskProUpdate:
    """The policy-gradient state: baseline δ and the update of every layer's logits."""

    def __init__(self, layers: dict[str, MaskProLayer], lr: float = DEFAULT_LR, beta: float = DEFAULT_BETA):
        self.layers, self.lr, self.beta = layers, lr, beta
        self.delta = 0.0

    def sample(self, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """One joint draw: positions [G, N] per layer (in a fixed layer order, so a seeded generator
        gives the same masks on every rank and after a resume)."""
        return {name: layer.sample(generator) for name, layer in self.layers.items()}

    def use(self, positions: dict[str, torch.Tensor] | None) -> None:
        """Make forward use the sampled masks, or the initial masks when ``positions`` is None."""
        for name, layer in self.layers.items():
            layer.mask.copy_(layer.initial_mask if positions is None else layer.mask_of(positions[name]))

    def paired_losses(self, positions: dict[str, torch.Tensor], loss_fn) -> tuple[torch.Tensor, torch.Tensor]:
        """(L(initial masks), L(sampled masks)): ``loss_fn()`` evaluated twice on the same data (paired)."""
        self.use(None)
        initial = loss_fn()
        self.use(positions)
        return initial, loss_fn()

    def use_top(self) -> None:
        for layer in self.layers.values():
            layer.mask.copy_(layer.top_mask())

    @torch.no_grad()
    def step(self, positions: dict[str, torch.Tensor], r: float) -> float:
        """δ ← β·δ + (1−β)·r;  z ← z − lr·(r − δ)·∇ log P(sampled).  Returns r − δ."""
        self.delta = self.beta * self.delta + (1.0 - self.beta) * r
        advantage = r - self.delta
        for name, layer in self.layers.items():
            layer.logits.sub_(self.lr * advantage * log_prob_grad(layer.logits, positions[name]))
        return advantage

    def changed_fraction(self) -> float:
        """Share of groups whose learned (top-N) mask differs from the initial mask."""
        changed = total = 0
        for layer in self.layers.values():
            diff = nm_groups(layer.top_mask() != layer.initial_mask, layer.m, layer.order).any(dim=1)
            changed += int(diff.sum())
            total += diff.numel()
        return changed / max(total, 1)

    def state_dict(self) -> dict:
        return {"delta": self.delta,
                "logits": {k: v.logits.cpu() for k, v in self.layers.items()},
                "initial_masks": {k: v.initial_mask.cpu() for k, v in self.layers.items()}}

    def load_state_dict(self, state: dict) -> None:
        if set(state["logits"]) != set(self.layers):
            raise UserError("the checkpoint's MaskPro layers differ from this run's; resume with the config "
                            "and masks it was trained with")
        self.delta = float(state["delta"])
        for name, layer in self.layers.items():
            layer.logits.copy_(state["logits"][name])
