"""Modes CS and CR: schedules (the seeds' exact numbers), the SparseUNet gate and its reserved entries,
the regrowth signals against brute force, the Group-L1 penalty against a double loop, the proximal step,
and the structured-sparsity report."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ddpm_curriculum.config import config_from_dict
from ddpm_curriculum.diffusion import GaussianDiffusion, make_betas
from ddpm_curriculum.errors import UserError
from ddpm_curriculum.models import DecoderSparseUNet, GateProbe, SparseUNet, UNet
from ddpm_curriculum.sparsity.channel_mask import select_channels
from ddpm_curriculum.sparsity.group_l1 import (conv_groups, group_l1, norm_scale_groups, prox_group_l1_,
                                               structured_sparsity)
from ddpm_curriculum.sparsity.schedules import active_channels, stage_values
from .helpers import KW, randomize


# ------------------------------------------------------------------------------------------ schedules


def test_seed001_linear_sparsity_gives_the_seed_table():
    sparsities = stage_values("linear", 0.8, 5)
    assert sparsities == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.0])
    assert active_channels(128, sparsities) == [25, 51, 77, 102, 128]


def test_seed000_sparsity_list_over_256_channels():
    per_stage = [0.8, 0.6, 0.4, 0.2, 0.0]
    assert stage_values("list", 0.0, 5, per_stage) == per_stage
    assert active_channels(256, per_stage)[0] == 51
    assert active_channels(256, per_stage)[-1] == 256


def test_lambda_schedules_match_the_seeds_digits():
    linear = stage_values("linear", 3e-5, 5)
    for got, want in zip(linear, [3.0e-5, 2.25e-5, 1.5e-5, 7.5e-6, 0.0], strict=True):
        assert got == pytest.approx(want, abs=1e-12)
    cosine = stage_values("cosine", 5e-5, 5)
    assert [round(v, 7) for v in cosine] == [5e-5, 4.27e-5, 2.5e-5, 7.3e-6, 0.0]
    # closed form of the cosine schedule at an odd number of stages
    assert stage_values("cosine", 1.0, 3) == pytest.approx([1.0, 0.5, 0.0])


def test_schedule_errors_are_user_errors():
    with pytest.raises(UserError, match="3 values but there are 5"):
        stage_values("list", 0.0, 5, [0.5, 0.2, 0.0])
    with pytest.raises(UserError, match="at least 2 curriculum stages"):
        stage_values("linear", 0.8, 1)
    with pytest.raises(UserError, match="must not increase"):
        active_channels(64, [0.5, 0.8])
    assert active_channels(10, [0.9, 0.0]) == [1, 10]  # 10·(1 − 0.9) = 0.99999… still counts as 1


STAGES = [{"t_min": 0.8, "t_max": 1.0, "epochs": 1}, {"t_min": 0.0, "t_max": 1.0, "epochs": 1}]


@pytest.mark.parametrize("sections, fragment", [
    ({"sparsity": {"enabled": True, "schedule": "list", "per_stage": [0.5]}}, "1 values but there are 2"),
    ({"sparsity": {"enabled": True, "schedule": "list", "per_stage": [0.2, 0.5]}}, "must not increase"),
    ({"sparsity": {"enabled": True, "regrowth_method": "magic"}}, "'sparsity.regrowth_method' = 'magic'"),
    ({"regularization": {"enabled": True, "schedule": "list", "per_stage": [1e-4, -1e-5]}}, "negative λ"),
    ({"regularization": {"enabled": True, "target": "bias"}}, "['conv_weight', 'norm_scale']"),
    ({"curriculum": {"stages": STAGES[:1]}, "sparsity": {"enabled": True}}, "at least 2 curriculum stages"),
    ({"curriculum": {"enabled": False, "pacing": "patience"}}, "pacing 'fixed'"),
])
def test_bad_mode_configs_name_the_key_and_the_fix(sections, fragment):
    raw = {"train": {"epochs": 2}, "curriculum": {"enabled": True, "stages": STAGES}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    with pytest.raises(UserError) as err:
        config_from_dict(raw)
    assert fragment in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------------- SparseUNet


def sparse(mask_active: int = 24, seed: int = 0) -> SparseUNet:
    torch.manual_seed(seed)
    model = randomize(SparseUNet(**KW), seed)
    model.channel_mask.zero_()[:mask_active] = 1.0
    return model


def batch(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 100, (n,), generator=g), \
        torch.randn(n, 3, 8, 8, generator=g)


def diffusion():
    return GaussianDiffusion(make_betas("linear", 100, 1e-4, 0.02))


@pytest.mark.slow
@pytest.mark.parametrize("cls", [SparseUNet, DecoderSparseUNet])
def test_dense_gated_unet_is_the_unet(cls):
    torch.manual_seed(0)
    unet = randomize(UNet(**KW))
    model = cls(**KW)
    model.load_state_dict({**unet.state_dict(), "channel_mask": model.channel_mask,
                           "channel_birth_stage": model.channel_birth_stage})
    x, t, _ = batch()
    assert torch.equal(model(x, t), unet(x, t))


def check_reserved_entries(model, count: int) -> None:
    """The masked channels' reserved entries get exactly zero gradient (the others train), random values in
    them leave the output unchanged, and opening the gates changes it."""
    masked = model.channel_mask == 0
    x0, t, noise = batch()
    diffusion().training_losses(model, x0, t, noise).mean().backward()
    reserved = model.reserved_entries(masked)
    assert len(reserved) == count
    for param, entries in reserved:
        entries = entries.expand_as(param)
        assert entries.any() and torch.all(param.grad[entries] == 0), "a reserved entry got a gradient"
        assert param.grad[~entries].abs().sum() > 0, "the active channels' entries must train"
    x_t = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        before = model(x_t, t)
        for param, entries in reserved:
            entries = entries.expand_as(param)
            param[entries] = torch.randn(int(entries.sum())) * 10
        assert torch.equal(model(x_t, t), before)
        model.channel_mask.fill_(1.0)
        assert not torch.allclose(model(x_t, t), before)


@pytest.mark.slow
def test_reserved_entries_get_zero_gradient_and_do_not_affect_the_output():
    check_reserved_entries(sparse(), 6)


@pytest.mark.slow
def test_without_the_consumer_gate_groupnorm_would_leak_into_conv1():
    """Why the second gate exists: a zero channel leaves norm1 as β_c − γ_c·μ_g/σ_g ≠ 0."""
    model = sparse()
    block = model.consumer_block
    seen = {}
    block.norm1.register_forward_hook(lambda m, i, out: seen.update(norm1=out))  # update() returns None
    block.conv1.register_forward_hook(lambda m, i, out: seen.update(conv1_in=i[0]))
    x, t, _ = batch()
    with torch.no_grad():
        model(x, t)
    c = model.bottleneck_channels
    masked = (model.channel_mask == 0).nonzero().flatten()
    assert seen["norm1"][:, masked].abs().amax() > 0.01  # leaks before the gate
    assert torch.all(seen["conv1_in"][:, masked] == 0)  # silent after it
    assert seen["conv1_in"][:, c:].abs().sum() > 0  # the concatenated skip is not gated


@pytest.mark.slow
def test_gate_probe_equals_per_sample_autograd_of_the_tied_gate():
    model = sparse().eval()  # eval: no dropout, so per-sample forwards equal the batched one
    x0, t, noise = batch(n=5)
    diff = diffusion()
    model.gate_probe = GateProbe()
    model.train()
    diff.training_losses(model, x0, t, noise).mean().backward()
    got = model.gate_probe.collect()
    assert model.gate_probe.collect() is None  # collect() clears
    # brute force: a leaf gate m, used by both gates, one sample at a time, |∂(l_i/B)/∂m| summed
    model.gate_probe = None
    model.zero_grad()
    leaf = model.channel_mask.clone().requires_grad_(True)
    model.channel_mask = leaf
    want = torch.zeros_like(leaf)
    for i in range(5):
        li = diff.training_losses(model, x0[i:i + 1], t[i:i + 1], noise[i:i + 1]).mean() / 5
        want += torch.autograd.grad(li, leaf)[0].abs()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)
    masked = leaf.detach() == 0
    assert torch.all(got[masked] > 0), "masked channels must get a signal"


def test_select_channels_takes_the_largest_masked_scores():
    scores = torch.tensor([9.0, 1.0, 5.0, 5.0, 7.0, 0.5])
    masked = torch.tensor([True, True, True, True, False, True])
    assert select_channels(scores, masked, 2) == [0, 2]  # 7.0 is active; the 5.0 tie goes to the lower index
    assert select_channels(scores, masked, 0) == []


# ----------------------------------------------------------------------------------------- Group L1


def test_group_l1_matches_a_brute_force_double_loop():
    torch.manual_seed(0)
    model = randomize(UNet(**KW))
    named = conv_groups(model)
    assert len(named) == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    want = 0.0
    for _, w in named:
        for c in range(w.shape[0]):
            want += math.sqrt(sum(v * v for v in w[c].detach().flatten().tolist()))
    got = group_l1([w for _, w in named])
    assert float(got.detach()) == pytest.approx(want, rel=1e-5)
    # gradient of Σ‖W_c‖ is W_c/‖W_c‖
    got.backward()
    w = named[3][1]
    torch.testing.assert_close(w.grad, w / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1))
    # Slimming target: Σ|γ| over every GroupNorm scale
    scales = norm_scale_groups(model)
    with torch.no_grad():
        assert float(group_l1([g for _, g in scales])) == pytest.approx(sum(float(g.abs().sum()) for _, g in scales))


def test_seed001_counts_52_conv_layers_and_5827_channels_on_celeba32():
    model = UNet(in_channels=3, hid_channels=64, ch_multipliers=(1, 2, 2), num_res_blocks=2,
                 apply_attn=(False, False, False))
    named = conv_groups(model)
    assert len(named) == 52 and sum(w.shape[0] for _, w in named) == 5827


def test_prox_step_makes_exact_zeros_and_shrinks_the_rest():
    w = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0], [6.0, 8.0]]).view(4, 2, 1, 1)
    prox_group_l1_([w], threshold=1.0)
    want = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, 0.0], [6.0, 8.0]]) \
        * torch.tensor([1 - 1 / 5, 0.0, 0.0, 1 - 1 / 10]).view(4, 1)
    torch.testing.assert_close(w.view(4, 2), want)
    assert torch.all(w[1:3] == 0)


def test_structured_sparsity_counts_groups_below_the_relative_threshold():
    a = torch.zeros(4, 2, 1, 1)
    a[:, 0, 0, 0] = torch.tensor([10.0, 0.05, 2.0, 0.0])  # norms 10, 0.05, 2, 0 → 2 below 1% of 10
    b = torch.ones(3)  # γ-like: all equal, none below
    z = torch.zeros(2, 5)  # a layer the proximal step zeroed completely: all pruned
    report = structured_sparsity([("a", a), ("b", b), ("z", z)], threshold=0.01)
    assert report["layers"]["a"]["share"] == 0.5 and report["layers"]["b"]["share"] == 0.0
    assert report["layers"]["z"]["share"] == 1.0
    assert report["total_share"] == pytest.approx(4 / 9) and report["groups"] == 9
    assert report["layers"]["a"]["norms"] == pytest.approx([10.0, 0.05, 2.0, 0.0])


# ------------------------------------------------------------------------------ DecoderSparseUNet


def decoder(seed: int = 0) -> DecoderSparseUNet:
    """Random weights; about half of every up block's inputs masked, chosen at random (h and skip channels)."""
    torch.manual_seed(seed)
    model = randomize(DecoderSparseUNet(**KW), seed)
    g = torch.Generator().manual_seed(seed)
    model.channel_mask.copy_((torch.rand(model.gated_channels, generator=g) < 0.5).float())
    return model


def test_decoder_gates_one_segment_per_up_block():
    model = DecoderSparseUNet(**KW)
    assert len(model.gate_segments) == 4 and model.gated_channels == sum(b.norm1.num_channels
                                                                          for b in model.gated_blocks)


@pytest.mark.slow
def test_decoder_reserved_entries_get_zero_gradient_and_do_not_affect_the_output():
    model = decoder()
    check_reserved_entries(model, 4 * len(model.gated_blocks))


@pytest.mark.slow
@pytest.mark.parametrize("which", ["masked", "active"])
def test_decoder_gates_cut_the_skip_path_too(which):
    """Noise added to the masked inputs of every up block (encoder skips and the up path alike), before the
    gates, changes nothing; noise on active inputs does."""
    model = decoder().eval()
    x, t, _ = batch()
    with torch.no_grad():
        before = model(x, t)
    flags = model.channel_mask == (0 if which == "masked" else 1)

    def perturb(where):
        def hook(module, inputs):
            x_in, *rest = inputs
            return (x_in + 5 * torch.randn_like(x_in) * flags[where].view(1, -1, 1, 1), *rest)
        return hook

    handles = [b.register_forward_pre_hook(perturb(w), prepend=True)
               for b, w in zip(model.gated_blocks, model.segment_slices(), strict=True)]
    with torch.no_grad():
        after = model(x, t)
    for h in handles:
        h.remove()
    assert torch.equal(after, before) == (which == "masked")


@pytest.mark.slow
def test_decoder_gate_probe_equals_per_sample_autograd_of_the_tied_gates():
    model = decoder().train()
    model.drop_rate = 0.0
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    x0, t, noise = batch(n=3)
    diff = diffusion()
    model.gate_probe = GateProbe()
    diff.training_losses(model, x0, t, noise).mean().backward()
    got = model.gate_probe.collect(model.gated_channels)
    model.gate_probe = None
    leaf = model.channel_mask.clone().requires_grad_(True)
    model.channel_mask = leaf
    want = torch.zeros_like(leaf)
    for i in range(3):
        li = diff.training_losses(model, x0[i:i + 1], t[i:i + 1], noise[i:i + 1]).mean() / 3
        want += torch.autograd.grad(li, leaf)[0].abs()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)
