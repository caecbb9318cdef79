"""The sampler registry (sampling/samplers.py SAMPLERS): names and errors, SamplerSpec's old use_ddim spelling,
generate.json manifests of older mains, the train.sample_steps rule, training grids = generate.py images, and
how to add a sampler (a toy one-step x̂0 sampler registered in a test)."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_curriculum.errors import UserError, run_cli
from ddpm_curriculum.sampling import (SAMPLERS, PerImageNoise, Sampler, SamplerSpec, generate_to_folder, get_sampler,
                                      load_folder, normalize_sampler_dict, sample_batch, sample_name,
                                      spec_from_sample_steps, to_uint8)
from ddpm_curriculum.sampling.cli import main as generate_main
from ddpm_curriculum.training import builders
from ddpm_curriculum.training.checkpoint import load_network

from .helpers import run, tiny_cfg


def test_registry_names_and_unknown_sampler_error():
    assert {"ancestral", "ddim"} <= set(SAMPLERS)
    for name, sampler in SAMPLERS.items():
        assert isinstance(sampler, Sampler) and set(sampler.fields) <= {"steps", "eta", "skip_type", "t_max",
                                                                        "clip_denoised"}, name
        spec = SamplerSpec(name=name)
        spec.validate(100)
        assert spec.describe(100) and spec.tag(100) and spec.num_noise_draws(100) >= 0
    for bad in ("dpm", "DDIM", ""):
        with pytest.raises(UserError, match=re.escape(f"unknown sampler {bad!r}; choose one of {sorted(SAMPLERS)}")):
            SamplerSpec(name=bad)
    with pytest.raises(UserError, match="unknown sampler"):
        get_sampler("nope")


def test_use_ddim_keyword_maps_to_the_name():
    assert SamplerSpec(use_ddim=True, steps=7) == SamplerSpec(name="ddim", steps=7)
    assert hash(SamplerSpec(use_ddim=True, steps=7)) == hash(SamplerSpec(name="ddim", steps=7))
    assert SamplerSpec(use_ddim=False) == SamplerSpec(name="ancestral") == SamplerSpec()
    assert SamplerSpec(use_ddim=True).use_ddim and not SamplerSpec().use_ddim
    assert SamplerSpec(True, 5) == SamplerSpec(name="ddim", steps=5)  # the old positional order
    with pytest.raises(ValueError, match="contradict"):
        SamplerSpec(name="ancestral", use_ddim=True)
    # the behaviour of the old use_ddim specs is unchanged
    d = SamplerSpec(use_ddim=True, steps=10, eta=0.5, t_max=60)
    assert d.num_noise_draws(100) == 10 and d.describe(100) == "DDIM 10 steps (uniform, eta 0.5, from t=60)"
    assert SamplerSpec(t_max=60).num_noise_draws(100) == 60 and SamplerSpec().num_noise_draws(100) == 99
    assert SamplerSpec().describe(100) == "ancestral DDPM 100 steps"
    assert d.tag(100) == "ddim10-uniform-eta0.5-tmax60" and SamplerSpec().tag(100) == "ddpm100"


def test_old_manifest_entries_normalise_to_the_new_form():
    old_ddim = {"use_ddim": True, "steps": 3, "eta": 0.0, "skip_type": "uniform", "t_max": None, "clip_denoised": True}
    old_ancestral = {"use_ddim": False, "t_max": None, "clip_denoised": True}  # steps/eta/skip_type were dropped
    assert normalize_sampler_dict(old_ddim) == SamplerSpec(name="ddim", steps=3).to_dict() == {
        "name": "ddim", "steps": 3, "eta": 0.0, "skip_type": "uniform", "t_max": None, "clip_denoised": True}
    assert normalize_sampler_dict(old_ancestral) == SamplerSpec().to_dict() == {
        "name": "ancestral", "t_max": None, "clip_denoised": True}
    assert SamplerSpec.from_dict(old_ddim) == SamplerSpec(name="ddim", steps=3)
    assert normalize_sampler_dict({**old_ddim, "steps": 4}) != SamplerSpec(name="ddim", steps=3).to_dict()
    for spec in (SamplerSpec(name="ddim", steps=4, eta=1.0, skip_type="quadratic", t_max=9), SamplerSpec(t_max=5)):
        assert SamplerSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec  # through JSON
    # anything unreadable is left as it is (and then differs from every spec)
    for odd in (None, [], {"use_ddim": True, "bogus": 1}, {"name": "dpm_solver", "steps": 3}):
        assert normalize_sampler_dict(odd) == odd


def test_sample_steps_rule():
    assert spec_from_sample_steps(25) == SamplerSpec(name="ddim", steps=25, eta=0.0, skip_type="uniform")
    assert spec_from_sample_steps(0) == SamplerSpec(name="ancestral")
    for bad in (-1, 2.5, True, None):
        with pytest.raises(UserError, match="sample_steps"):
            spec_from_sample_steps(bad)
    from ddpm_curriculum.training.reporting import _sampler_name

    assert _sampler_name(tiny_cfg("train.sample_steps=3")) == "DDIM 3 steps (uniform, eta 0)"
    assert _sampler_name(tiny_cfg("train.sample_steps=0")) == "ancestral DDPM 100 steps"


def test_an_old_format_partial_folder_continues(tiny_run, tmp_path):
    net = load_network(tiny_run)
    for spec in (SamplerSpec(name="ddim", steps=3), SamplerSpec(name="ancestral", t_max=4)):
        folder = tmp_path / spec.name
        gen = lambda n, s=spec, d=folder: generate_to_folder(net, s, d, n, 2, seed=1, device="cpu",  # noqa: E731
                                                              grid=0, progress=False)
        gen(2)
        path = folder / "generate.json"
        manifest = json.loads(path.read_text())
        old = {"use_ddim": spec.use_ddim, **{k: v for k, v in manifest["sampler"].items() if k != "name"}}
        path.write_text(json.dumps({**manifest, "sampler": old}))  # as an older main wrote it
        before = {p.name: p.read_bytes() for p in folder.glob("*.png")}
        assert gen(4).generated == 2  # continued: the two PNGs are kept
        assert {k: (folder / k).read_bytes() for k in before} == before
        assert json.loads(path.read_text())["sampler"] == spec.to_dict()  # rewritten in the current form
        with pytest.raises(UserError, match="sampler differ"):  # another sampler is still refused
            generate_to_folder(net, SamplerSpec(name="ddim", steps=5), folder, 4, 2, seed=1, device="cpu", grid=0,
                               progress=False)


def test_generate_sampler_flag(tiny_run, tmp_path, capsys):
    common = ["--chkpt-path", str(tiny_run), "--device", "cpu", "--no-progress", "--grid", "0", "--num-samples",
              "2", "--ddim-steps", "3"]
    assert run_cli(generate_main, [*common, "--sampler", "ddim", "--save-dir", str(tmp_path / "a")]) == 0
    assert run_cli(generate_main, [*common, "--use-ddim", "--save-dir", str(tmp_path / "b")]) == 0
    pngs = lambda d: {p.name: p.read_bytes() for p in d.glob("*.png")}  # noqa: E731
    assert pngs(tmp_path / "a") == pngs(tmp_path / "b") and len(pngs(tmp_path / "a")) == 2
    capsys.readouterr()
    assert run_cli(generate_main, [*common, "--sampler", "dpm", "--save-dir", str(tmp_path / "c")]) == 2
    assert "unknown sampler 'dpm'; choose one of ['ancestral', 'ddim']" in capsys.readouterr().err
    assert run_cli(generate_main, [*common, "--sampler", "ancestral", "--use-ddim", "--save-dir",
                                   str(tmp_path / "d")]) == 2
    assert "contradicts --use-ddim" in capsys.readouterr().err


def _tiles(path, n, shape, nrow):
    """The n images [N, H, W, C] of a torchvision grid PNG (padding 2)."""
    c, h, w = shape
    with Image.open(path) as im:
        grid = np.asarray(im.convert("RGB"))
    tiles = [grid[2 + (i // nrow) * (h + 2):][:h, 2 + (i % nrow) * (w + 2):][:, :w] for i in range(n)]
    return np.stack([t[..., :c] for t in tiles])


@pytest.mark.parametrize("sample_steps", [3, 0])
def test_a_training_grid_image_is_generate_pys_image(tmp_path, sample_steps):
    cfg = tiny_cfg("train.steps=6", "eval.num_samples=0", "train.image_intv=0", "train.num_samples=4",
                   f"train.sample_steps={sample_steps}", "train.seed=5", "diffusion.timesteps=10")  # short ancestral
    trainer = run(cfg, tmp_path / "run")
    grid = tmp_path / "run" / "samples" / "step00000006_final.png"
    shape = trainer.image_shape
    tiles = _tiles(grid, 4, shape, nrow=2)
    spec = spec_from_sample_steps(sample_steps)
    assert trainer.grid_spec == spec
    net = load_network(tmp_path / "run")  # the EMA weights the grid was sampled with
    generate_to_folder(net, spec, tmp_path / "gen", 4, 4, seed=5, device="cpu", grid=0, progress=False)
    assert np.array_equal(tiles, load_folder(tmp_path / "gen", 4, shape))  # grid image i = generate.py's image i
    assert not np.array_equal(tiles[0], tiles[1])
    # and again at a later call: the same noise (fixed-noise grids), so the same images for the same weights
    trainer.sample_grid("again")
    assert np.array_equal(_tiles(tmp_path / "run" / "samples" / "step00000006_again.png", 4, shape, 2), tiles)


def test_a_conditional_training_grid_image_is_sample_batchs_image_of_its_class(tmp_path):
    cfg = tiny_cfg("model.num_classes=4", "train.cond_drop_prob=0.3", "curriculum.enabled=false", "train.steps=2",
                   "train.num_samples=8", "eval.num_samples=0", "train.seed=3")
    trainer = run(cfg, tmp_path)
    labels = trainer.grid_labels.tolist()
    assert labels == [0, 0, 1, 1, 2, 2, 3, 3]
    tiles = _tiles(tmp_path / "samples" / "step00000002_final.png", 8, trainer.image_shape, nrow=2)
    net = load_network(tmp_path)
    want = to_uint8(sample_batch(net.diffusion, net.model, spec_from_sample_steps(3), range(8), 3,
                                 trainer.image_shape, "cpu", labels=labels)).numpy()
    assert np.array_equal(tiles, want)


class OneStepX0(Sampler):
    """The documented example of a new sampler: the network's one-step x̂0 prediction from x_T."""

    fields = ("t_max", "clip_denoised")

    def num_noise_draws(self, spec, timesteps):
        return 0

    def describe(self, spec, timesteps):
        return "one-step x0 prediction"

    def tag(self, spec, timesteps):
        return "x0"

    def run(self, diffusion, model, x_T, spec, noise_fn):
        t = torch.full((len(x_T),), diffusion.timesteps - 1 if spec.t_max is None else spec.t_max,
                       dtype=torch.long, device=x_T.device)
        x0 = diffusion.predict_x0(x_T, t, model(x_T, t))
        return x0.clamp(-1, 1) if spec.clip_denoised else x0


def test_adding_a_sampler_is_one_registry_entry(monkeypatch, tiny_run, tmp_path):
    monkeypatch.setitem(SAMPLERS, "ddim_x0", OneStepX0())
    net = load_network(tiny_run)
    spec = SamplerSpec(name="ddim_x0")
    shape, T = builders.image_shape(net.config), net.diffusion.timesteps
    out = sample_batch(net.diffusion, net.model, spec, [0, 5], seed=2, image_shape=shape, device="cpu")
    x_T = PerImageNoise(2, [0, 5], shape, "cpu").initial()
    t = torch.full((2,), T - 1, dtype=torch.long)
    with torch.no_grad():
        want = net.diffusion.predict_x0(x_T, t, net.model(x_T, t)).clamp(-1, 1)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    res = generate_to_folder(net, spec, tmp_path / "x0", 2, 2, seed=2, device="cpu", grid=0, progress=False)
    assert res.generated == 2
    manifest = json.loads((tmp_path / "x0" / "generate.json").read_text())
    assert manifest["sampler"] == {"name": "ddim_x0", "t_max": None, "clip_denoised": True}
    assert normalize_sampler_dict(manifest["sampler"]) == manifest["sampler"]
    assert (tmp_path / "x0" / sample_name(1)).is_file()
    assert run_cli(generate_main, ["--chkpt-path", str(tiny_run), "--device", "cpu", "--no-progress", "--grid", "0",
                                   "--num-samples", "2", "--seed", "2", "--sampler", "ddim_x0", "--save-dir",
                                   str(tmp_path / "cli")]) == 0
    assert {p.name: p.read_bytes() for p in (tmp_path / "cli").glob("*.png")} == \
        {p.name: p.read_bytes() for p in (tmp_path / "x0").glob("*.png")}
