"""Structured pruning (Torch-Pruning): the smaller network against a brute-force masked original, parameter
and MAC counts against the removed channels, the saved network through load_network, fine-tuning and MaskPro
on it, and bad input (missing Torch-Pruning, bad options)."""

import copy
import json
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddpm_curriculum.errors import UserError, run_cli
from ddpm_curriculum.models import UNet
from ddpm_curriculum.pruning import cli
from ddpm_curriculum.pruning.cost import count_macs
from ddpm_curriculum.pruning.finetune import adopt_source_architecture
from ddpm_curriculum.pruning.structured import (StructuredOptions, diffusion_loss_gradients, require_torch_pruning,
                                                structured_prune)
from ddpm_curriculum.training import CurriculumTrainer, builders
from ddpm_curriculum.training.checkpoint import load_checkpoint, load_network
from .helpers import CPU, PRUNE, randomize, tiny_cfg

pytest.importorskip("torch_pruning")

SHAPE = (3, 8, 8)


def small_unet() -> UNet:
    """Two levels, attention at the lower one, 4 GroupNorm groups: skips, concatenations and attention."""
    return randomize(UNet(hid_channels=16, ch_multipliers=(1, 2), num_res_blocks=1, apply_attn=(False, True),
                          norm_groups=4))


def inputs(batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *SHAPE), generator=g), torch.tensor([0, 37, 99][:batch])


class MaskedGroupNorm(nn.Module):
    """The original GroupNorm computed over the kept channels only (grouped in order, as the pruned layer
    groups them), zero at the removed ones."""

    def __init__(self, gn: nn.GroupNorm, keep):
        super().__init__()
        self.gn, self.keep = gn, torch.tensor(keep)

    def forward(self, h):
        out = torch.zeros_like(h)
        k = self.keep
        out[:, k] = F.group_norm(h[:, k], self.gn.num_groups, self.gn.weight[k], self.gn.bias[k], self.gn.eps)
        return out


@torch.no_grad()
def masked_reference(original: nn.Module, kept: dict) -> nn.Module:
    """The original network with the removed channels' contributions removed: their output rows (and biases)
    zeroed, their input columns zeroed, GroupNorms over the kept channels only."""
    ref = copy.deepcopy(original)
    for name, k in kept.items():
        mod = ref.get_submodule(name)
        if isinstance(mod, nn.GroupNorm):
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent), child, MaskedGroupNorm(mod, k["out"]))
            continue
        for dim, key in ((0, "out"), (1, "in")):
            if key in k:
                drop = torch.ones(mod.weight.shape[dim], dtype=torch.bool)
                drop[k[key]] = False
                mod.weight.index_fill_(dim, drop.nonzero().flatten(), 0.0)
                if dim == 0 and mod.bias is not None:
                    mod.bias[drop] = 0.0
    return ref


def prune_small(criterion="magnitude", ratio=0.5, protect=(), **kw):
    original = small_unet()
    model = copy.deepcopy(original)
    x, t = inputs(1)
    grads = None
    if criterion == "taylor":
        cfg = tiny_cfg("diffusion.timesteps=100")
        diffusion = builders.make_diffusion(cfg)
        grads = lambda: diffusion_loss_gradients(model, diffusion, inputs(4)[0], 0.999)  # noqa: E731
    result = structured_prune(model, (x, t), StructuredOptions(ratio, criterion, protect=protect, **kw), grads)
    return original, model, result


@pytest.mark.parametrize("criterion,protect", [("magnitude", ()), ("random", ()), ("taylor", ()),
                                               ("magnitude", cli.DEFAULT_PROTECT)])
def test_pruned_network_equals_the_masked_original(criterion, protect):
    original, pruned, result = prune_small(criterion, protect=protect)
    x, t = inputs()
    assert pruned(x, t).shape == x.shape
    torch.testing.assert_close(pruned(x, t), masked_reference(original, result.kept)(x, t), atol=2e-5, rtol=1e-5)
    assert not torch.allclose(pruned(x, t), original(x, t), atol=1e-3)  # something was removed
    for name, k in result.kept.items():  # each pruned layer holds the original's kept rows and columns
        w, w0 = pruned.get_submodule(name).weight, original.get_submodule(name).weight
        expect = w0[k.get("out", slice(None))]
        if "in" in k:
            expect = expect[:, k["in"]]
        assert torch.equal(w, expect), name


def test_groupnorm_groups_stay_valid_and_protected_layers_keep_their_outputs():
    original, pruned, _ = prune_small(protect=cli.DEFAULT_PROTECT)
    for name, m in pruned.named_modules():
        if isinstance(m, nn.GroupNorm):
            m0 = original.get_submodule(name)
            assert m.num_groups == m0.num_groups and m.num_channels % m.num_groups == 0, name
    for name in ("in_conv", "out_conv.2", "embed.0", "embed.2", "middle.1.project_in"):
        assert pruned.get_submodule(name).weight.shape[0] == original.get_submodule(name).weight.shape[0], name
    assert pruned.middle[0].conv1.out_channels == 16  # 32 → 16 at ratio 0.5


def _geometry(model, x, t):
    """{conv/linear name: output spatial size} and {attention name: (HW, q/k/v width)} of one forward."""
    from ddpm_curriculum.models import AttentionBlock

    sizes, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(
                lambda m, i, o, n=name: sizes.__setitem__(n, o.shape[-2] * o.shape[-1] if o.ndim == 4 else 1)))
        elif isinstance(m, AttentionBlock):
            hooks.append(m.register_forward_hook(
                lambda m, i, o, n=name: sizes.__setitem__(n, (i[0].shape[-2] * i[0].shape[-1],
                                                              m.project_in.out_channels // 3))))
    model(x, t)
    for h in hooks:
        h.remove()
    return sizes


def test_parameters_and_macs_match_the_removed_channels():
    original, pruned, result = prune_small()
    x, t = inputs(1)
    geo = _geometry(original, x, t)
    params = macs = 0
    for name, m in original.named_modules():
        k = result.kept.get(name, {})
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.GroupNorm)):
            out = len(k.get("out", range(m.weight.shape[0])))
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            inn = len(k.get("in", range(m.weight.shape[1])))
            taps = m.weight[0, 0].numel()
            params += out * inn * taps + (out if m.bias is not None else 0)
            macs += geo[name] * out * inn * taps
        elif isinstance(m, nn.GroupNorm):
            params += 2 * out
        elif name in geo:  # attention: q·kᵀ and the sum over v, width unchanged
            hw, width = geo[name]
            macs += 2 * hw * hw * width
    assert sum(p.numel() for p in pruned.parameters()) == params
    assert count_macs(pruned, SHAPE) == macs
    assert params < 0.4 * sum(p.numel() for p in original.parameters())


def test_taylor_gradients_are_diff_prunings_sum_up_to_the_threshold():
    diffusion = builders.make_diffusion(tiny_cfg("diffusion.timesteps=100"))
    net, x0 = small_unet(), inputs(4)[0]
    losses = diffusion_loss_gradients(net, diffusion, x0, 0.999, torch.Generator().manual_seed(0))
    assert all(a >= 0.999 * max(losses[:i + 1]) for i, a in enumerate(losses[:-1]))
    assert losses[-1] < 0.999 * max(losses) and len(losses) < diffusion.timesteps
    # brute force: the same network, t = 0 … last used, one noise draw, gradients summed by hand
    ref, total = small_unet().eval(), {}
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    for s, expect in enumerate(losses):
        ref.zero_grad(set_to_none=True)
        loss = diffusion.training_losses(ref, x0, torch.full((4,), s), eps).mean()
        loss.backward()
        assert loss.item() == pytest.approx(expect, rel=1e-5)
        for n, p in ref.named_parameters():
            total[n] = total.get(n, 0) + p.grad
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, total[n], atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------- saved network


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A checkpoint of a (randomised, untrained) tiny twoscale UNet with 8 GroupNorm groups."""
    d = tmp_path_factory.mktemp("dense")
    cfg = tiny_cfg("model.norm_groups=8", "model.drop_rate=0.0")
    model = randomize(builders.make_model(cfg))
    torch.save({"format_version": 1, "config": cfg.to_dict(), "model": model.state_dict(), "step": 3},
               d / "dense.pt")
    return d / "dense.pt"


def prune_cli(dense, out, *extra):
    return run_cli(cli.main, ["--method", "structured", "--model_path", str(dense), "--save_path", str(out),
                              "--eval_samples", "0", "--preview_samples", "0", *extra])


def test_saved_network_loads_everywhere_without_flags(dense, tmp_path):
    assert prune_cli(dense, tmp_path / "s", "--pruning_ratio", "0.5") == 0
    net = load_network(tmp_path / "s" / "pruned.pt")
    assert net.config.model.widths and net.masks is None
    state = load_checkpoint(tmp_path / "s" / "pruned.pt")
    assert state["pruning"]["method"] == "structured"
    # the same pruning in memory gives the same network, bit for bit
    src = load_network(dense)
    model = src.model.to(memory_format=torch.contiguous_format)
    structured_prune(model, (torch.zeros(1, *SHAPE), torch.zeros(1, dtype=torch.long)),
                     StructuredOptions(0.5, protect=cli.DEFAULT_PROTECT))
    x, t = inputs()
    with torch.no_grad():
        torch.testing.assert_close(net.model(x, t), model(x, t), atol=1e-6, rtol=0)
    stats = json.loads((tmp_path / "s" / "pruning_stats.json").read_text())
    assert stats["after"]["params"] == sum(p.numel() for p in net.model.parameters()) < stats["before"]["params"]
    assert stats["after"]["macs"] == count_macs(net.model, SHAPE) < stats["before"]["macs"]


def test_finetune_and_maskpro_run_on_the_structured_network(dense, tmp_path):
    assert prune_cli(dense, tmp_path / "s") == 0
    source = tmp_path / "s" / "pruned.pt"
    cfg, changed = adopt_source_architecture(tiny_cfg(*PRUNE, "maskpro.phase=finetune", f"maskpro.source={source}",
                                                      "train.steps=1", "curriculum.enabled=false"))
    assert "model.widths" in changed
    trainer = CurriculumTrainer(cfg, tmp_path / "ft", CPU, progress=False)
    trainer.train()
    tuned = load_network(tmp_path / "ft", use_ema=False)
    start = load_network(source)
    assert any(not torch.equal(a, b) for a, b in zip(tuned.model.state_dict().values(),
                                                       start.model.state_dict().values(), strict=True))
    # hybrid stage 2: N:M masks of the fine-tuned smaller network, then one MaskPro update
    assert run_cli(cli.main, ["--method", "nm", "--model_path", str(tmp_path / "ft"), "--save_path",
                              str(tmp_path / "nm"), "--eval_samples", "0", "--preview_samples", "0"]) == 0
    learn, _ = adopt_source_architecture(tiny_cfg(*PRUNE, f"maskpro.source={tmp_path / 'ft'}", "train.steps=1",
                                                  "curriculum.enabled=false",
                                                  f"maskpro.masks={tmp_path / 'nm' / 'masks.pt'}"))
    CurriculumTrainer(learn, tmp_path / "mp", CPU, progress=False).train()
    net = load_network(tmp_path / "mp")
    assert net.config.model.widths == tuned.config.model.widths and net.masks


def test_bad_input_is_one_line(dense, tmp_path, monkeypatch, capsys):
    assert prune_cli(dense, tmp_path / "a", "--pruning_ratio", "1.5") == 2
    assert prune_cli(dense, tmp_path / "b", "--layers", "conv1") == 2
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # import torch_pruning now raises ImportError
    with pytest.raises(UserError, match=r"pip install -e '\.\[prune\]'"):
        require_torch_pruning()
    assert prune_cli(dense, tmp_path / "c") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(e.startswith("error: ") for e in err)
    assert "[0, 1)" in err[0] and "--layers" in err[1] and "Torch-Pruning" in err[2]


# ------------------------------------------------------------------------------------- compression report


def test_compression_report_quick(dense, tmp_path):
    from ddpm_curriculum.pruning import report

    nm = ["--method", "nm", "--eval_samples", "0", "--preview_samples", "0"]
    assert prune_cli(dense, tmp_path / "s") == 0
    assert run_cli(cli.main, [*nm, "--model_path", str(dense), "--save_path", str(tmp_path / "nm")]) == 0
    assert run_cli(cli.main, [*nm, "--model_path", str(tmp_path / "s" / "pruned.pt"),
                              "--save_path", str(tmp_path / "hy")]) == 0
    paths = {"dense": dense, "structured": tmp_path / "s" / "pruned.pt", "nm": tmp_path / "nm" / "pruned.pt",
             "hybrid": tmp_path / "hy" / "pruned.pt"}
    out = tmp_path / "report"
    candidates = [f"--candidate={k}={v}" for k, v in paths.items()]
    assert run_cli(report.main, ["--quick", "--out", str(out), *candidates]) == 0
    res = json.loads((out / "evaluation_results.json").read_text())
    rows = res["candidates"]
    assert [rows[k]["kind"] for k in paths] == ["dense", "structured", "N:M", "hybrid"]
    for name, path in paths.items():
        model = load_network(path).model
        assert rows[name]["params"] == sum(p.numel() for p in model.parameters())
        assert rows[name]["nonzeros"] == sum(int((p != 0).sum()) for p in model.parameters())
        assert rows[name]["macs_per_image"] == count_macs(model, SHAPE)
        assert len(rows[name]["latency_sec"]["rounds"]) == 3 and rows[name]["oracle_metrics"]["num_samples"] == 16
    d, s, n, h = (rows[k] for k in paths)
    assert d["latency_vs_reference"] == 1.0 and s["macs_per_image"] < d["macs_per_image"] == n["macs_per_image"]
    assert n["nonzeros"] < n["params"] == d["params"] and h["nonzeros"] < h["params"] == s["params"]
    assert d["nm_compact_bytes"] is None and n["nm_compact_bytes"] < n["state_dict_bytes"]
    assert h["nm_compact_bytes"] < h["state_dict_bytes"] < d["state_dict_bytes"]
    text = (out / "comparison_table.md").read_text()
    assert all(f"| {k} |" in text for k in paths) and "storage" in text
    assert (out / "comparison.png").stat().st_size > 0


def test_report_memory_and_bad_input(dense, tmp_path, capsys):
    from ddpm_curriculum.pruning import report

    peak = torch.ones(128 * 1024 * 1024)  # 512 MiB: an earlier process peak above the sampling's (as under pytest)
    del peak
    mem = report.sampling_peak_rss(str(dense), report.QUICK)
    assert mem["maxrss_after_sampling_bytes"] >= mem["maxrss_loaded_bytes"] > 512 * 1024 * 1024
    if sys.platform == "linux":
        assert mem["sampling_added_bytes"] is not None and mem["sampling_added_bytes"] >= 0
    assert run_cli(report.main, ["--out", str(tmp_path), "--candidate", "dense"]) == 2
    assert run_cli(report.main, ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "NAME=PATH" in err[0] and "at least one" in err[1]
