"""Importers: diffusers UNet2DModel folders (safetensors and .bin, plain and pipeline layouts) and ddpm-torch
checkpoints load into the project's UNet with the same outputs; the safetensors reader against the library, and
the library used when installed with the reader as its fallback (same tensors); unsupported layouts are one-line
errors naming the keys that did not map."""

import json
import sys

import pytest
import torch

from ddpm_curriculum.errors import UserError
from ddpm_curriculum.models import UNet, convert
from ddpm_curriculum.models.convert import (diffusers_key, from_diffusers_state, import_ddpm_torch,
                                            infer_unet_kwargs, read_safetensors, to_diffusers_state,
                                            unet_kwargs_from_diffusers)
from ddpm_curriculum.training.checkpoint import load_network
from .helpers import CIFAR10, inputs, randomize

diffusers = pytest.importorskip("diffusers")

# The google/ddpm-cifar10-32 layout (4 levels, attention at the second, single-head, TF "SAME" downsampling,
# sin-first embedding with shift 1) at a small width.
SMALL_DDPM_CIFAR = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(32, 64, 64, 64),
                        layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
                                                              "DownBlock2D"),
                        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                        attention_head_dim=None, norm_eps=1e-6, norm_num_groups=32, downsample_padding=0,
                        flip_sin_to_cos=False, freq_shift=1)


@pytest.fixture(scope="module")
def small_unet2d():
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(**SMALL_DDPM_CIFAR).eval()
    with torch.no_grad():
        for p in model.parameters():  # generic non-zero values everywhere
            p.add_(0.05 * torch.randn_like(p))
    return model


def _assert_same_outputs(ours, theirs, size=32):
    x, t = inputs(batch=2, size=size)
    with torch.no_grad():
        ref = theirs(x, t).sample
        out = ours(x, t)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_diffusers_safetensors_folder_gives_the_same_outputs(small_unet2d, tmp_path):
    small_unet2d.save_pretrained(tmp_path / "unet")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    net = load_network(tmp_path / "unet")
    assert net.format == "diffusers" and net.config.dataset.name == "cifar10"
    assert net.config.model.norm_eps == 1e-6 and net.config.model.ch_multipliers == [1, 2, 2, 2]
    assert net.config.model.apply_attn == [False, True, False, False]
    assert net.config.diffusion.beta_schedule == "linear" and net.config.diffusion.timesteps == 1000
    _assert_same_outputs(net.model, small_unet2d)


@pytest.mark.slow
def test_diffusers_bin_pipeline_folder_with_scheduler(small_unet2d, tmp_path):
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=500, beta_schedule="squaredcos_cap_v2",
                                        variance_type="fixed_large")
    diffusers.DDPMPipeline(unet=small_unet2d, scheduler=scheduler).save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "unet" / "diffusion_pytorch_model.bin").is_file()
    net = load_network(tmp_path)
    d = net.config.diffusion
    assert (d.timesteps, d.beta_schedule, d.model_var_type, d.model_mean_type) == (500, "cosine", "fixed-large", "eps")
    torch.testing.assert_close(torch.from_numpy(net.diffusion.alphas_bar), scheduler.alphas_cumprod.double(),
                               rtol=1e-5, atol=1e-7)
    _assert_same_outputs(net.model, small_unet2d)


def test_diffusers_legacy_attention_names_and_round_trip(small_unet2d):
    kwargs = unet_kwargs_from_diffusers(dict(small_unet2d.config))
    legacy = {k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.")
              .replace(".to_out.0.", ".proj_attn."): v for k, v in small_unet2d.state_dict().items()}
    ours = from_diffusers_state(legacy, kwargs)
    back = to_diffusers_state(ours, levels=4, num_res_blocks=2)
    assert back.keys() == small_unet2d.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in small_unet2d.state_dict().items())


@pytest.mark.parametrize("ours, theirs", [
    ("embed.0.weight", "time_embedding.linear_1.weight"),
    ("in_conv.bias", "conv_in.bias"),
    ("out_conv.0.weight", "conv_norm_out.weight"),
    ("out_conv.2.weight", "conv_out.weight"),
    ("downsamples.level_0.1.conv1.weight", "down_blocks.0.resnets.1.conv1.weight"),
    ("downsamples.level_0.2.1.weight", "down_blocks.0.downsamplers.0.conv.weight"),
    ("downsamples.level_1.0.0.skip.weight", "down_blocks.1.resnets.0.conv_shortcut.weight"),
    ("downsamples.level_1.1.1.norm.bias", "down_blocks.1.attentions.1.group_norm.bias"),
    ("downsamples.level_1.0.1.project_out.weight", "down_blocks.1.attentions.0.to_out.0.weight"),
    ("middle.0.fc.weight", "mid_block.resnets.0.time_emb_proj.weight"),
    ("middle.1.project_in.bias", "mid_block.attentions.0.to_qkv.bias"),
    ("middle.2.norm2.weight", "mid_block.resnets.1.norm2.weight"),
    ("upsamples.level_3.0.conv1.weight", "up_blocks.0.resnets.0.conv1.weight"),
    ("upsamples.level_3.3.1.weight", "up_blocks.0.upsamplers.0.conv.weight"),
    ("upsamples.level_1.2.1.project_in.weight", "up_blocks.2.attentions.2.to_qkv.weight"),
    ("upsamples.level_0.2.skip.bias", "up_blocks.3.resnets.2.conv_shortcut.bias"),
])
def test_key_correspondence_for_the_cifar10_layout(ours, theirs):
    assert diffusers_key(ours, levels=4, num_res_blocks=2) == theirs


def test_cifar10_architecture_is_read_off_a_ddpm_torch_state_dict():
    with torch.device("meta"):
        sd = UNet(**CIFAR10).state_dict()
    kwargs = infer_unet_kwargs(sd)
    assert kwargs == {"in_channels": 3, "hid_channels": 128, "ch_multipliers": [1, 2, 2, 2], "num_res_blocks": 2,
                      "apply_attn": [False, True, False, False], "resample_with_conv": True}
    imported = import_ddpm_torch({"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 2040})
    assert imported.weights == "model" and len(imported.state_dict) == 304
    assert imported.model["norm_eps"] == 1e-6  # the released checkpoints' eps (ddpm-torch since 2023-07-16)
    assert import_ddpm_torch({"model": sd}, norm_eps=1e-5).model["norm_eps"] == 1e-5


def _ddpm_torch_checkpoint(shadow_prefix=""):
    model = randomize(UNet(hid_channels=32, ch_multipliers=(1, 2, 2), num_res_blocks=1,
                           apply_attn=(False, True, False)), seed=2)
    shadow = {f"{shadow_prefix}{k}": v + 0.01 for k, v in model.state_dict().items()}
    return model, {"model": {f"module.{k}": v for k, v in model.state_dict().items()},
                   "ema": {"decay": 0.9999, "shadow": shadow, "num_updates": 1234},
                   "optimizer": {"state": {}, "param_groups": []}, "scheduler": {"last_epoch": 7}, "epoch": 3}


@pytest.mark.slow
@pytest.mark.parametrize("shadow_prefix", ["", "module."])
def test_ddpm_torch_checkpoint_loads_ema_or_model(tmp_path, shadow_prefix):
    model, ckpt = _ddpm_torch_checkpoint(shadow_prefix)
    torch.save(ckpt, tmp_path / "cifar10_3.pt")
    ema, raw = load_network(tmp_path / "cifar10_3.pt"), load_network(tmp_path / "cifar10_3.pt", use_ema=False)
    assert (ema.format, ema.weights, ema.step, raw.weights) == ("ddpm-torch", "ema", 1234, "model")
    assert ema.config.dataset.name == "cifar10" and ema.config.diffusion.model_var_type == "fixed-large"
    for k, v in model.state_dict().items():
        assert torch.equal(raw.model.state_dict()[k], v) and torch.equal(ema.model.state_dict()[k], v + 0.01)


@pytest.mark.slow
@pytest.mark.parametrize("overrides, eps, other", [([], 1e-6, 1e-5), (["model.norm_eps=1e-5"], 1e-5, 1e-6)])
def test_ddpm_torch_import_uses_the_chosen_groupnorm_eps(tmp_path, overrides, eps, other):
    """Default 1e-6 (the released checkpoints); ``--set model.norm_eps=1e-5`` for pre-July-2023 ones. Every
    GroupNorm gets that eps, and the outputs equal those of ddpm-torch's network built with it, not the other."""
    model, ckpt = _ddpm_torch_checkpoint()
    torch.save(ckpt, tmp_path / "cifar10_3.pt")
    net = load_network(tmp_path / "cifar10_3.pt", use_ema=False, overrides=overrides)
    norms = [m for m in net.model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert net.config.model.norm_eps == eps and len(norms) > 10 and {m.eps for m in norms} == {eps}
    arch = dict(hid_channels=32, ch_multipliers=(1, 2, 2), num_res_blocks=1, apply_attn=(False, True, False))
    x, t = inputs(size=32)
    x = 1e-3 * x  # small activations, so the eps shows in the outputs
    with torch.no_grad():
        out = net.model(x, t)
        for e in (eps, other):
            reference = UNet(**arch, norm_eps=e).eval()
            reference.load_state_dict(model.state_dict())
            if e == eps:
                torch.testing.assert_close(out, reference(x, t), rtol=0, atol=0)
            else:
                assert not torch.allclose(out, reference(x, t), rtol=0, atol=1e-7)


def test_unsupported_layouts_list_the_keys_that_did_not_map(tmp_path, small_unet2d):
    model, ckpt = _ddpm_torch_checkpoint()
    ckpt["model"]["module.extra.weight"] = torch.zeros(3)
    del ckpt["model"]["module.middle.1.norm.bias"]
    torch.save(ckpt, tmp_path / "odd.pt")
    with pytest.raises(UserError) as err:
        load_network(tmp_path / "odd.pt", use_ema=False)
    msg = str(err.value)
    assert "did not map: extra.weight" in msg and "missing: middle.1.norm.bias" in msg and "\n" not in msg
    state = dict(small_unet2d.state_dict())
    state["mid_block.attentions.0.rotary.weight"] = state.pop("mid_block.attentions.0.to_q.weight")
    with pytest.raises(UserError, match=r"did not map: mid_block\.attentions\.0\.rotary\.weight.*"
                                        r"missing: mid_block\.attentions\.0\.to_q\.weight"):
        from_diffusers_state(state, unet_kwargs_from_diffusers(dict(small_unet2d.config)))
    conf = dict(small_unet2d.config, attention_head_dim=8, flip_sin_to_cos=True)
    with pytest.raises(UserError, match="flip_sin_to_cos=True.*attention_head_dim=8"):
        unet_kwargs_from_diffusers(conf)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    torch.save({}, tmp_path / "folder" / "diffusion_pytorch_model.bin")
    with pytest.raises(UserError, match="UNet2DConditionModel"):
        load_network(tmp_path / "folder")


def test_safetensors_reader_matches_the_library(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 4, generator=g), "f16": torch.randn(5, generator=g).half(),
               "bf16": torch.randn(2, 2, 2, generator=g).bfloat16(), "i64": torch.arange(-3, 6),
               "u8": torch.arange(7, dtype=torch.uint8), "mask": torch.rand(4, 4, generator=g) > 0.5,
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3)}
    st.save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    ours, theirs = read_safetensors(tmp_path / "x.safetensors"), st.load_file(tmp_path / "x.safetensors")
    assert ours.keys() == theirs.keys() == tensors.keys()
    for k in tensors:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    with pytest.raises(UserError, match="inconsistent offsets"):
        read_safetensors(tmp_path / "cut.safetensors")


def test_weights_are_read_with_the_safetensors_package_when_installed_else_with_the_parser(tmp_path, monkeypatch):
    st = pytest.importorskip("safetensors.torch")
    g = torch.Generator().manual_seed(1)
    tensors = {"conv_in.weight": torch.randn(4, 3, 3, 3, generator=g), "half": torch.randn(6, generator=g).half(),
               "bf16": torch.randn(2, 3, generator=g).bfloat16(), "steps": torch.arange(5), "flag": torch.tensor(True),
               "empty": torch.zeros(0, 2)}
    path, cut = tmp_path / "diffusion_pytorch_model.safetensors", tmp_path / "cut.safetensors"
    st.save_file(tensors, path, metadata={"format": "pt"})
    cut.write_bytes(path.read_bytes()[:-10])
    taken = []
    package_load, parser = st.load_file, convert.read_safetensors
    monkeypatch.setattr(st, "load_file", lambda *a, **kw: taken.append("package") or package_load(*a, **kw))
    monkeypatch.setattr(convert, "read_safetensors", lambda p: taken.append("parser") or parser(p))

    with_package = convert.read_weights_file(path)
    assert taken == ["package"]
    with pytest.raises(UserError, match="not a valid .safetensors file .*truncated"):
        convert.read_weights_file(cut)
    monkeypatch.setitem(sys.modules, "safetensors", None)  # as if the package were not installed
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    taken.clear()
    without = convert.read_weights_file(path)
    assert taken == ["parser"]
    with pytest.raises(UserError, match="not a valid .safetensors file .*truncated"):
        convert.read_weights_file(cut)

    assert with_package.keys() == without.keys() == tensors.keys()
    for k, t in tensors.items():
        for got in (with_package[k], without[k]):
            assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), k
