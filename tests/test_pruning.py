"""Pruning masks: N:M groups against brute-force loops, magnitude/random masks, compliance, the compact export
round trip, layer selection and protection, mask extraction, the 2:4 sparse-inference guard, and prune.py
end to end in a subprocess (outputs, stats, bad input)."""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from ddpm_curriculum.errors import UserError
from ddpm_curriculum.pruning.magnitude import magnitude_masks, random_masks
from ddpm_curriculum.pruning.masks import (apply_masks, load_masks, masks_from_nonzero, save_masks, select_layers,
                                           sparsity_summary)
from ddpm_curriculum.pruning.nm import (export_compact, import_compact, nm_compliance, nm_eligible, nm_groups,
                                        nm_mask, nm_ungroup)
from ddpm_curriculum.pruning.semistructured import (Conv1x1AsLinear, semi_structured_eligible,
                                                    to_semi_structured)
from ddpm_curriculum.training.checkpoint import load_checkpoint, load_network
from .helpers import ROOT, randomize, run, tiny, tiny_cfg


def brute_groups(w: torch.Tensor, m: int, order: str) -> list[list[float]]:
    """Groups by explicit index loops: asp = C_in runs at each (o, kh, kw); im2col = runs of (c, kh, kw)."""
    out = []
    if w.ndim == 2:
        return [[w[o, i + j].item() for j in range(m)] for o in range(w.shape[0]) for i in range(0, w.shape[1], m)]
    c_out, c_in, kh, kw = w.shape
    for o in range(c_out):
        if order == "asp":
            for a in range(kh):
                for b in range(kw):
                    for c in range(0, c_in, m):
                        out.append([w[o, c + j, a, b].item() for j in range(m)])
        else:
            flat = [w[o, c, a, b].item() for c in range(c_in) for a in range(kh) for b in range(kw)]
            out += [flat[i:i + m] for i in range(0, len(flat), m)]
    return out


@pytest.mark.parametrize("shape, order", [((3, 8, 3, 3), "asp"), ((3, 8, 3, 3), "im2col"), ((2, 4, 1, 1), "asp"),
                                          ((5, 12), "asp"), ((2, 3, 2, 2), "im2col")])
def test_groups_follow_the_documented_layout(shape, order):
    w = torch.randn(shape)
    groups = nm_groups(w, 4, order)
    assert groups.tolist() == brute_groups(w, 4, order)
    assert torch.equal(nm_ungroup(groups, shape, order), w)


def test_ineligible_shapes():
    assert not nm_eligible((8, 3, 3, 3), 4, "asp")  # the 3-channel input conv
    assert nm_eligible((8, 4, 3, 3), 4, "im2col") and not nm_eligible((8, 2, 3, 3), 4, "asp")
    assert nm_eligible((2, 3, 2, 2), 4, "im2col")  # 3·2·2 = 12
    with pytest.raises(UserError, match="not a multiple of 4"):
        nm_groups(torch.randn(8, 3, 3, 3), 4)


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8)])
def test_nm_magnitude_mask_keeps_the_n_largest_of_each_group(n, m):
    w = torch.randn(6, 16, 3, 3)
    mask = nm_mask(w, n, m)
    assert nm_compliance(mask, n, m) == 1.0 and mask.sum() == w.numel() * n // m
    for g_w, g_k in zip(brute_groups(w, m, "asp"), brute_groups(mask.float(), m, "asp"), strict=True):
        ranked = sorted(range(m), key=lambda j: -abs(g_w[j]))
        assert sorted(j for j in range(m) if g_k[j]) == sorted(ranked[:n])
    assert nm_compliance(torch.ones(6, 16, 3, 3, dtype=torch.bool), n, m) == 0.0
    assert nm_compliance(torch.ones(6, 3, 3, 3, dtype=torch.bool), n, m) is None


def _layers():
    torch.manual_seed(0)
    return {"a": nn.Linear(10, 4), "b": nn.Conv2d(4, 6, 3)}


def test_magnitude_masks_per_layer_and_global_match_sorting():
    layers = _layers()
    per = magnitude_masks(layers, 0.3, "layer")
    for name, mod in layers.items():
        w = mod.weight.detach().abs().flatten()
        k = round(0.3 * w.numel())
        assert int((~per[name]).sum()) == k
        assert w[~per[name].flatten()].max() <= w[per[name].flatten()].min()
    glob = magnitude_masks(layers, 0.6, "global")
    all_w = torch.cat([m.weight.detach().abs().flatten() for m in layers.values()])
    threshold = all_w.sort().values[round(0.6 * all_w.numel())]
    for name, mod in layers.items():  # global: one threshold for every layer
        assert torch.equal(glob[name], mod.weight.detach().abs() >= threshold)
    assert sum(int((~v).sum()) for v in glob.values()) == round(0.6 * all_w.numel())
    rand = random_masks(layers, 0.5, seed=3)
    assert all(int((~v).sum()) == round(0.5 * v.numel()) for v in rand.values())
    assert all(torch.equal(rand[k], random_masks(layers, 0.5, seed=3)[k]) for k in rand)
    with pytest.raises(UserError, match="must be in"):
        magnitude_masks(layers, 1.0)


@pytest.mark.slow
def test_selection_protects_the_seed_layers_and_masks_round_trip(tmp_path):
    model = tiny(hid_channels=32, num_res_blocks=1)
    chosen, skipped = select_layers(model)
    assert {"in_conv", "out_conv.2", "embed.0", "embed.2"} <= set(skipped)
    assert set(skipped.values()) == {"protected"}
    assert "downsamples.level_0.0.conv1" in chosen and "middle.1.project_in" in chosen
    only, _ = select_layers(model, include=[r"^middle\."], protect=[r"fc$"])
    assert only and all(k.startswith("middle.") and not k.endswith("fc") for k in only)
    with pytest.raises(UserError, match="no prunable layer matches"):
        select_layers(model, include=["nothing"])
    masks = magnitude_masks(chosen, 0.5)
    apply_masks(model, masks)
    assert masks_from_nonzero(chosen).keys() == masks.keys()
    assert all(torch.equal(masks_from_nonzero(chosen)[k], masks[k]) for k in masks)
    save_masks(tmp_path / "m.pt", masks)
    back = load_masks(tmp_path / "m.pt")
    assert back.keys() == masks.keys() and all(torch.equal(back[k], masks[k]) for k in masks)
    torch.save({"x": torch.zeros(2)}, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="not a mask file"):
        load_masks(tmp_path / "bad.pt")
    with pytest.raises(UserError, match="does not have"):
        apply_masks(model, {"nope": torch.ones(2, dtype=torch.bool)})


def test_sparsity_summary_counts():
    layer = nn.Linear(8, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(1.0, 17.0).reshape(2, 8))
        layer.bias.zero_()
    masks = {"0": nm_mask(layer.weight, 2, 4)}
    net = nn.Sequential(layer)
    s = sparsity_summary(net, masks, 2, 4)
    assert s["layers"]["0"] == {"shape": [2, 8], "params": 16, "kept": 8, "sparsity": 0.5, "nm_compliance": 1.0}
    assert s["totals"]["params"] == 18 and s["totals"]["nonzeros"] == 8  # zero bias, masked weight


@pytest.mark.slow
@pytest.mark.parametrize("n, m, order", [(2, 4, "asp"), (4, 8, "im2col"), (1, 4, "asp")])
def test_compact_export_round_trip(n, m, order):
    model = randomize(tiny(hid_channels=32, num_res_blocks=1), seed=5)
    layers, _ = select_layers(model)
    masks = {k: nm_mask(v.weight, n, m, order) for k, v in layers.items() if nm_eligible(v.weight.shape, m, order)}
    apply_masks(model, masks)
    # a group with fewer than n kept entries (a kept weight that is exactly 0) still exports
    name = next(iter(masks))
    first = nm_groups(masks[name], m, order)[0].nonzero()[0, 0]
    masks[name] = nm_ungroup(nm_groups(masks[name], m, order).clone().index_put_(
        (torch.tensor([0]), first.view(1)), torch.tensor([False])), masks[name].shape, order)
    apply_masks(model, masks)
    state = model.state_dict()
    obj, dense = export_compact(state, masks, n, m, order, {"model": {}})
    assert dense == [] and set(obj["nm"]) == set(masks)
    entry = obj["nm"][name]
    assert entry["values"].shape == (state[f"{name}.weight"].numel() // m, n)
    back, back_masks = import_compact(obj)
    assert back.keys() == state.keys() and all(torch.equal(back[k], v) for k, v in state.items())
    for k in masks:
        assert nm_compliance(back_masks[k], n, m, order) == 1.0
        assert torch.equal(back_masks[k] & masks[k], masks[k])  # ⊇ the mask; extra slots hold zeros


def test_semi_structured_guard_and_conv_as_linear():
    conv = nn.Conv2d(64, 128, 1)
    with torch.no_grad():
        conv.weight.mul_(nm_mask(conv.weight, 2, 4))
    assert semi_structured_eligible(conv)
    assert not semi_structured_eligible(nn.Linear(64, 64))  # dense, not 2:4
    assert not semi_structured_eligible(nn.Conv2d(64, 128, 3))
    as_linear = Conv1x1AsLinear(conv.weight.detach().flatten(1), conv.bias)
    x = torch.randn(2, 64, 5, 3)
    with torch.no_grad():
        torch.testing.assert_close(as_linear(x), conv(x), rtol=1e-5, atol=1e-5)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="needs a CUDA GPU"):
            to_semi_structured(nn.Sequential(conv))


# ------------------------------------------------------------------------------------------ prune.py


def prune_script(*args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "prune.py"), *args, "--device", "cpu"], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("trained")
    run(tiny_cfg("eval.num_samples=0", "train.num_samples=0"), d)
    return d


@pytest.mark.slow
def test_prune_script_nm_then_extract(trained, tmp_path):
    res = prune_script("--method", "nm", "--model_path", str(trained), "--save-path", str(tmp_path / "nm"),
                       "--eval-samples", "8", "--preview-samples", "4", "--sample-steps", "2")
    assert res.returncode == 0, res.stderr
    out = tmp_path / "nm"
    stats = json.loads((out / "pruning_stats.json").read_text())
    assert stats["method"] == "nm" and stats["totals"]["nm_compliance"] == 1.0
    assert stats["totals"]["layer_sparsity"] == 0.5
    assert {"in_conv", "out_conv.2", "embed.0"} <= set(stats["skipped"])
    assert stats["export"]["compact_over_dense"] < 0.75 and (out / "nm_compact.pt").is_file()
    assert set(stats["oracle_metrics"]) == {"before", "after"} and (out / "eval_original.json").is_file()
    assert (out / "preview.png").is_file() and "2:4 compliance 100.0%" in res.stdout
    pruned = load_network(out / "pruned.pt")
    masks = load_masks(out / "masks.pt")
    assert pruned.masks.keys() == masks.keys() == stats["layers"].keys()
    for name, keep in masks.items():
        assert torch.all(pruned.model.get_submodule(name).weight[~keep] == 0)
    compact = load_network(out / "nm_compact.pt")  # the compact file loads back to the same dense network
    assert compact.format == "nm-compact"
    assert all(torch.equal(compact.model.state_dict()[k], v) for k, v in pruned.model.state_dict().items())
    res = prune_script("--method", "extract", "--model_path", str(out / "pruned.pt"), "--save_path",
                       str(tmp_path / "ex"), "--eval-samples", "0", "--preview-samples", "0")
    assert res.returncode == 0, res.stderr
    extracted = load_masks(tmp_path / "ex" / "masks.pt")
    assert extracted.keys() == masks.keys() and all(torch.equal(extracted[k], masks[k]) for k in masks)
    assert load_checkpoint(tmp_path / "ex" / "pruned.pt")["pruning"]["method"] == "extract"


@pytest.mark.slow
def test_prune_script_magnitude_on_a_ddpm_torch_file(trained, tmp_path):
    state = load_checkpoint(trained)
    torch.save({"model": {f"module.{k}": v for k, v in state["model"].items()},
                "ema": {"decay": 0.9, "shadow": state["ema"], "num_updates": 14}}, tmp_path / "ddpm_torch.pt")
    res = prune_script("--pruner", "magnitude", "--scope", "global", "--model_path", str(tmp_path / "ddpm_torch.pt"),
                       "--save_path", str(tmp_path / "mag"), "--pruning_ratio", "0.3", "--preview-samples", "0",
                       "--protect", r"\.fc$")
    assert res.returncode == 0, res.stderr
    stats = json.loads((tmp_path / "mag" / "pruning_stats.json").read_text())
    assert stats["source_format"] == "ddpm-torch" and stats["scope"] == "global"
    assert stats["totals"]["layer_sparsity"] == pytest.approx(0.3, abs=1e-4)
    assert stats["export"]["file"] is None and stats["oracle_metrics"] is None  # unstructured; cifar10 config
    assert stats["skipped"]["middle.0.fc"] == "protected"


@pytest.mark.slow
def test_prune_script_bad_input_is_one_line_exit_2():
    res = prune_script("--model_path", "nowhere", "--save_path", "x")
    assert res.returncode == 2 and "checkpoint not found" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("args, fragment", [
    (["--method", "nm", "--pruner", "random"], "conflicts with"),
    (["--method", "nm", "--n", "4", "--m", "4"], "N:M = 4:4"),
    (["--pruning_ratio", "1.5"], "must be in [0, 1)"),
    (["--method", "nm", "--layers", "("], "regex '(' is invalid"),
])
def test_prune_cli_rejects_bad_options(trained, tmp_path, capsys, args, fragment):
    from ddpm_curriculum.errors import run_cli
    from ddpm_curriculum.pruning.cli import main

    code = run_cli(main, [*args, "--model_path", str(trained), "--save_path", str(tmp_path), "--device", "cpu",
                          "--eval-samples", "0", "--preview-samples", "0"])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
