"""scripts/bench.py on tiny settings: every part runs, the table and JSON hold every candidate, the networks and
samplers it races against compute what ours compute (so the ratios compare like with like), and peak memory
is measured in child processes."""

import json
import subprocess
import sys

import pytest
import torch

from ddpm_curriculum.bench import cli
from ddpm_curriculum.bench.cli import PARTS, bf16_available
from ddpm_curriculum.models.convert import diffusers_unet_config, to_diffusers_state, unet_kwargs_from_diffusers
from ddpm_curriculum.training import builders

from .helpers import ROOT, TINY, tiny_cfg

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("pytorch_fid")


@pytest.mark.slow
@pytest.mark.parametrize("config", ["quickstart.json", "cifar10_c.json"])
def test_diffusers_config_has_our_layout(config):
    from ddpm_curriculum.config import load_config

    cfg = load_config(ROOT / "configs" / config, ["model.hid_channels=32"])
    m = cfg.to_dict()["model"]
    conf = diffusers_unet_config(m, builders.image_shape(cfg)[1])
    assert unet_kwargs_from_diffusers(conf) == {k: m[k] for k in unet_kwargs_from_diffusers(conf)}
    torch.manual_seed(0)
    ours = builders.make_model(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():  # the output convolution starts at zero: make every weight matter
            p.add_(0.05 * torch.randn_like(p))
    theirs = diffusers.UNet2DModel(**conf).eval()
    theirs.load_state_dict(to_diffusers_state(ours.state_dict(), len(m["ch_multipliers"]), m["num_res_blocks"]))
    size = builders.image_shape(cfg)[1]
    x, t = torch.randn(2, 3, size, size), torch.tensor([3, 900])
    with torch.no_grad():
        ref = theirs(x, t).sample
        assert ref.abs().max() > 0.5
        torch.testing.assert_close(ours(x, t), ref, rtol=0, atol=1e-4)


def bench(tmp_path, *args, script="bench.py"):
    path = tmp_path / "tiny.json"
    cfg = json.loads(json.dumps(TINY))
    cfg["train"]["steps"] = 20
    path.write_text(json.dumps(cfg))
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--rounds", "1", "--steps", "1",
                          "--train-config", str(path), "--twoscale-config", str(path), "--twoscale-batch", "4",
                          "--batch", "2", "--modes-config", str(path), "--modes-batch", "4", "--ddim-config",
                          str(path), "--ddim-batch", "2", "--ddim-steps", "3", "--inception-images", "4",
                          "--inception-batch", "2", "--fid-dims", "16", "--json", str(out), "--device", "cpu", *args],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    return res.stdout, json.loads(out.read_text())


@pytest.mark.slow
def test_every_part_runs_and_races_like_against_like(tmp_path):
    table, r = bench(tmp_path, "--no-memory")
    assert set(PARTS) <= set(r)
    bf16 = {"ours_bf16", "diffusers_bf16"} if bf16_available("cpu") else set()
    for part in ("train", "train_twoscale"):
        assert set(r[part]["img_per_sec"]) == {"ours", "ours_nchw", "diffusers", "diffusers_channels_last"} | bf16
        assert r[part]["max_abs_output_diff_vs_diffusers"] < 1e-4
        assert r[part]["speedup_vs_diffusers"] == pytest.approx(
            r[part]["img_per_sec"]["ours"] / r[part]["img_per_sec"]["diffusers"])
        assert 0 < r[part]["fraction_of_matmul_peak"] and r[part]["gflop_per_step"] > 0
    # a forward + backward costs ≈ 3 forwards; compare the counted FLOPs with a forward counted here
    from torch.utils.flop_counter import FlopCounterMode
    cfg = tiny_cfg("train.steps=20")
    x = torch.randn(2, *builders.image_shape(cfg))
    with FlopCounterMode(display=False) as counter:
        builders.make_model(cfg)(x, torch.tensor([1, 2]))
    assert r["train"]["gflop_per_step"] * 1e9 == pytest.approx(3 * counter.get_total_flops(), rel=0.05)
    assert set(r["modes"]["ratio_vs_baseline"]) == {"baseline", "C", "CS", "CR", "MaskPro"}
    assert r["modes"]["ratio_vs_C"]["C"] == 1.0
    assert r["ddim"]["max_abs_diff_vs_diffusers"] < 1e-4 and r["ddim"]["ours_overhead"] > -1
    assert r["inception"]["max_abs_feature_diff"] < 1e-4 and r["fid"]["rel_diff"] < 1e-6
    for name in ("ours_nchw", "diffusers_channels_last", "MaskPro", "pytorch_fid", "conv_channels_last"):
        assert name in table


@pytest.mark.slow
def test_peak_memory_in_child_processes_and_bad_part(tmp_path):
    _, r = bench(tmp_path, "--parts", "peaks,fid", script="bench_eval.py")  # the per-area names take every option
    for part, names in (("peaks", {"matmul", "conv_channels_last"}), ("fid", {"ours", "pytorch_fid"})):
        assert set(r[part]["memory"]) == names
        for m in r[part]["memory"].values():
            assert m["peak_rss_mb"] >= m["rss_before_build_mb"] > 50  # torch is imported
    res = subprocess.run([sys.executable, str(ROOT / "scripts/bench.py"), "--parts", "train,warp"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 2 and "unknown part(s) warp" in res.stderr
    res = subprocess.run([sys.executable, str(ROOT / "scripts/bench.py"), "--parts", "ddim", "--ddim-config",
                          str(tmp_path / "tiny.json"), "--ddim-set", "diffusion.beta_schedule=cosine", "--no-memory"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 2 and "linear-β ε-prediction" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_bf16_and_compile_candidates_and_their_summary(tmp_path, monkeypatch):
    from ddpm_curriculum.training import trainer

    args = cli.parse_args(["--train-config", str(tmp_path / "tiny.json"), "--batch", "2", "--compile"])
    (tmp_path / "tiny.json").write_text(json.dumps({**TINY, "train": {**TINY["train"], "steps": 20}}))
    monkeypatch.setattr(trainer, "cpu_bf16_supported", lambda: False)
    assert "ours_bf16" not in cli.train_cases(args, "train", {})  # as training: no bf16 rows without native bf16
    monkeypatch.setattr(trainer, "cpu_bf16_supported", lambda: True)
    out: dict = {}
    cases = cli.train_cases(args, "train", out)
    assert {"ours_bf16", "diffusers_bf16", "ours_compiled", "ours_bf16_compiled"} <= set(cases)
    assert "ours_compiled" not in cli.train_cases(args, "train_twoscale", {})  # compile: the CIFAR part only
    secs = {"ours": 1.0, "ours_nchw": 1.1, "diffusers": 1.2, "diffusers_channels_last": 1.2, "ours_bf16": 0.5,
            "diffusers_bf16": 0.8, "ours_compiled": 0.8, "ours_bf16_compiled": 0.4}
    first = {k: 2 * v for k, v in secs.items()} | {"ours_compiled": 62.0, "ours_bf16_compiled": 41.0}
    r = cli.train_summary(args, "train", secs, out["cfg"], None, first)
    assert r["compile_sec"] == {"ours_compiled": 60.0, "ours_bf16_compiled": 40.0}
    assert r["compiled_vs_eager"] == pytest.approx({"ours_compiled": 1.25, "ours_bf16_compiled": 1.25})
    assert r["bf16_vs_fp32"] == pytest.approx({"ours": 2.0, "diffusers": 1.5})
    assert 1e-4 < r["bf16_output_rel_diff"] < 0.05  # bf16 rounding: ~2^-8 per op, not exact, not broken
    table = cli.table({"train": r})
    assert "2.00x ours fp32" in table and "compile 60 s" in table and ">= 2.5x" in table


@pytest.mark.slow
def test_bf16_train_step_runs_under_cpu_autocast():
    from ddpm_curriculum.bench import train

    if not bf16_available("cpu"):
        pytest.skip("this CPU has no native bf16")
    cfg = tiny_cfg()
    step = train.make_train_step(cfg, "ours", 2, "cpu", True, bf16=True)
    seen = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: seen.append(o.dtype) if isinstance(m, torch.nn.Conv2d) else None)
    try:
        step()
    finally:
        hook.remove()
    assert seen and set(seen) == {torch.bfloat16}
