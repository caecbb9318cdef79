"""The `sampler` config block (issue 13 §3): one rule, ``sampling.sampler_spec(cfg)``, for the training grids,
eval.json and prune.py's preview, and ``experiments.grid.eval_spec`` for the experiment grid's ``eval.sampler``.
No block = the ``train.sample_steps`` rule exactly as before."""

import json
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest

from ddpm_curriculum.config import SamplerConfig, config_from_dict, load_config
from ddpm_curriculum.errors import UserError, run_cli
from ddpm_curriculum.sampling import SamplerSpec, sample_batch, sampler_spec, spec_from_sample_steps, to_uint8
from ddpm_curriculum.training import reporting
from ddpm_curriculum.training.checkpoint import load_network

from .helpers import TINY, run, tiny_cfg, write_grid, write_tiny

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").glob("*.json")) + sorted((ROOT / "tests" / "fixtures").glob("*.json"))


def _tiles(path, n, shape, nrow):
    """The n images [N, H, W, C] of a torchvision grid PNG (padding 2)."""
    from PIL import Image

    c, h, w = shape
    with Image.open(path) as im:
        grid = np.asarray(im.convert("RGB"))
    return np.stack([grid[2 + (i // nrow) * (h + 2):][:h, 2 + (i % nrow) * (w + 2):][:, :w][..., :c]
                     for i in range(n)])


@pytest.mark.parametrize("sample_steps", [0, 1, 3, 25, 50, 100])
def test_no_block_is_the_sample_steps_rule(sample_steps):
    cfg = tiny_cfg(f"train.sample_steps={sample_steps}")
    assert cfg.sampler == SamplerConfig()
    assert sampler_spec(cfg) == spec_from_sample_steps(sample_steps)
    assert reporting._sampler_name(cfg) == spec_from_sample_steps(sample_steps).describe(100)


def test_shipped_configs_have_no_block_and_keep_their_sampler():
    loaded = 0
    for path in SHIPPED:
        try:
            cfg = load_config(path)
        except UserError:
            continue  # fixtures that are not training configs (or are bad on purpose)
        loaded += 1
        assert cfg.sampler == SamplerConfig(), path.name
        assert sampler_spec(cfg) == spec_from_sample_steps(cfg.train.sample_steps), path.name
    assert loaded >= 10


@pytest.mark.parametrize("block, want", [
    ({"name": "ddim", "steps": 7, "eta": 0.5}, SamplerSpec(name="ddim", steps=7, eta=0.5)),
    ({"name": "ddim", "steps": 4, "skip_type": "quadratic", "clip_denoised": False},
     SamplerSpec(name="ddim", steps=4, skip_type="quadratic", clip_denoised=False)),
    ({"name": "ddim"}, SamplerSpec(name="ddim", steps=100)),  # unset keys: the SamplerSpec defaults
    ({"name": "ancestral"}, SamplerSpec(name="ancestral")),
    ({"name": "ancestral", "clip_denoised": False}, SamplerSpec(name="ancestral", clip_denoised=False)),
])
def test_a_block_gives_its_spec(block, want):
    cfg = config_from_dict({**TINY, "train": {**TINY["train"], "sample_steps": 50}, "sampler": block})
    assert sampler_spec(cfg) == want
    assert sampler_spec(cfg) != spec_from_sample_steps(cfg.train.sample_steps)  # the block, not train.sample_steps
    # the same through --set, and a train.sample_steps that agrees with the block is accepted
    sets = [f"sampler.{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in block.items()]
    assert sampler_spec(tiny_cfg("train.sample_steps=50", *sets)) == want
    if want.name == "ancestral" and want.clip_denoised:
        assert sampler_spec(tiny_cfg(*sets, "train.sample_steps=0")) == want


@pytest.mark.parametrize("sets, fragment", [
    (["sampler.name=ancestral", "sampler.eta=0.5"], "'sampler.eta' does not apply to sampler 'ancestral'"),
    (["sampler.name=ancestral", "sampler.steps=5"], "'sampler.steps' does not apply to sampler 'ancestral'"),
    (["sampler.steps=5"], "'sampler.steps' is set but 'sampler.name' is null"),
    (["sampler.name=dpm"], "'sampler.name' = 'dpm' is not one of ['ancestral', 'ddim']"),
    (["sampler.name=ddim", "sampler.skip_type=quad"], "'sampler.skip_type' = 'quad' is not one of"),
    (["sampler.name=ddim", "sampler.eta=-1"], "'sampler.eta' = -1.0 must be >= 0"),
    (["sampler.name=ddim", "sampler.steps=101"], "DDIM steps = 101 must be in [1, 100]"),
    (["sampler.stepz=3"], "did you mean 'steps'"),
    (["sampler.name=ddim", "sampler.steps=7", "train.sample_steps=3"], "'train.sample_steps' = 3 names DDIM 3 steps"),
    (["sampler.name=ancestral", "train.sample_steps=9"], "remove 'train.sample_steps'"),
])
def test_bad_blocks_are_one_line_errors(sets, fragment):
    with pytest.raises(UserError) as err:
        tiny_cfg("train.sample_steps=50", *sets)  # TINY's own sample_steps (3) would contradict every block
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_bad_block_through_train_py_exits_2(tmp_path, capsys):
    from ddpm_curriculum.training.cli import main as train

    path = write_tiny(tmp_path, sample_steps=50)
    code = run_cli(train, ["--config-path", str(path), "--dry-run", "--set", "sampler.name=ancestral",
                           "--set", "sampler.eta=0.5"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "'sampler.eta' does not apply to sampler 'ancestral'" in err
    assert run_cli(train, ["--config-path", str(path), "--dry-run", "--set", "sampler.name=ddim",
                           "--set", "sampler.steps=20"]) == 0
    assert '"steps": 20' in capsys.readouterr().out


def _record_specs(monkeypatch):
    """Every spec that reporting.sample_images (grids and eval.json) samples with, in order."""
    seen, original = [], reporting.sample_images

    def recording(diffusion, model, spec, *args, **kwargs):
        seen.append(spec)
        return original(diffusion, model, spec, *args, **kwargs)

    monkeypatch.setattr(reporting, "sample_images", recording)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("sets, want", [
    (["sampler.name=ddim", "sampler.steps=7", "sampler.eta=0.5"], SamplerSpec(name="ddim", steps=7, eta=0.5)),
    (["sampler.name=ancestral"], SamplerSpec(name="ancestral")),
])
def test_the_trainer_grids_and_eval_use_the_block(tmp_path, monkeypatch, sets, want):
    seen = _record_specs(monkeypatch)
    cfg = tiny_cfg("train.steps=2", "train.image_intv=0", "train.num_samples=4", "eval.num_samples=4",
                   "train.seed=5", "diffusion.timesteps=10", "curriculum.enabled=false", "train.sample_steps=50",
                   *sets)
    trainer = run(cfg, tmp_path / "run")
    assert trainer.grid_spec == want
    assert seen and all(s == want for s in seen)  # the final grid and eval.json's samples
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["sampler"] == want.describe(10)
    net = load_network(tmp_path / "run")  # the EMA weights the grid was sampled with
    shape = trainer.image_shape
    tiles = _tiles(tmp_path / "run" / "samples" / "step00000002_final.png", 4, shape, nrow=2)
    images = to_uint8(sample_batch(net.diffusion, net.model, want, range(4), 5, shape, "cpu")).numpy()
    assert np.array_equal(tiles, images)
    other = to_uint8(sample_batch(net.diffusion, net.model, spec_from_sample_steps(3), range(4), 5, shape,
                                  "cpu")).numpy()
    assert not np.array_equal(tiles, other)  # the comparison can tell samplers apart
    assert sampler_spec(net.config) == want  # recorded in the checkpoint's config


@pytest.mark.slow
def test_resume_may_change_the_sampler(tmp_path, capsys):
    from ddpm_curriculum.training.cli import main as train
    from ddpm_curriculum.training.cli import resume_rule

    assert resume_rule("sampler.name") is None and resume_rule("sampler.steps") is None
    path = write_tiny(tmp_path, steps=4, sample_steps=50, num_samples=0)
    common = ["--run-dir", str(tmp_path / "run"), "--device", "cpu", "--no-progress"]
    assert run_cli(train, ["--config-path", str(path), *common, "--stop-at-step", "2",
                           "--set", "eval.num_samples=2", "--set", "curriculum.enabled=false"]) == 0
    assert run_cli(train, ["--resume", *common, "--set", "sampler.name=ddim", "--set", "sampler.steps=2"]) == 0
    run_dir = tmp_path / "run"
    assert json.loads((run_dir / "eval.json").read_text())["sampler"] == "DDIM 2 steps (uniform, eta 0)"
    assert json.loads((run_dir / "config.json").read_text())["sampler"]["steps"] == 2


def test_prune_preview_uses_the_networks_block(tmp_path, monkeypatch):
    from ddpm_curriculum.pruning import cli as prune_cli

    cfg = tiny_cfg("train.steps=1", "train.num_samples=0", "eval.num_samples=0", "curriculum.enabled=false",
                   "train.sample_steps=50", "sampler.name=ddim", "sampler.steps=4", "sampler.eta=0.25")
    run(cfg, tmp_path / "run")
    net = load_network(tmp_path / "run")
    seen = []
    monkeypatch.setattr(prune_cli, "save_grid", lambda diffusion, model, spec, *a, **k: seen.append(spec))
    args = Namespace(preview_samples=2, sample_steps=None, seed=0, batch_size=2)
    prune_cli.preview(net, args, net.model, tmp_path / "p.png", "cpu")
    prune_cli.preview(net, Namespace(**{**vars(args), "sample_steps": 3}), net.model, tmp_path / "p.png", "cpu")
    assert seen == [SamplerSpec(name="ddim", steps=4, eta=0.25), spec_from_sample_steps(3)]
    # prune.py's twoscale evaluation: the network's sampler, or --sample_steps instead of its whole block
    monkeypatch.setattr(prune_cli, "evaluate_samples", lambda cfg, *a, **k: {"metrics": sampler_spec(cfg)})
    args = Namespace(eval_samples=2, batch_size=2, sample_steps=None)
    assert prune_cli.evaluate(net, args, net.model, tmp_path / "e.json", "cpu") == seen[0]
    for steps in (3, 0):
        args.sample_steps = steps
        assert prune_cli.evaluate(net, args, net.model, tmp_path / "e.json", "cpu") == spec_from_sample_steps(steps)


# ------------------------------------------------------------------------------------ the experiment grid


def test_grid_eval_sampler_block_is_parsed(tmp_path):
    from ddpm_curriculum.experiments.grid import GridEvalConfig, eval_settings, eval_spec, expand_runs, load_grid

    assert eval_spec(GridEvalConfig()) == spec_from_sample_steps(25)
    assert eval_spec(GridEvalConfig(sample_steps=0)) == SamplerSpec(name="ancestral")
    grid = load_grid(write_grid(tmp_path))  # no block: eval.sample_steps 2
    assert eval_spec(grid.eval) == spec_from_sample_steps(2)
    block = {"name": "ddim", "steps": 7, "eta": 0.5}
    grid = load_grid(write_grid(tmp_path, eval={"num_samples": 8, "val_samples": 16, "sampler": block},
                                quick={"eval": {"num_samples": 4, "sampler": {"name": "ancestral"}}}))
    assert eval_spec(eval_settings(grid, False)) == SamplerSpec(name="ddim", steps=7, eta=0.5)
    assert eval_spec(eval_settings(grid, True)) == SamplerSpec(name="ancestral")
    assert len(expand_runs(grid)) == 4
    for ev, fragment in [({"sampler": {"steps": 3}}, "'eval.sampler.steps' is set but 'eval.sampler.name' is null"),
                         ({"sampler": {"name": "ancestral", "eta": 1}}, "'eval.sampler.eta' does not apply"),
                         ({"sample_steps": 10, "sampler": block}, "'eval.sample_steps' = 10 names"),
                         ({"sampler": {"name": "ddim", "stepz": 3}}, "did you mean 'steps'")]:
        with pytest.raises(UserError) as err:
            load_grid(write_grid(tmp_path, eval=ev))
        assert fragment in str(err.value), str(err.value)
    with pytest.raises(UserError, match="'quick.eval.sampler.eta' does not apply"):
        load_grid(write_grid(tmp_path, quick={"eval": {"sampler": {"name": "ancestral", "eta": 1}}}))
    too_many = load_grid(write_grid(tmp_path, eval={"sampler": {"name": "ddim", "steps": 500}}))
    with pytest.raises(UserError, match="arm 'baseline': the grid's eval sampler: DDIM steps = 500"):
        expand_runs(too_many)


@pytest.mark.slow
def test_grid_evaluation_samples_with_the_block(tiny_run, monkeypatch):
    from ddpm_curriculum.experiments.evaluate import sample_metrics
    from ddpm_curriculum.experiments.grid import GridEvalConfig

    seen = _record_specs(monkeypatch)
    want = SamplerSpec(name="ddim", steps=7, eta=0.5)
    settings = GridEvalConfig(num_samples=6, batch_size=6, val_samples=8, seed=3, tki_t=[],
                              sampler=SamplerConfig(name="ddim", steps=7, eta=0.5))
    metrics = sample_metrics(load_network(tiny_run), settings, "cpu")
    assert "minor_present" in metrics
    assert len(seen) == 2 and all(s == want for s in seen)  # the network's samples and the Bayes ceiling's
