"""Seeds 003/004's names and files: each alias in the seed's own spelling gives what the project's spelling
gives; seed 003's per-layer mask folder round-trips; its baseline-loss arrays equal a direct computation;
MaskPro refuses an unstructured initial mask with a message saying how to make an N:M one."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddpm_curriculum.errors import UserError, run_cli
from ddpm_curriculum.pruning import MaskProLayer, get_model_sparsity_summary, wrap_model_with_maskpro
from ddpm_curriculum.pruning.cli import main as prune_main
from ddpm_curriculum.pruning.masks import load_masks, save_masks
from ddpm_curriculum.sampling.cli import main as generate_main
from ddpm_curriculum.training import builders
from ddpm_curriculum.training.checkpoint import load_network
from ddpm_curriculum.training.sampler import mix_seed
from .helpers import randomize, tiny

QUIET = ["--device", "cpu", "--eval-samples", "0", "--preview-samples", "0"]


@pytest.fixture(scope="module")
def trained(tiny_run):
    """The session's tiny trained run (tests/conftest.py); every test here only reads it."""
    return tiny_run


@pytest.fixture(scope="module")
def magnitude30(trained, tmp_path_factory):
    """Seed 003 step 1: a 30% per-layer magnitude prune (the seed's spelling --pruner)."""
    out = tmp_path_factory.mktemp("mag30")
    assert run_cli(prune_main, ["--pruner", "magnitude", "--pruning_ratio", "0.3", "--model_path", str(trained),
                                "--save_path", str(out), *QUIET]) == 0
    return out


def _brute_nonzero_masks(model, names):
    return {k: model.get_submodule(k).weight.detach() != 0 for k in names}


# ------------------------------------------------------------------------------------------ seed 004 API


def test_maskpro_layer_takes_the_seed_004_keywords():
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 128, 3)
    reference_weight = conv.weight.detach().clone()
    layer = MaskProLayer(original_layer=conv, n=2, m=4)
    # reference mask by hand: the 2 largest |w| of every 4 consecutive input channels at each kernel tap
    groups = reference_weight.permute(0, 2, 3, 1).reshape(-1, 4).abs()
    keep = torch.zeros_like(groups, dtype=torch.bool)
    for g in range(groups.shape[0]):
        keep[g, sorted(range(4), key=lambda j: -groups[g, j].item())[:2]] = True
    keep = keep.reshape(128, 3, 3, 64).permute(0, 3, 1, 2)
    assert torch.equal(layer.mask, keep)
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.conv2d(x, reference_weight * keep, conv.bias), rtol=0, atol=1e-5)
    positional = MaskProLayer(nn.Conv2d(64, 128, 3), 2, 4)
    assert (positional.n, positional.m) == (layer.n, layer.m) == (2, 4)


def test_sparsity_summary_has_the_seed_004_overall_stats():
    model = randomize(tiny(hid_channels=32, num_res_blocks=1), seed=1).eval()
    wrapped = wrap_model_with_maskpro(model, n=2, m=4, target_layers=[".*conv.*", ".*linear.*"])
    summary = get_model_sparsity_summary(model)
    stats = summary["overall_stats"]
    pruned = sum(int((~w.top_mask()).sum()) for w in wrapped.values())
    total = sum(w.weight.numel() for w in wrapped.values())
    assert all("conv" in k for k in wrapped) and stats["layers"] == len(wrapped)
    assert stats["overall_sparsity"] == pruned / total == 0.5 and stats["nm_compliance"] == 1.0
    assert stats["network_sparsity"] == summary["totals"]["overall_sparsity"]
    # an unwrapped network: over every Conv2d/Linear, counted from the zeros
    plain = randomize(tiny(hid_channels=32, num_res_blocks=1), seed=1)
    layers = [m for m in plain.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        layers[3].weight[:, :5] = 0
    zeros = sum(int((m.weight == 0).sum()) for m in layers)
    assert get_model_sparsity_summary(plain)["overall_stats"]["overall_sparsity"] == \
        pytest.approx(zeros / sum(m.weight.numel() for m in layers), rel=1e-12, abs=0)


def test_pruning_method_is_seed_004_spelling_of_structured_pruning(trained, tmp_path, capsys):
    """Seed 004's stage 1 (Diff-Pruning) is structured: --pruning_method X = --method structured --criterion X."""
    pytest.importorskip("torch_pruning")
    args = ["--pruning_ratio", "0.5", "--model_path", str(trained), *QUIET]
    assert run_cli(prune_main, ["--pruning_method", "random", "--save_path", str(tmp_path / "a"), *args]) == 0
    assert run_cli(prune_main, ["--method", "structured", "--criterion", "random", "--save_path",
                                str(tmp_path / "b"), *args]) == 0
    a, b = load_network(tmp_path / "a" / "pruned.pt"), load_network(tmp_path / "b" / "pruned.pt")
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.config.model.widths and a.config.model.widths == b.config.model.widths
    stats = json.loads((tmp_path / "a" / "pruning_stats.json").read_text())
    assert stats["method"] == "structured" and stats["criterion"] == "random"
    capsys.readouterr()
    for extra, fragment in ((["--method", "nm"], "--method nm conflicts with --pruning_method random"),
                            (["--criterion", "taylor"], "--pruning_method random conflicts with --criterion taylor")):
        code = run_cli(prune_main, ["--pruning_method", "random", *extra, "--save_path", str(tmp_path), *args])
        err = capsys.readouterr().err
        assert code == 2 and fragment in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------------------- seed 003 mask files


def test_extract_writes_the_seed_003_mask_folder_and_it_round_trips(magnitude30, tmp_path):
    folder = tmp_path / "initial_mask_diffusion"
    # seed 003: get_mask_diffusion.py --model_path PRUNED --output_dir DIR (here: prune.py extract)
    assert run_cli(prune_main, ["extract", "--model_path", str(magnitude30 / "pruned.pt"), "--output_dir",
                                str(folder), *QUIET]) == 0
    pruned = load_network(magnitude30 / "pruned.pt")
    one_file = load_masks(magnitude30 / "masks.pt")
    expected = _brute_nonzero_masks(pruned.model, one_file)
    files = sorted(p.name for p in folder.glob("*.pt") if p.name not in ("pruned.pt", "masks.pt"))
    assert files == sorted(f"{k}.pt" for k in expected)
    for name, keep in expected.items():
        loaded = torch.load(folder / f"{name}.pt", map_location="cpu", weights_only=True)
        assert loaded.dtype == torch.bool and torch.equal(loaded, keep) and torch.equal(loaded, one_file[name])
    summary = (folder / "extraction_summary.txt").read_text()
    assert all(f"{k}.pt" in summary for k in expected) and "total:" in summary
    # the folder is also what every mask option reads (load_masks); prune.py's pruned.pt/masks.pt there are skipped
    assert (folder / "pruned.pt").is_file() and (folder / "masks.pt").is_file()
    back = load_masks(folder)
    assert back.keys() == expected.keys() and all(torch.equal(back[k], expected[k]) for k in expected)


def test_maskpro_refuses_an_unstructured_initial_mask_with_the_fix(trained, magnitude30):
    masks = load_masks(magnitude30 / "masks.pt")  # seed 003: MaskPro from the 30% magnitude prune's masks
    model = load_network(trained).model
    with pytest.raises(UserError) as err:
        wrap_model_with_maskpro(model, 2, 4, initial_masks=masks, protect=())
    msg = str(err.value)
    assert f"{len(masks)} of the {len(masks)} initial masks are not exactly 2:4" in msg and "\n" not in msg
    assert "prune.py --method nm --n 2 --m 4" in msg and "maskpro.masks=DIR/masks.pt" in msg


# --------------------------------------------------------------------------------- seed 003 baseline loss


def test_baseline_loss_arrays_match_a_direct_computation(trained, magnitude30, tmp_path):
    folder, out = tmp_path / "masks", tmp_path / "baseline_losses"
    assert run_cli(prune_main, ["extract", "--model_path", str(magnitude30 / "pruned.pt"), "--output_dir",
                                str(folder), *QUIET]) == 0
    # seed 003: inference_loss_diffusion.py --original_model … --dataset_size --batch_size --max_batches --targets
    assert run_cli(prune_main, ["baseline_loss", "--original_model", str(trained), "--dataset_size", "10",
                                "--batch_size", "4", "--max_batches", "2", "--targets", "down_blocks",
                                "--initial_mask_path", str(folder), "--output_dir", str(out), "--seed", "3",
                                "--device", "cpu"]) == 0
    arrays = {k: np.load(out / f"{k}.npy", allow_pickle=False) for k in ("batch_losses", "sample_losses", "timesteps")}
    summary = json.loads((out / "summary.json").read_text())

    # direct: dense network, only the down-path masks multiplied in by hand, x_t and the ε-MSE from the formulas
    net = load_network(trained)
    assert net.config.diffusion.loss_type == "mse" and net.config.diffusion.model_mean_type == "eps"
    masks = {k: v for k, v in load_masks(magnitude30 / "masks.pt").items() if k.startswith("downsamples.")}
    assert 0 < len(masks) == summary["masked_layers"] < len(load_masks(magnitude30 / "masks.pt"))
    model = net.model.eval()
    with torch.no_grad():
        for k, keep in masks.items():
            model.get_submodule(k).weight.mul_(keep)
    dataset = builders.make_dataset(net.config)
    alpha_bar = torch.as_tensor(np.asarray(net.diffusion.alphas_bar), dtype=torch.float64)
    direct, steps = [], []
    for b, idx in enumerate([range(0, 4), range(4, 8)]):  # 10 images in batches of 4, at most 2 batches
        x0 = torch.stack([dataset[i][0] for i in idx])
        g = torch.Generator().manual_seed(mix_seed(3, b, 0xBA5E))
        t = torch.randint(net.diffusion.timesteps, (len(idx),), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = alpha_bar[t].float()[:, None, None, None]
        with torch.no_grad():
            pred = model(a.sqrt() * x0 + (1 - a).sqrt() * eps, t)
        direct.append(((pred - eps) ** 2).flatten(1).mean(1).double())
        steps.append(t)
    direct = torch.cat(direct).numpy()
    assert np.array_equal(arrays["timesteps"], torch.cat(steps).numpy())
    np.testing.assert_allclose(arrays["sample_losses"], direct, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(arrays["batch_losses"], [direct[:4].mean(), direct[4:].mean()], rtol=1e-5)
    assert summary["num_batches"] == 2 and summary["mean"] == pytest.approx(direct.mean(), rel=1e-5)


@pytest.mark.parametrize("extra, fragment", [
    (["--targets", "up_blocks"], "none of the"),
    (["--max_batches", "0"], "must all be ≥ 1"),
])
def test_baseline_loss_bad_input_is_one_line(trained, magnitude30, tmp_path, capsys, extra, fragment):
    down = {k: v for k, v in load_masks(magnitude30 / "masks.pt").items() if k.startswith("downsamples.")}
    save_masks(tmp_path / "down.pt", down)
    code = run_cli(prune_main, ["baseline_loss", "--original_model", str(trained), "--initial_mask_path",
                                str(tmp_path / "down.pt"), "--device", "cpu", "--output_dir", str(tmp_path / "o"),
                                *extra])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err


# ---------------------------------------------------------------------------------- seed 003 sampling


def _pngs(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def test_generate_takes_seed_003_ddpm_sample_flags(trained, tmp_path):
    common = ["--device", "cpu", "--no-progress", "--grid", "0"]
    # seed 003: ddpm_sample.py --output_dir --batch_size --model_path --total_samples --ddim_steps --skip_type --seed
    assert run_cli(generate_main, ["--output_dir", str(tmp_path / "seed"), "--batch_size", "2", "--model_path",
                                   str(trained), "--total_samples", "3", "--ddim_steps", "4", "--skip_type", "quad",
                                   "--seed", "42", *common]) == 0
    assert run_cli(generate_main, ["--save-dir", str(tmp_path / "ours"), "--batch-size", "2", "--chkpt-path",
                                   str(trained), "--num-samples", "3", "--use-ddim", "--ddim-steps", "4",
                                   "--skip-type", "quadratic", "--seed", "42", *common]) == 0
    # the spellings of seed 003's own parameter list: --num_samples, --num_inference_steps
    assert run_cli(generate_main, ["--output_dir", str(tmp_path / "doc"), "--batch_size", "2", "--model_path",
                                   str(trained), "--num_samples", "3", "--num_inference_steps", "4", "--skip_type",
                                   "quad", "--seed", "42", *common]) == 0
    seed, ours = _pngs(tmp_path / "seed"), _pngs(tmp_path / "ours")
    assert len(seed) == 3 and seed == ours == _pngs(tmp_path / "doc")
    sampler = json.loads((tmp_path / "seed" / "generate.json").read_text())["sampler"]
    assert sampler["name"] == "ddim" and sampler["steps"] == 4 and sampler["skip_type"] == "quadratic"


def test_generate_pruned_model_ckpt_replaces_model_path(trained, magnitude30, tmp_path, capsys):
    common = ["--device", "cpu", "--no-progress", "--grid", "0", "--total_samples", "1", "--ddim_steps", "2"]
    assert run_cli(generate_main, ["--model_path", str(trained), "--pruned_model_ckpt",
                                   str(magnitude30 / "pruned.pt"), "--output_dir", str(tmp_path / "p"), *common]) == 0
    manifest = json.loads((tmp_path / "p" / "generate.json").read_text())
    assert manifest["checkpoint"].endswith("pruned.pt") and manifest["sampler"]["skip_type"] == "uniform"
    capsys.readouterr()
    code = run_cli(generate_main, ["--model_path", str(trained), "--output_dir", str(tmp_path / "q"),
                                   "--skip_type", "logarithmic", *common])
    err = capsys.readouterr().err
    assert code == 2 and "--skip_type 'logarithmic' is not supported; choose uniform or quad" in err
    assert len(err.strip().splitlines()) == 1
