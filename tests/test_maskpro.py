"""MaskPro: the Plackett–Luce score against autograd and finite differences, sampling frequencies against
exact probabilities, wrap/unwrap, the policy-gradient update on a toy problem with a known best mask, the
paired baseline's variance, and mode prune (both phases) inside the trainer: resume and exact zeros."""

import itertools

import pytest
import torch
from torch import nn

from ddpm_curriculum.diffusion import GaussianDiffusion, make_betas
from ddpm_curriculum.errors import UserError
from ddpm_curriculum.pruning.maskpro import (MaskProLayer, MaskProUpdate, _grad_general, get_model_sparsity_summary,
                                             gumbel_top_n, log_prob_grad, maskpro_layers, plackett_luce_log_prob,
                                             unwrap, wrap_model_with_maskpro)
from ddpm_curriculum.pruning.nm import nm_mask, nm_ungroup, positions_to_groups
from .helpers import randomize, tiny


def explicit_log_prob(z: torch.Tensor, chosen) -> torch.Tensor:
    """log Σ over orderings of Π_k p_σk / (1 − Σ_{j<k} p_σj), written out term by term (autograd-able)."""
    p = torch.softmax(z, 0)
    total = 0.0
    for order in itertools.permutations(chosen):
        prob, used = 1.0, 0.0
        for k in order:
            prob = prob * p[k] / (1 - used)
            used = used + p[k]
        total = total + prob
    return torch.log(total)


@pytest.mark.parametrize("n, m", [(1, 4), (2, 4), (2, 8), (3, 8), (4, 8)])
def test_score_matches_autograd_and_finite_differences(n, m):
    g = torch.Generator().manual_seed(n * 10 + m)
    z = torch.randn(6, m, generator=g, dtype=torch.float64) * 2
    pos = torch.stack([torch.randperm(m, generator=g)[:n].sort().values for _ in range(6)])
    grad, logp = log_prob_grad(z, pos), plackett_luce_log_prob(z, pos)
    for i in range(6):
        zi = z[i].clone().requires_grad_(True)
        ref = explicit_log_prob(zi, pos[i].tolist())
        ref.backward()
        torch.testing.assert_close(logp[i], ref.detach(), atol=1e-10, rtol=0)
        torch.testing.assert_close(grad[i], zi.grad, atol=1e-9, rtol=0)
        eps = 1e-6
        fd = [(explicit_log_prob(z[i] + eps * e, pos[i].tolist()) - explicit_log_prob(z[i] - eps * e, pos[i].tolist()))
              / (2 * eps) for e in torch.eye(m, dtype=torch.float64)]
        torch.testing.assert_close(grad[i], torch.stack(fd), atol=1e-6, rtol=0)
    if n == 2:  # the closed form and the ordering sum agree
        torch.testing.assert_close(log_prob_grad(z, pos), _grad_general(z, pos), atol=1e-12, rtol=0)
    # the set probabilities form a distribution over the C(M, N) subsets
    subsets = torch.tensor(list(itertools.combinations(range(m), n)))
    total = plackett_luce_log_prob(z[:1].expand(len(subsets), m), subsets).exp().sum()
    assert total.item() == pytest.approx(1.0, abs=1e-12)


def test_score_is_finite_and_right_for_peaked_logits():
    """1 − p_i must not be computed by cancellation: at logits (40, 10, 0, 0) it is ~1e-13."""
    z = torch.tensor([[40.0, 10.0, 0.0, 0.0]], dtype=torch.float64)
    for chosen in ([0, 1], [0, 2], [2, 3]):
        pos = torch.tensor([chosen])
        fd = torch.stack([(plackett_luce_log_prob(z + 1e-6 * e, pos) - plackett_luce_log_prob(z - 1e-6 * e, pos))[0]
                          / 2e-6 for e in torch.eye(4, dtype=torch.float64)])
        torch.testing.assert_close(log_prob_grad(z, pos)[0], fd, atol=1e-8, rtol=0)
        assert abs(log_prob_grad(z, pos).sum()) < 1e-12  # softmax is shift invariant


@pytest.mark.parametrize("n", [1, 2, 3])
def test_gumbel_top_n_samples_the_plackett_luce_set_distribution(n):
    z = torch.tensor([[1.5, 0.2, -0.7, 0.9, 0.0]])
    draws = 40000
    pos = gumbel_top_n(z.expand(draws, 5), n, torch.Generator().manual_seed(0))
    assert (pos[:, 1:] > pos[:, :-1]).all() if n > 1 else True  # distinct, ascending
    subsets = list(itertools.combinations(range(5), n))
    exact = plackett_luce_log_prob(z.expand(len(subsets), 5), torch.tensor(subsets)).exp()
    counts = {s: 0 for s in subsets}
    for row in pos.tolist():
        counts[tuple(row)] += 1
    freq = torch.tensor([counts[s] / draws for s in subsets], dtype=torch.float64)
    # binomial standard error ≤ 0.0025 at 40k draws
    torch.testing.assert_close(freq, exact, atol=0.012, rtol=0)


# ------------------------------------------------------------------------------------ layer surgery


@pytest.mark.slow
def test_wrap_unwrap_match_the_masked_dense_model_and_comply():
    model = randomize(tiny(hid_channels=32, num_res_blocks=1), seed=4).eval()
    reference = randomize(tiny(hid_channels=32, num_res_blocks=1), seed=4).eval()
    keys = list(model.state_dict())
    layers = wrap_model_with_maskpro(model, 2, 4, logits_magnitude=10.0)
    assert "in_conv" not in layers and "out_conv.2" not in layers and "embed.0" not in layers  # protected
    assert "downsamples.level_1.0.1.project_in" in layers and "downsamples.level_0.0.fc" in layers
    assert list(model.state_dict()) == keys  # no renamed parameters: checkpoints stay plain
    assert not any(p.requires_grad for p in model.parameters())
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    with torch.no_grad():
        for name, layer in layers.items():  # masked dense reference: N:M magnitude masks zeroed by hand
            w = reference.get_submodule(name).weight
            w.mul_(nm_mask(w, 2, 4))
            assert torch.equal(layer.top_mask(), layer.initial_mask)
        wrapped_out = model(x, t)
        ref_out = reference(x, t)
        masks = unwrap(model)
        unwrapped_out = model(x, t)
    torch.testing.assert_close(wrapped_out, ref_out, rtol=0, atol=1e-5)
    assert torch.equal(unwrapped_out, wrapped_out)
    assert not maskpro_layers(model) and isinstance(model.get_submodule("downsamples.level_0.0.fc"), nn.Linear)
    summary = get_model_sparsity_summary(model, 2, 4)
    for name in masks:
        assert summary["layers"][name]["nm_compliance"] == 1.0
        assert summary["layers"][name]["sparsity"] == pytest.approx(0.5)
    assert summary["layers"]["in_conv"]["nm_compliance"] is None  # 3 input channels: not eligible


def test_wrapped_summary_reports_the_learned_masks():
    layer = nn.Linear(8, 2)
    net = nn.Sequential(layer)
    wrapped = wrap_model_with_maskpro(net, 1, 4, protect=())
    s = get_model_sparsity_summary(net)
    assert s["layers"]["0"] == {"shape": [2, 8], "params": 16, "kept": 4, "sparsity": 0.75, "nm_compliance": 1.0}
    assert s["totals"]["params"] == 18 and s["totals"]["nm_compliance"] == 1.0
    assert wrapped["0"].logits.dtype == torch.float32 and wrapped["0"].logits.shape == (4, 4)


def test_initial_mask_must_be_exact_nm():
    layer = nn.Linear(8, 2)
    with pytest.raises(UserError, match="not exactly 2:4"):
        MaskProLayer(layer, 2, 4, initial_mask=torch.ones(2, 8, dtype=torch.bool))
    with pytest.raises(UserError, match="not N:M eligible"):
        MaskProLayer(nn.Linear(6, 2), 2, 4)
    with pytest.raises(UserError, match=r"cannot be 2:4 .*\['0'\]"):
        wrap_model_with_maskpro(nn.Sequential(nn.Linear(6, 2)), 2, 4, protect=(),
                                initial_masks={"0": torch.ones(2, 6, dtype=torch.bool)})


def _toy(seed=0, rows=2):
    """Linear(8 → rows) whose target is the network with a hidden best 2:4 mask; initial = its complement."""
    torch.manual_seed(seed)
    layer = nn.Linear(8, rows, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(rows, 8).sign() * (0.5 + torch.rand(rows, 8)))
    g = torch.Generator().manual_seed(seed + 1)
    chosen = torch.stack([torch.randperm(4, generator=g)[:2].sort().values for _ in range(rows * 2)])
    best = nm_ungroup(positions_to_groups(chosen, 4), (rows, 8))
    return nn.Sequential(layer), best, (layer.weight * best).detach()


@pytest.mark.slow
def test_maskpro_finds_the_best_mask_from_the_wrong_one():
    net, best, w_best = _toy()
    layers = wrap_model_with_maskpro(net, 2, 4, initial_masks={"0": ~best}, logits_magnitude=3.0, protect=())
    update = MaskProUpdate(layers, lr=0.02, beta=0.99)  # lr scaled to this loss (O(1), not O(0.01))
    g = torch.Generator().manual_seed(2)
    for _ in range(3000):
        x = torch.randn(32, 8, generator=g)
        positions = update.sample(g)
        initial, sampled = update.paired_losses(positions, lambda: (net(x) - x @ w_best.T).square().mean(1))  # noqa: B023
        update.step(positions, float((sampled - initial).mean()))
    assert torch.equal(layers["0"].top_mask(), best)
    assert update.changed_fraction() == 1.0  # every group moved away from the (wrong) initial mask


@pytest.mark.slow
def test_paired_baseline_has_far_lower_variance_than_unpaired():
    """Var of r over minibatches for one fixed sampled mask: paired (same x0, t, ε) vs unpaired."""
    model = randomize(tiny(hid_channels=32, num_res_blocks=1), seed=1).eval()
    diffusion = GaussianDiffusion(make_betas("linear", 100))
    update = MaskProUpdate(wrap_model_with_maskpro(model, 2, 4))  # default logits magnitude 10
    g = torch.Generator().manual_seed(0)
    positions = update.sample(g)

    def batch():
        return torch.randn(16, 3, 8, 8, generator=g) * 0.5, torch.randint(0, 100, (16,), generator=g), \
            torch.randn(16, 3, 8, 8, generator=g)

    paired, unpaired = [], []
    with torch.no_grad():
        for _ in range(12):
            b1, b2 = batch(), batch()
            initial, sampled = update.paired_losses(positions, lambda: diffusion.training_losses(model, *b1))  # noqa: B023
            paired.append((sampled - initial).mean())
            update.use(None)
            unpaired.append(sampled.mean() - diffusion.training_losses(model, *b2).mean())
    var_paired, var_unpaired = torch.stack(paired).var(), torch.stack(unpaired).var()
    assert torch.stack(paired).abs().max() > 0  # the masks do differ
    # measured ≈ 3e-7 vs 1e-3: the timestep/noise variance cancels in the pair
    assert var_paired * 100 < var_unpaired, (var_paired, var_unpaired)


def test_update_moves_logits_along_the_score():
    layer = nn.Linear(4, 1)
    net = nn.Sequential(layer)
    update = MaskProUpdate(wrap_model_with_maskpro(net, 2, 4, protect=()), lr=50.0, beta=0.99)
    before = update.layers["0"].logits.clone()
    positions = {"0": torch.tensor([[0, 3]])}
    advantage = update.step(positions, r=-0.5)
    assert update.delta == pytest.approx(-0.005) and advantage == pytest.approx(-0.495)
    expected = before - 50.0 * advantage * log_prob_grad(before, positions["0"])
    torch.testing.assert_close(update.layers["0"].logits, expected)
