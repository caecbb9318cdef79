"""Mode prune in the trainer: phase learn (its update rule PolicyGradientUpdate) and phase finetune
(MaskedFinetune), each with an exact resume; weights untouched while learning; pruned weights exactly zero
through Adam and the EMA."""

import json
from pathlib import Path

import pytest
import torch

from ddpm_curriculum.config import load_config
from ddpm_curriculum.errors import UserError
from ddpm_curriculum.pruning.masks import save_masks
from ddpm_curriculum.pruning.nm import kept_per_group, nm_groups, nm_mask
from ddpm_curriculum.training import CurriculumTrainer
from ddpm_curriculum.training.checkpoint import load_checkpoint, load_network
from .helpers import CPU, PRUNE, ROOT, ddp_spawn, run, tiny_cfg, train_script as script, write_tiny



@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny trained run (the dense network) and a 2:4 magnitude mask file for it."""
    d = tmp_path_factory.mktemp("source")
    trainer = run(tiny_cfg("eval.num_samples=0", "train.num_samples=0"), d / "run")
    layers = {k: m for k, m in trainer.ema.model.named_modules() if k in ("downsamples.level_0.0.conv1",
                                                                           "downsamples.level_1.0.1.project_in",
                                                                           "middle.0.fc", "upsamples.level_0.1.conv2")}
    save_masks(d / "masks.pt", {k: nm_mask(m.weight, 2, 4) for k, m in layers.items()})
    return d


def learn_cfg(source, *extra):
    return tiny_cfg(*PRUNE, f"maskpro.source={source / 'run'}", f"maskpro.masks={source / 'masks.pt'}",
                    "maskpro.logits_magnitude=2.0", *extra)


def full_and_resumed(cls, cfg, tmp_path, stop_at=3):
    """An uninterrupted run in tmp/full and one stopped after ``stop_at`` steps and resumed in tmp/part."""
    full = cls(cfg, tmp_path / "full", CPU, progress=False)
    full.train()
    cls(cfg, tmp_path / "part", CPU, progress=False, stop_at_step=stop_at).train()
    resumed = cls(cfg, tmp_path / "part", CPU, progress=False, resume_state=load_checkpoint(tmp_path / "part"))
    resumed.train()
    return full, resumed


@pytest.mark.slow
def test_learning_resumes_exactly_and_never_changes_the_weights(source, tmp_path):
    full, resumed = full_and_resumed(CurriculumTrainer, learn_cfg(source), tmp_path)
    a, b = full.update_rule.policy.state_dict(), resumed.update_rule.policy.state_dict()
    assert a["delta"] == b["delta"] != 0.0
    assert all(torch.equal(a["logits"][k], b["logits"][k]) for k in a["logits"])
    initial_logits = {k: 2.0 * nm_groups(v, 4).float() for k, v in a["initial_masks"].items()}
    assert any(not torch.equal(a["logits"][k], initial_logits[k]) for k in a["logits"])  # it learned something
    dense = load_network(source / "run")
    state = load_checkpoint(tmp_path / "full")
    for k, v in dense.model.state_dict().items():  # weights are the source's, bit for bit
        assert torch.equal(state["model"][k], v) and torch.equal(state["ema"][k], v), k
    assert set(state["masks"]) == set(torch.load(source / "masks.pt", weights_only=True))
    for name, keep in state["masks"].items():  # the learned masks are exact 2:4
        assert bool((kept_per_group(keep, 4) == 2).all()), name
    learned = load_network(tmp_path / "full")  # load_network applies the learned masks
    assert learned.masks is not None
    for name, keep in state["masks"].items():
        w = learned.model.get_submodule(name).weight
        assert torch.all(w[~keep] == 0) and torch.equal(w[keep], dense.model.get_submodule(name).weight[keep])


def _ddp_learn_worker(rank, source, run_dir, out):
    trainer = CurriculumTrainer(learn_cfg(Path(source), "train.steps=6"), run_dir, CPU, progress=False)
    trainer.train()
    torch.save(trainer.update_rule.policy.state_dict(), f"{out}/rank{rank}.pt")


@pytest.mark.slow
def test_two_process_learning_matches_one_process(source, tmp_path):
    ddp_spawn(_ddp_learn_worker, str(source), str(tmp_path / "ddp"), str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    single = CurriculumTrainer(learn_cfg(source, "train.steps=6"), tmp_path / "one", CPU, progress=False)
    single.train()
    one = single.update_rule.policy.state_dict()
    assert r0["delta"] == r1["delta"] and r0["delta"] == pytest.approx(one["delta"], rel=1e-4, abs=1e-9)
    for k in r0["logits"]:
        assert torch.equal(r0["logits"][k], r1["logits"][k]), k  # ranks agree exactly
        torch.testing.assert_close(r0["logits"][k], one["logits"][k], rtol=0, atol=1e-4)  # = one process


@pytest.mark.slow
def test_learning_uses_only_the_curriculum_stage_timesteps(source, tmp_path):
    CurriculumTrainer(learn_cfg(source), tmp_path, CPU, progress=False).train()
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for rec in recs:
        assert {"maskpro_r", "maskpro_delta", "loss_initial_mask", "maskpro_changed_groups"} <= set(rec)
        if rec["stage"] == "high":  # t ∈ [80, 99] of T = 100: only the last two of 10 bins
            assert {i for i, v in enumerate(rec["loss_per_t_bin"]) if v is not None} <= {8, 9}
    assert any(r["stage"] == "full" for r in recs)


@pytest.mark.slow
def test_learning_refuses_a_pruned_source(source, tmp_path):
    CurriculumTrainer(learn_cfg(source, "train.steps=6"), tmp_path / "learn", CPU, progress=False).train()
    with pytest.raises(UserError, match="is a pruned network"):
        CurriculumTrainer(learn_cfg(source, f"maskpro.source={tmp_path / 'learn'}"), tmp_path / "x", CPU)


@pytest.mark.slow
def test_finetune_keeps_pruned_weights_exactly_zero_and_resumes_exactly(source, tmp_path):
    CurriculumTrainer(learn_cfg(source, "train.steps=6"), tmp_path / "learn", CPU, progress=False).train()
    cfg = tiny_cfg(*PRUNE, "maskpro.phase=finetune", f"maskpro.source={tmp_path / 'learn'}",
                   "train.weight_decay=0.1", "train.optimizer=adamw")
    full, resumed = full_and_resumed(CurriculumTrainer, cfg, tmp_path)
    for x, y in [(full.model.state_dict(), resumed.model.state_dict()),
                 (full.ema.state_dict(), resumed.ema.state_dict())]:
        assert all(torch.equal(x[k], y[k]) for k in x)
    masks = load_checkpoint(tmp_path / "learn")["masks"]
    start = load_network(tmp_path / "learn", use_ema=False).model
    for name, keep in masks.items():
        for model in (full.model, full.ema.model):
            w = model.get_submodule(name).weight
            assert torch.all(w[~keep] == 0), name  # exactly zero after Adam(W), weight decay and EMA
        trained = full.model.get_submodule(name).weight
        assert not torch.equal(trained[keep], start.get_submodule(name).weight[keep])  # kept ones do train
        adam = full.optimizer.state[trained]
        assert torch.all(adam["exp_avg"][~keep] == 0) and torch.all(adam["exp_avg_sq"][~keep] == 0)
    assert load_checkpoint(tmp_path / "full")["extensions"]["masked_finetune"]["masks"].keys() == masks.keys()
    assert load_network(tmp_path / "full").masks.keys() == masks.keys()  # a fine-tuned run is a pruned network


@pytest.mark.slow
def test_finetune_needs_masks(source, tmp_path):
    cfg = tiny_cfg(*PRUNE, "maskpro.phase=finetune", f"maskpro.source={source / 'run'}")
    with pytest.raises(UserError, match="has no masks"):
        CurriculumTrainer(cfg, tmp_path, CPU, progress=False).train()


@pytest.mark.slow
def test_script_takes_the_architecture_from_the_source_and_explains_errors(source, tmp_path):
    cfg_path = write_tiny(tmp_path, steps=6, num_samples=0)
    raw = json.loads(cfg_path.read_text())
    raw["model"]["hid_channels"] = 64  # differs from the source: replaced by the source's 32
    raw["maskpro"] = {"enabled": True, "source": str(source / "run"), "masks": str(source / "masks.pt")}
    raw["eval"] = {"num_samples": 0}
    cfg_path.write_text(json.dumps(raw))
    res = script("--config-path", str(cfg_path), "--run-dir", str(tmp_path / "run"), "--device", "cpu",
                 "--no-progress")
    assert res.returncode == 0, res.stderr
    assert "took model.hid_channels" in res.stdout and "mode prune" in res.stdout
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["hid_channels"] == 32
    missing = script("--config-path", str(cfg_path), "--run-dir", str(tmp_path / "r2"), "--device", "cpu",
                     "--set", "maskpro.source=null")
    assert missing.returncode == 2 and "set maskpro.source" in missing.stderr
    assert "Traceback" not in missing.stderr and len(missing.stderr.strip().splitlines()) == 1


def test_shipped_prune_configs_are_mode_prune():
    for name in ("prune_twoscale.json", "prune_cifar10_maskpro.json"):
        cfg = load_config(ROOT / "configs" / name)
        assert cfg.mode == "prune" and cfg.maskpro.phase == "learn"
        assert (cfg.maskpro.n, cfg.maskpro.m) == (2, 4)


def test_mask_learning_shares_the_trainers_step_status(source, tmp_path, monkeypatch):
    """Phase learn's rule has no optimizer, schedule or EMA, and its paired sums ride on the step's one status
    all-reduce (the trainer's, as in every mode)."""
    from ddpm_curriculum import dist

    calls = []
    real = dist.all_reduce_sum
    monkeypatch.setattr(dist, "all_reduce_sum", lambda x: calls.append(x.numel()) or real(x))
    trainer = CurriculumTrainer(learn_cfg(source), tmp_path, CPU, progress=False)
    assert trainer.optimizer is None and trainer.ema is None and trainer.scheduler is None
    trainer._enter_stage(trainer.plan[0])
    images = torch.stack([trainer.dataset[i][0] for i in range(trainer.cfg.train.batch_size)])
    calls.clear()
    loss, _ = trainer.train_step(images)
    assert calls == [5]  # non-finite, stop, sampled-mask loss sum, count, initial-mask loss sum
    last = trainer.update_rule.learning.last
    assert last["maskpro_r"] == pytest.approx(loss - last["loss_initial_mask"], abs=1e-12)
