"""Tests for ddpm_curriculum.models: the ddpm-torch UNet and the model registry.

Everything runs on tiny configs (hid 32–64, two levels, 8–32 px) except the parameter-count / key tests,
which only build the CIFAR-10 model once and never run it.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddpm_curriculum.errors import UserError
from ddpm_curriculum.models import (MODELS, DecoderSparseUNet, SparseUNet, UNet, build_model, count_parameters,
                                    timestep_embedding)
from ddpm_curriculum.models.convert import to_diffusers_state
from ddpm_curriculum.models.unet import (ZERO_INIT_SCALE, AttentionBlock, MiddleBlock, ResAttnBlock,
                                         ResidualBlock, SamePad2d, tf_same_pad)

from .helpers import CIFAR10, inputs, randomize, tiny


# ---------------------------------------------------------------------------------------------- shapes


@pytest.mark.slow
@pytest.mark.parametrize("size", [16, 32])
@pytest.mark.parametrize("attn", [(False, True), (False, False)])
@pytest.mark.parametrize("with_conv", [True, False])
def test_output_shape(size, attn, with_conv):
    model = tiny(apply_attn=attn, resample_with_conv=with_conv).eval()
    x, t = inputs(size=size)
    with torch.no_grad():
        out = model(x, t)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


@pytest.mark.slow
def test_out_channels_and_scalar_t():
    model = tiny(in_channels=1, out_channels=2, num_res_blocks=1).eval()
    x, _ = inputs(channels=1, size=8)
    with torch.no_grad():
        out = model(x, torch.tensor(7))  # a scalar t is broadcast over the batch
        ref = model(x, torch.tensor([7, 7]))
    assert out.shape == (2, 2, 8, 8)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_indivisible_size_is_rejected():
    model = tiny(ch_multipliers=(1, 2, 2), apply_attn=False, num_res_blocks=1)
    with pytest.raises(ValueError, match="not divisible by 4"):
        model(torch.randn(1, 3, 10, 10), torch.tensor([0]))


# ------------------------------------------------------------------------------------ gradients, state


@pytest.mark.slow
def test_gradients_reach_every_parameter():
    # hid 64: GroupNorm(32) then has 2 channels per group. With 1 channel per group, norm2 would cancel
    # the per-channel time-embedding shift exactly and fc would (correctly) get a zero gradient.
    model = randomize(tiny(hid_channels=64))
    x, t = inputs(size=8)
    target = torch.randn_like(x)
    F.mse_loss(model(x, t), target).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 1e-6, f"{name} gets no gradient"


@pytest.mark.slow
def test_time_embedding_changes_output():
    model = randomize(tiny(hid_channels=64, num_res_blocks=1)).eval()
    x, _ = inputs(batch=1, size=8)
    with torch.no_grad():
        a, b = model(x, torch.tensor([10])), model(x, torch.tensor([900]))
    assert (a - b).abs().max() > 1e-3


@pytest.mark.slow
def test_state_dict_round_trip():
    src = randomize(tiny(drop_rate=0.1), seed=3).eval()
    torch.manual_seed(123)
    dst = tiny(drop_rate=0.1).eval()
    x, t = inputs()
    with torch.no_grad():
        assert not torch.equal(src(x, t), dst(x, t))
        dst.load_state_dict(src.state_dict(), strict=True)
        torch.testing.assert_close(dst(x, t), src(x, t), rtol=0, atol=0)


def test_init_is_deterministic_given_seed():
    torch.manual_seed(0)
    a = tiny().state_dict()
    torch.manual_seed(0)
    b = tiny().state_dict()
    torch.manual_seed(1)
    c = tiny().state_dict()
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["in_conv.weight"], c["in_conv.weight"])


def _xavier_bound(w: torch.Tensor, scale: float) -> float:
    receptive = w[0, 0].numel() if w.ndim > 2 else 1
    fan_in, fan_out = w.shape[1] * receptive, w.shape[0] * receptive
    return math.sqrt(6 * scale / (fan_in + fan_out))


@pytest.mark.slow
def test_init_follows_tf_fan_avg_and_zero_init_layers():
    torch.manual_seed(0)
    sd = UNet(hid_channels=64, ch_multipliers=(1, 2), apply_attn=(False, True)).state_dict()
    zero_init = re.compile(r"(conv2|project_out)\.weight$|^out_conv\.2\.weight$")
    checked_zero = 0
    for name, w in sd.items():
        if name.endswith("bias"):
            assert torch.count_nonzero(w) == 0, name
        elif w.ndim >= 2:
            scale = ZERO_INIT_SCALE if zero_init.search(name) else 1.0
            checked_zero += scale != 1.0
            bound = _xavier_bound(w, scale)
            assert w.abs().max() <= bound, name
            # U(−a, a) has std a/√3; with ≥ 3·64 entries the sample std is within ~15 %.
            assert abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 0.15, name
        else:  # GroupNorm affine
            assert torch.all(w == (1.0 if name.endswith("weight") else 0.0)), name
    # 2+3 down/up res blocks per level × 2 levels + 2 middle res blocks, 2+3+1 attention blocks, out conv
    assert checked_zero == 12 + 6 + 1


# ------------------------------------------------------------------------------------------- CIFAR-10


@pytest.fixture(scope="module")
def cifar_state():
    torch.manual_seed(0)
    model = UNet(**CIFAR10)
    return model, model.state_dict()


def test_cifar10_parameter_count(cifar_state):
    model, sd = cifar_state
    assert count_parameters(model) == 35_746_307
    assert count_parameters(model, trainable_only=True) == 35_746_307
    assert len(sd) == 304
    assert model.bottleneck_channels == 256


@pytest.mark.parametrize("key, shape", [
    ("embed.0.weight", (512, 128)),
    ("embed.2.bias", (512,)),
    ("in_conv.weight", (128, 3, 3, 3)),
    ("downsamples.level_0.0.norm1.weight", (128,)),
    ("downsamples.level_0.1.fc.weight", (128, 512)),
    ("downsamples.level_0.2.1.weight", (128, 128, 3, 3)),           # down conv after SamePad2d (.0)
    ("downsamples.level_1.0.0.skip.weight", (256, 128, 1, 1)),       # res block inside an attention level
    ("downsamples.level_1.0.0.conv2.weight", (256, 256, 3, 3)),
    ("downsamples.level_1.1.1.project_in.weight", (768, 256, 1, 1)),
    ("downsamples.level_1.1.1.norm.bias", (256,)),
    ("downsamples.level_2.2.1.bias", (256,)),
    ("middle.0.conv1.weight", (256, 256, 3, 3)),
    ("middle.1.project_out.weight", (256, 256, 1, 1)),
    ("middle.2.fc.bias", (256,)),
    ("upsamples.level_3.0.conv1.weight", (256, 512, 3, 3)),
    ("upsamples.level_3.3.1.weight", (256, 256, 3, 3)),             # up conv after nn.Upsample (.0)
    ("upsamples.level_1.2.0.skip.weight", (256, 384, 1, 1)),         # concat with the level-0 downsample
    ("upsamples.level_1.2.1.project_out.bias", (256,)),
    ("upsamples.level_0.0.conv1.weight", (128, 384, 3, 3)),
    ("upsamples.level_0.2.skip.weight", (128, 256, 1, 1)),           # concat with the in_conv output
    ("out_conv.0.weight", (128,)),
    ("out_conv.2.weight", (3, 128, 3, 3)),
])
def test_cifar10_ddpm_torch_keys(cifar_state, key, shape):
    _, sd = cifar_state
    assert key in sd
    assert tuple(sd[key].shape) == shape


def test_cifar10_key_families(cifar_state):
    """No stray keys: every key belongs to one of the ddpm-torch families, and levels have no down/up extras."""
    _, sd = cifar_state
    res = r"(norm1|conv1|fc|norm2|conv2|skip)"
    attn = r"(norm|project_in|project_out)"
    patterns = [r"embed\.[02]", r"in_conv", r"out_conv\.[02]", rf"middle\.[02]\.{res}", rf"middle\.1\.{attn}",
                rf"downsamples\.level_[023]\.[01]\.{res}", rf"downsamples\.level_1\.[01]\.0\.{res}",
                rf"downsamples\.level_1\.[01]\.1\.{attn}", r"downsamples\.level_[012]\.2\.1",
                rf"upsamples\.level_[023]\.[012]\.{res}", rf"upsamples\.level_1\.[012]\.0\.{res}",
                rf"upsamples\.level_1\.[012]\.1\.{attn}", r"upsamples\.level_[123]\.3\.1"]
    family = re.compile(rf"({'|'.join(patterns)})\.(weight|bias)")
    stray = [k for k in sd if not family.fullmatch(k)]
    assert not stray
    assert not any(k.startswith(("downsamples.level_3.2", "upsamples.level_0.3")) for k in sd)


def test_middle_block_is_exposed(cifar_state):
    model, _ = cifar_state
    assert isinstance(model.middle, MiddleBlock)
    assert [type(m) for m in model.middle] == [ResidualBlock, AttentionBlock, ResidualBlock]
    assert model.middle[2].conv2.out_channels == model.bottleneck_channels


# --------------------------------------------------------------------------------------- components


def test_timestep_embedding_closed_form():
    t = torch.tensor([0, 1, 17, 999])
    dim = 10
    emb = timestep_embedding(t, dim)
    assert emb.shape == (4, dim) and emb.dtype == torch.float32
    half = dim // 2
    for row, tv in enumerate(t.tolist()):
        for i in range(half):
            freq = math.exp(-i * math.log(10000) / (half - 1))
            assert emb[row, i].item() == pytest.approx(math.sin(tv * freq), abs=1e-4)
            assert emb[row, half + i].item() == pytest.approx(math.cos(tv * freq), abs=1e-4)
    # last frequency is exactly 1/10000, first is 1
    assert emb[3, half - 1].item() == pytest.approx(math.sin(999 / 10000), abs=1e-6)
    assert timestep_embedding(t, 11)[:, -1].abs().max() == 0  # odd size: zero pad column


def test_timestep_embedding_matches_diffusers():
    emb_mod = pytest.importorskip("diffusers.models.embeddings")
    t = torch.arange(0, 1000, 37)
    ref = emb_mod.get_timestep_embedding(t, 128, flip_sin_to_cos=False, downscale_freq_shift=1)
    # diffusers rounds the frequencies differently in fp32; at t≈1000 rad that moves sin/cos by ~3e-5.
    torch.testing.assert_close(timestep_embedding(t, 128), ref, rtol=0, atol=1e-4)


def _brute_force_strided_conv(x, w, b, pad_top, pad_left, out_h, out_w):
    """out[o, i, j] = b[o] + Σ_{c,ki,kj} w[o,c,ki,kj]·x[c, 2i+ki−pad_top, 2j+kj−pad_left] (zero outside)."""
    _, C, H, W = x.shape
    out = torch.zeros(1, w.shape[0], out_h, out_w, dtype=torch.float64)
    for i in range(out_h):
        for j in range(out_w):
            acc = b.double().clone()
            for ki in range(3):
                for kj in range(3):
                    r, c = 2 * i + ki - pad_top, 2 * j + kj - pad_left
                    if 0 <= r < H and 0 <= c < W:
                        acc += w[:, :, ki, kj].double() @ x[0, :, r, c].double()
            out[0, :, i, j] = acc
    return out


@pytest.mark.parametrize("h, w, pad_top, pad_left", [(8, 8, 0, 0), (7, 6, 1, 0)])
def test_same_padding_downsample_matches_brute_force(h, w, pad_top, pad_left):
    # TF SAME, k=3, s=2: even sizes pad (0 before, 1 after), odd sizes (1, 1); output ceil(n/2).
    torch.manual_seed(0)
    down = UNet(hid_channels=32, ch_multipliers=(1, 1), apply_attn=False).downsamples["level_0"][2]
    assert isinstance(down[0], SamePad2d)
    conv = down[1]
    x = torch.randn(1, 32, h, w)
    with torch.no_grad():
        out = down(x)
    expect = _brute_force_strided_conv(x, conv.weight, conv.bias, pad_top, pad_left,
                                       math.ceil(h / 2), math.ceil(w / 2))
    assert out.shape == expect.shape
    torch.testing.assert_close(out.double(), expect, rtol=1e-5, atol=1e-5)
    # the padding itself: even sizes only grow at the bottom/right
    if h % 2 == 0:
        padded = tf_same_pad(x)
        assert padded.shape[-2:] == (h + 1, w + 1)
        torch.testing.assert_close(padded[..., :h, :w], x, rtol=0, atol=0)


@pytest.mark.parametrize("channels_last", [False, True])
def test_attention_matches_explicit_formula(channels_last):
    block = randomize(AttentionBlock(64), seed=5)
    x = torch.randn(2, 64, 8, 6)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        out = block(x)
        B, C, H, W = x.shape
        q, k, v = block.project_in(block.norm(x)).reshape(B, 3 * C, H * W).chunk(3, dim=1)  # [B, C, HW]
        weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(C), dim=-1)  # over keys j
        h = torch.einsum("bij,bcj->bci", weights, v).reshape(B, C, H, W)
        expect = block.project_out(h) + x
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_channels_last_matches_nchw():
    model = randomize(tiny(hid_channels=32), seed=7).eval()
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x, t = inputs(size=16)
    with torch.no_grad():
        ref = model(x, t)
        out = model_cl(x.to(memory_format=torch.channels_last), t)
    assert ref.abs().max() > 0.1  # a meaningful comparison, not two near-zero outputs
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert ref.is_contiguous()


@pytest.mark.slow
def test_zero_init_model_is_near_constant_in_x():
    # With the real init the output conv is ~1e-5 scale: a fresh model predicts ≈0 everywhere.
    model = tiny().eval()
    x, t = inputs()
    with torch.no_grad():
        assert model(x, t).abs().max() < 1e-3


# ----------------------------------------------------------------------------- diffusers cross-check


@pytest.mark.slow
def test_matches_diffusers_unet2d_with_same_layout():
    diffusers = pytest.importorskip("diffusers")
    ours = randomize(tiny(hid_channels=32, num_res_blocks=2), seed=11).eval()
    theirs = diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None, norm_eps=1e-6, norm_num_groups=32, downsample_padding=0,
        flip_sin_to_cos=False, freq_shift=1).eval()
    assert count_parameters(ours) == count_parameters(theirs)
    theirs.load_state_dict(to_diffusers_state(ours.state_dict(), levels=2, num_res_blocks=2), strict=True)
    x, t = inputs(size=16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t), theirs(x, t).sample, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------ registry


def test_registry_builds_unet():
    assert MODELS == {"unet": UNet, "sparse_unet": SparseUNet, "decoder_sparse_unet": DecoderSparseUNet}
    model = build_model("unet", hid_channels=32, ch_multipliers=(1, 2), apply_attn=(False, True))
    assert isinstance(model, UNet)
    sparse = build_model("sparse_unet", hid_channels=32, ch_multipliers=(1, 2), apply_attn=(False, True))
    assert isinstance(sparse, SparseUNet) and sparse.channel_mask.shape == (64,)
    decoder = build_model("decoder_sparse_unet", hid_channels=32, ch_multipliers=(1, 2), apply_attn=(False, True))
    # up blocks (deepest first, 2 per level):
    # cat(64, 64), cat(64, 64), cat(64, 32), cat(64, 32), cat(32, 32), cat(32, 32)
    assert decoder.gate_segments == [128, 128, 96, 96, 64, 64] and decoder.channel_mask.shape == (576,)
    assert count_parameters(nn.Linear(3, 2)) == 8


def test_attention_level_blocks_are_res_attn():
    model = tiny()
    assert isinstance(model.downsamples["level_1"][0], ResAttnBlock)
    assert isinstance(model.downsamples["level_0"][0], ResidualBlock)


@pytest.mark.parametrize("name, kwargs, match", [
    ("resnet", {}, r"unknown model 'resnet'; valid names: decoder_sparse_unet, sparse_unet, unet"),
    ("sparse_unet", {"hidden": 64}, r"unknown argument\(s\) hidden .*valid arguments: in_channels, hid_channels"),
    ("unet", {"hidden": 64}, r"unknown argument\(s\) hidden .*valid arguments: in_channels, hid_channels"),
    ("unet", {"ch_multipliers": (1, 2), "apply_attn": (False, True, False)}, r"apply_attn has 3 entries"),
    ("unet", {"hid_channels": 48, "ch_multipliers": (1, 2), "apply_attn": False}, r"divisible by 32.*hid_channels"),
    ("unet", {"ch_multipliers": ()}, r"ch_multipliers must be"),
    ("unet", {"drop_rate": 1.0}, r"drop_rate"),
    ("unet", {"hid_channels": 3}, r"hid_channels must be even"),
])
def test_build_model_errors(name, kwargs, match):
    with pytest.raises(UserError, match=match):
        build_model(name, **kwargs)


def test_one_channel_groups_erase_the_time_embedding_and_norm_groups_fixes_it():
    """With 32 channels and 32 groups, norm2 removes the per-channel shift fc(t_emb) exactly: the block
    ignores time. norm_groups=16 (two channels per group) keeps it."""
    torch.manual_seed(0)
    x, emb = torch.randn(2, 32, 8, 8), torch.randn(2, 1, 128)
    outputs = {}
    for groups in (32, 16):
        block = ResidualBlock(32, 32, 128, norm_groups=groups).eval()
        nn.init.normal_(block.conv2.weight, std=0.05)
        outputs[groups] = [block(x, e.expand(2, 128)) for e in (emb[0], emb[1])]
    torch.testing.assert_close(outputs[32][0], outputs[32][1], atol=1e-4, rtol=0)
    assert (outputs[16][0] - outputs[16][1]).abs().max() > 1e-2
    model = UNet(hid_channels=32, ch_multipliers=(1, 2), apply_attn=False, norm_groups=16)
    assert model.downsamples["level_0"][0].norm2.num_groups == 16
    assert model.downsamples["level_1"][0].norm2.num_groups == 16  # 64 channels: 16 groups of 4
