"""The names seed 001's design card promises (SparseUNet, RegUNet, CurriculumDiffusion with time-range control,
CurriculumTrainer, a MaskProLayer-wrapped UNet, configs/celeba32.json, train.py), each run with the seed's own
example code, sized down to tiny networks."""

import copy
import json
import runpy
import signal
import sys

import pytest
import torch
from torch import nn

from ddpm_curriculum.config import config_from_dict, load_config
from ddpm_curriculum.diffusion import CurriculumDiffusion, make_betas
from ddpm_curriculum.errors import UserError
from ddpm_curriculum.models import SparseUNet, RegUNet, UNet, wrap_maskpro
from ddpm_curriculum.pruning import MaskProLayer, get_model_sparsity_summary
from ddpm_curriculum.sparsity.group_l1 import GroupL1
from ddpm_curriculum.training import CurriculumTrainer

from .helpers import CPU, ROOT, inputs, randomize, tiny_cfg

# seed 001's model section ({"in_channels": 3, "hid_channels": 64, "ch_multipliers": [1, 2, 2], ...}) sized down:
# 16 → 32 channels, a 32-channel bottleneck
unet_kwargs = {"in_channels": 3, "hid_channels": 16, "ch_multipliers": [1, 2], "num_res_blocks": 1,
               "apply_attn": [False, False], "drop_rate": 0.0, "norm_groups": 8}
# seed 001's diffusion section with T = 100
SEED_DIFFUSION = {"timesteps": 100, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                  "model_mean_type": "eps", "model_var_type": "fixed-small", "loss_type": "mse"}
SEED_STAGES = [{"t_min": 0.8, "t_max": 1.0, "epochs": 1, "name": "stage1_high_noise"},
               {"t_min": 0.6, "t_max": 1.0, "epochs": 1, "name": "stage2_expand"},
               {"t_min": 0.4, "t_max": 1.0, "epochs": 1, "name": "stage3_expand"},
               {"t_min": 0.2, "t_max": 1.0, "epochs": 2, "name": "stage4_expand"},
               {"t_min": 0.0, "t_max": 1.0, "epochs": 5, "name": "stage5_full_range"}]


def seed_group_l1(model, lambda_val):
    """The seed's get_group_l1_penalty, copied: λ·Σ over Conv2d of the output channels' L2 norms."""
    penalty = torch.tensor(0.0)
    for _, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            weight = module.weight
            weight_flat = weight.view(weight.size(0), -1)
            channel_norms = torch.norm(weight_flat, p=2, dim=1)
            penalty = penalty + channel_norms.sum()
    return lambda_val * penalty


# ------------------------------------------------------------------------------------------ CurriculumDiffusion


def test_curriculum_diffusion_from_the_seeds_call_restricts_sampled_t():
    config = dict(SEED_DIFFUSION)
    betas = torch.linspace(config["beta_start"], config["beta_end"], config["timesteps"], dtype=torch.float64)
    # seed 001: "Create diffusion with curriculum support"
    diffusion = CurriculumDiffusion(betas=betas, **config)
    # Stage 1: High noise only (t ∈ [800, 1000]) — here T = 100
    diffusion.set_time_range(0.8, 1.0)
    g = torch.Generator().manual_seed(0)
    t = diffusion.sample_timesteps(4000, generator=g)
    assert diffusion.time_range == (80, 99) and int(t.min()) == 80 and int(t.max()) == 99
    # Stage 5: Full range (t ∈ [0, 1000])
    diffusion.set_time_range(0.0, 1.0)
    t = diffusion.sample_timesteps(4000, generator=g)
    assert int(t.min()) == 0 and int(t.max()) == 99 and len(t.unique()) == 100
    assert (diffusion.prediction_type, diffusion.var_type, diffusion.loss_type) == ("eps", "fixed-small", "mse")
    # the same process as the package's own spelling: equal loss on equal inputs
    ours = CurriculumDiffusion(make_betas("linear", 100), prediction_type="eps", var_type="fixed-small")
    x0, t = torch.randn(3, 3, 8, 8, generator=g), torch.tensor([0, 50, 99])
    noise = torch.randn(x0.shape, generator=g)
    net = randomize(UNet(**unet_kwargs))
    torch.testing.assert_close(diffusion.training_losses(net, x0, t, noise), ours.training_losses(net, x0, t, noise))
    assert CurriculumDiffusion(betas, model_mean_type="x_0").prediction_type == "x0"  # ddpm-torch's x0 name


@pytest.mark.parametrize("bad, match", [
    ({"model_mean_type": "mean"}, "posterior mean"), ({"model_var_type": "learned"}, "learned reverse variance"),
    ({"loss_type": "kl"}, "KL"), ({"timesteps": 1000}, "betas has 100 values"),
    ({"beta_end": 0.03}, "not the schedule"),
    ({"beta_schedule": "quad"}, "not the schedule"), ({"model_mean_type": "eps", "prediction_type": "v"}, "disagree"),
    ({"timestep": 100}, "unknown argument"),
])
def test_curriculum_diffusion_refuses_seed_values_it_does_not_implement(bad, match):
    with pytest.raises(UserError, match=match):
        CurriculumDiffusion(betas=make_betas("linear", 100), **{**SEED_DIFFUSION, **bad})


# ----------------------------------------------------------------------------------------------------- SparseUNet


def test_sparse_unet_from_the_seeds_arguments_is_sparse_and_its_masked_channels_are_silent():
    model = randomize(SparseUNet(initial_sparsity=0.8, regrowth_method="gradient", **unet_kwargs))
    # Bottleneck channels = ch_multipliers[-1] * hid_channels
    assert model.bottleneck_channels == 32
    active = model.channel_mask.bool()
    assert int(active.sum()) == 6  # floor(32 · 0.2), mode CS's stage-0 count
    assert int(SparseUNet(initial_sparsity=0.7, **unet_kwargs).channel_mask.sum()) == 9  # floor(9.6), the seed's int()
    assert abs(1 - 6 / 32 - 0.8) < 1 / 32
    assert model.channel_birth_stage.tolist() == [0] * 6 + [-1] * 26
    assert list(model.state_dict()) == list(SparseUNet(**unet_kwargs).state_dict())  # no new checkpoint keys
    x, t = inputs(size=8)
    with torch.no_grad():
        out = model(x, t)
        assert out.shape == x.shape and torch.isfinite(out).all()
        producer = model.middle[2].conv2.weight
        producer[~active] += 1.0  # a masked channel's own weights: the output must not move
        assert torch.equal(model(x, t), out)
        producer[active] += 1.0
        assert not torch.allclose(model(x, t), out)


def test_sparse_unet_seed_regrowth_picks_the_largest_accumulated_gradients():
    model = randomize(SparseUNet(initial_sparsity=0.8, regrowth_method="gradient", **unet_kwargs))
    x, t = inputs(size=8)
    expected = torch.zeros(32, dtype=torch.float64)
    for _ in range(2):  # the seed's step(): loss.backward(); model.accumulate_gradients()
        model.zero_grad()
        model(x, t).square().mean().backward()
        model.accumulate_gradients()
        expected += model.middle[0].conv2.weight.grad.abs().sum(dim=(1, 2, 3)).double()
    masked = model.channel_mask == 0
    torch.testing.assert_close(model.channel_grad_accum[masked], expected[masked])
    # _update_curriculum at stage 1: model.regrow_channels(target_sparsity, new_stage)
    chosen = model.regrow_channels(0.6, 1)
    assert int(model.channel_mask.sum()) == 13  # round(32 · 0.4), seed 001's table rule
    top = sorted(torch.nonzero(masked).flatten()[torch.argsort(-expected[masked])[:7]].tolist())
    assert chosen == top and (model.channel_birth_stage[chosen] == 1).all()
    with pytest.raises(UserError, match="only ever regrown"):
        model.regrow_channels(0.8, 2)


def test_sparse_unet_seed_regrowth_random_and_gate_gradient():
    model = SparseUNet(initial_sparsity=0.5, regrowth_method="random", **unet_kwargs)
    chosen = model.regrow_channels(0.25, 1, generator=torch.Generator().manual_seed(0))
    assert len(chosen) == 8 and min(chosen) >= 16 and int(model.channel_mask.sum()) == 24
    model = randomize(SparseUNet(initial_sparsity=0.5, regrowth_method="gate_gradient", **unet_kwargs))
    assert model.gate_probe is not None
    x, t = inputs(size=8)
    model(x, t).square().mean().backward()
    model.accumulate_gradients()
    assert (model.channel_grad_accum[16:] > 0).all() and (model.channel_grad_accum[:16] == 0).all()
    model.regrow_channels(0.0, 1)
    assert model.channel_mask.all() and model.gate_probe is None


def test_sparse_unet_refuses_seed_values_it_does_not_implement():
    with pytest.raises(UserError, match="regrowth_method"):
        SparseUNet(initial_sparsity=0.8, regrowth_method="magnitude", **unet_kwargs)
    with pytest.raises(UserError, match="outside"):
        SparseUNet(initial_sparsity=1.5, **unet_kwargs)
    plain = SparseUNet(**unet_kwargs)  # the config path: all channels active, regrowth by mode CS's extension
    assert plain.channel_mask.all() and plain.regrowth_method is None
    with pytest.raises(UserError, match="seed 001's standalone"):
        plain.regrow_channels(0.0, 1)


# -------------------------------------------------------------------------------------------------------- RegUNet


def test_reg_unet_is_the_unet_and_its_penalty_is_mode_crs():
    model = randomize(RegUNet(**unet_kwargs))
    unet = UNet(**unet_kwargs)
    unet.load_state_dict(model.state_dict())  # same keys, strict
    x, t = inputs(size=8)
    with torch.no_grad():
        assert torch.equal(model(x, t), unet(x, t))
    # the seed's CR loss: reg_loss = model.get_group_l1_penalty(self.current_lambda); total = mse + reg / B
    lam, batch = 3e-5, 8
    reg_loss = model.get_group_l1_penalty(lam)
    cfg = tiny_cfg("regularization.enabled=true", f"regularization.lambda_max={lam}", f"train.batch_size={batch}")
    assert cfg.regularization.combine == "reg_over_batch"
    cr_term = GroupL1(cfg, model).loss_terms(None)["reg"]  # mode CR's term at stage 0 (λ = lambda_max)
    torch.testing.assert_close(reg_loss / batch, cr_term)
    torch.testing.assert_close(reg_loss, seed_group_l1(model, lam))
    assert reg_loss.item() > 0 and model.get_group_l1_penalty(0).item() == 0.0
    reg_loss.backward()
    assert all(m.weight.grad is not None for _, m in model.get_conv_layers())


def test_reg_unet_finds_the_seeds_52_conv_layers_on_celeba32():
    with torch.device("meta"):  # seed 001's celeba32 model section; no weights needed to count
        model = RegUNet(in_channels=3, hid_channels=64, ch_multipliers=[1, 2, 2], num_res_blocks=2,
                        apply_attn=[False, False, False], drop_rate=0.0)
    conv_layers = model.get_conv_layers()
    assert len(conv_layers) == 52 and sum(m.out_channels for _, m in conv_layers) == 5827  # the seed's counts
    assert all(isinstance(m, nn.Conv2d) for _, m in conv_layers)


# --------------------------------------------------------------------------------------------------------- MaskPro


def test_wrap_maskpro_returns_the_maskpro_wrapped_unet():
    model = randomize(UNet(**unet_kwargs))
    dense = copy.deepcopy(model)
    keys = list(model.state_dict())
    # seed 004: wrapped_model = wrap_model_with_maskpro(model, n=2, m=4, target_layers=[".*conv.*", ".*linear.*"])
    wrapped_model = wrap_maskpro(model, n=2, m=4, target_layers=[".*conv.*", ".*linear.*"])
    assert wrapped_model is model and list(model.state_dict()) == keys
    want = {n for n, m in dense.named_modules() if isinstance(m, nn.Conv2d) and "conv" in n
            and not n.startswith(("in_conv", "out_conv"))}  # in_conv and out_conv are protected
    got = {n for n, m in model.named_modules() if isinstance(m, MaskProLayer)}
    assert got == want and len(want) >= 6
    summary = get_model_sparsity_summary(model)
    assert summary["overall_stats"]["overall_sparsity"] == pytest.approx(0.5)
    # the wrapped network computes the dense one with each wrapped weight times its 2:4 mask
    with torch.no_grad():
        for name in want:
            dense.get_submodule(name).weight.mul_(model.get_submodule(name).mask)
        x, t = inputs(size=8)
        torch.testing.assert_close(model(x, t), dense(x, t))


# ------------------------------------------------------------------------------------------------- the trainer


def seed_sections():
    """Seed 001's celeba32_cs.json sections, on a tiny twoscale dataset (8 steps per epoch) and network."""
    return {
        "dataset": {"name": "twoscale", "image_size": 8, "num_samples": 64, "k1": 2, "k2": 2},
        "diffusion": dict(SEED_DIFFUSION),
        "model": {k: v for k, v in unet_kwargs.items()},
        "train": {"lr": 2e-4, "batch_size": 8, "grad_norm": 1.0, "warmup": 5, "use_ema": True, "ema_decay": 0.9999,
                  "num_samples": 4, "image_intv": 1},
        "curriculum": {"enabled": True, "stages": [dict(s) for s in SEED_STAGES]},
        "sparsity": {"enabled": True, "initial_sparsity": 0.8, "regrowth_method": "gradient"},
        "regularization": {"enabled": False, "lambda_max": 0.00003},
    }


def test_curriculum_trainer_constructs_from_the_seeds_arguments(tmp_path):
    configs = seed_sections()
    kwargs = {k: configs[k] for k in ("dataset", "diffusion", "model", "train")}
    trainer = CurriculumTrainer.from_configs(
        curriculum_config=configs["curriculum"],
        sparsity_config=configs["sparsity"],      # CS mode
        regularization_config=configs["regularization"],  # CR mode
        epochs=10, run_dir=tmp_path, device="cpu", progress=False, **kwargs)  # epochs: ddpm-torch Trainer's
    cfg = trainer.cfg
    assert cfg.mode == "CS" and cfg.train.epochs == 10 and cfg.sparsity.regrowth_method == "gradient"
    assert [s.name for s in cfg.curriculum.stages] == [s["name"] for s in SEED_STAGES]
    assert isinstance(trainer.model, SparseUNet) and trainer.model.hid_channels == 16
    assert isinstance(trainer.diffusion, CurriculumDiffusion) and trainer.device == CPU
    assert trainer.total_steps == 80 and len(trainer.plan) == 5
    as_file = copy.deepcopy(configs)
    as_file["train"]["epochs"] = 10
    assert cfg.to_dict() == config_from_dict(as_file).to_dict()  # what the JSON file gives
    cr = CurriculumTrainer.from_configs(configs["curriculum"], {"enabled": False},
                                        {"enabled": True, "lambda_max": 0.00003}, run_dir=tmp_path / "cr",
                                        device="cpu", **kwargs, epochs=10)
    assert cr.cfg.mode == "CR" and type(cr.model) is UNet


@pytest.mark.parametrize("extra, match", [
    ({"model": nn.Linear(1, 1)}, "network is built from the config"), ({"optimizer": object()}, "optimizer"),
    ({"trainloader": []}, "dataset section"), ({"curriculum": {}}, "curriculum_config"),
    ({"learning_rate": 1e-4}, "unknown argument"), ({"epochs": 10, "train": {"epochs": 10}}, "given twice"),
])
def test_curriculum_trainer_from_configs_refuses_what_it_builds_itself(extra, match, tmp_path):
    with pytest.raises(UserError, match=match):
        CurriculumTrainer.from_configs({"enabled": False}, run_dir=tmp_path, device="cpu", **extra)


# ------------------------------------------------------------------------------------- celeba32.json, train.py


def test_celeba32_is_standard_training_with_the_seeds_celeba32_sections():
    base, c = load_config(ROOT / "configs/celeba32.json"), load_config(ROOT / "configs/celeba32_c.json")
    assert base.mode == "baseline" and not base.curriculum.enabled
    for section in ("dataset", "diffusion", "model", "train"):
        assert getattr(base, section) == getattr(c, section), section


def test_train_py_is_a_thin_wrapper_whose_dry_run_needs_no_celeba(tmp_path, capsys, monkeypatch):
    text = (ROOT / "train.py").read_text()
    assert "from ddpm_curriculum.train import run" in text and "raise SystemExit(run())" in text
    argv = ["train.py", "--config-path", str(ROOT / "configs/celeba32.json"), "--dry-run",
            "--set", f"dataset.root={tmp_path}"]  # an empty folder: no CelebA
    monkeypatch.setattr(sys, "argv", argv)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:  # run() installs the one-line stop handlers: keep them out of this process
        with pytest.raises(SystemExit) as exc:
            runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    out = capsys.readouterr().out
    assert exc.value.code == 0
    assert "mode: baseline" in out and "dataset not available: CelebA not found" in out
    assert json.loads(out[:out.index("\nmode:")])["curriculum"]["enabled"] is False
