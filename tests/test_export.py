"""Export to diffusers: the folder loads with UNet2DModel.from_pretrained (safetensors and .bin) and computes what
the project's network computes; its scheduler config gives the same ᾱ; the importer reads it back exactly;
networks UNet2DModel cannot express are refused with one line."""

import json

import pytest
import torch
from torch import nn

from ddpm_curriculum.errors import UserError, run_cli
from ddpm_curriculum.models import UNet
from ddpm_curriculum.models.export import BIN_NAME, SAFETENSORS_NAME, export_diffusers
from ddpm_curriculum.pruning.cli import main as prune_main
from ddpm_curriculum.training.checkpoint import load_network
from .helpers import inputs, randomize, run, tiny, tiny_cfg

diffusers = pytest.importorskip("diffusers")

DIFFUSION = {"timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
             "model_mean_type": "eps", "model_var_type": "fixed-large", "loss_type": "mse"}


def _cfg(model: UNet) -> dict:
    return {"norm_eps": model.norm_eps, "norm_groups": model.norm_groups, "drop_rate": 0.0}


def _assert_same_outputs(ours: nn.Module, theirs, size: int, timesteps: int = 1000):
    x, _ = inputs(batch=3, size=size, seed=5)
    t = torch.randint(0, timesteps, (3,), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = theirs(x, t).sample
        out = ours(x, t)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(ref, out, rtol=0, atol=2e-5)


@pytest.mark.parametrize("weights_format, file", [("safetensors", SAFETENSORS_NAME), ("bin", BIN_NAME)])
def test_exported_folder_loads_in_diffusers_with_the_same_outputs(tmp_path, weights_format, file):
    if weights_format == "safetensors":
        pytest.importorskip("safetensors")
    # the CIFAR-10 layout at a small width: 4 levels, attention at the second, 2 blocks per level
    model = randomize(UNet(hid_channels=32, ch_multipliers=(1, 2, 2, 2), num_res_blocks=2,
                           apply_attn=(False, True, False, False)), seed=3).eval()
    res = export_diffusers(model, _cfg(model), DIFFUSION, 32, tmp_path / "unet", weights_format)
    assert res["weights"] == file and sorted(p.name for p in (tmp_path / "unet").iterdir()) == sorted(
        ["config.json", file, "scheduler_config.json"])
    theirs = diffusers.UNet2DModel.from_pretrained(tmp_path / "unet").eval()
    assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in model.parameters())
    _assert_same_outputs(model, theirs, 32)
    scheduler = diffusers.DDPMScheduler.from_pretrained(tmp_path / "unet")
    back = load_network(tmp_path / "unet")  # the project's importer reads the folder back exactly
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), torch.from_numpy(back.diffusion.alphas_bar),
                               rtol=1e-6, atol=1e-9)
    assert back.config.diffusion.model_var_type == "fixed-large" and back.config.dataset.name == "cifar10"
    assert all(torch.equal(back.model.state_dict()[k], v) for k, v in model.state_dict().items())


def test_prune_export_writes_a_diffusers_folder_of_a_run_and_a_pruned_network(tmp_path):
    cfg = tiny_cfg("eval.num_samples=0", "train.num_samples=0", "train.steps=6", "diffusion.beta_schedule=cosine")
    run(cfg, tmp_path / "run")
    assert run_cli(prune_main, ["--method", "nm", "--model_path", str(tmp_path / "run"), "--save_path",
                                str(tmp_path / "nm"), "--device", "cpu", "--eval-samples", "0",
                                "--preview-samples", "0"]) == 0
    for source in (tmp_path / "run", tmp_path / "nm" / "pruned.pt"):
        net = load_network(source)
        with torch.no_grad():  # the trained net's zero-ish init convs would make the comparison trivial
            for p in net.model.parameters():
                p.add_(0.05 * torch.randn_like(p))
            if net.masks:
                from ddpm_curriculum.pruning.masks import apply_masks
                apply_masks(net.model, net.masks)
        state = torch.load(source if source.is_file() else next((source / "checkpoints").glob("ckpt_*.pt")),
                           weights_only=True)
        state["ema" if state.get("ema") is not None else "model"] = net.model.state_dict()
        torch.save(state, tmp_path / "perturbed.pt")
        out = tmp_path / f"export_{source.name}"
        assert run_cli(prune_main, ["export", "--format", "diffusers", "--model_path", str(tmp_path / "perturbed.pt"),
                                    "--save_path", str(out)]) == 0
        theirs = diffusers.UNet2DModel.from_pretrained(out).eval()
        _assert_same_outputs(net.model, theirs, 8, net.diffusion.timesteps)
        conf = json.loads((out / "scheduler_config.json").read_text())
        assert conf["beta_schedule"] == "squaredcos_cap_v2" and conf["num_train_timesteps"] == 100
        if net.masks:  # the pruned zeros are the exported weights
            name = next(iter(net.masks))
            exported = load_network(out).model.get_submodule(name).weight
            assert torch.all(exported[~net.masks[name]] == 0)


def _narrow_second_block(model: UNet, width: int) -> UNet:
    """What a structured prune of ``downsamples.level_0.1``'s inner channels leaves: a block narrower than its level."""
    block = model.downsamples["level_0"][1]
    out_ch = block.conv2.out_channels
    block.conv1 = nn.Conv2d(block.conv1.in_channels, width, 3, padding=1)
    block.fc = nn.Linear(block.fc.in_features, width)
    block.norm2 = nn.GroupNorm(min(model.norm_groups, width), width, eps=model.norm_eps)
    block.conv2 = nn.Conv2d(width, out_ch, 3, padding=1)
    return model


def test_non_uniform_widths_are_refused_with_the_keys(tmp_path):
    model = _narrow_second_block(randomize(tiny(), seed=1), 16).eval()
    model(*inputs(size=16))  # a working network, just not one UNet2DModel can express
    with pytest.raises(UserError) as err:
        export_diffusers(model, _cfg(model), DIFFUSION, 16, tmp_path / "x")
    msg = str(err.value)
    assert "per-block widths that differ within a level" in msg and "block_out_channels [32, 64]" in msg
    assert "downsamples.level_0.1.conv1.weight (16, 32, 3, 3)" in msg and "\n" not in msg
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("model, fragment", [
    (tiny(resample_with_conv=False), "always resamples with convolutions"),
    (nn.Sequential(nn.Conv2d(3, 3, 1)), "only the plain UNet"),
])
def test_unmappable_networks_are_refused(tmp_path, model, fragment):
    with pytest.raises(UserError, match=fragment):
        export_diffusers(model, {"norm_eps": 1e-6, "norm_groups": 32, "drop_rate": 0.0}, DIFFUSION, 16, tmp_path)
