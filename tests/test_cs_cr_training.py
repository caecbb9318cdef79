"""Modes CS and CR inside the trainer: clean reserved capacity (bit-identical, weight decay on and off),
regrowth choices against independently accumulated scores, function-preserving regrowth, exact resume
across transitions, the logs, and the 2-process regrowth decision."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch

from ddpm_curriculum.sparsity import channel_mask
from ddpm_curriculum.sparsity.channel_mask import ChannelSparsity, select_channels
from ddpm_curriculum.training import CurriculumTrainer
from ddpm_curriculum.training.checkpoint import load_checkpoint, load_network
from .helpers import CPU, assert_same_state, cs_cfg, ddp_spawn, run, tiny_cfg


def transitions(run_dir):
    return [json.loads(x) for x in (run_dir / "transitions.jsonl").read_text().splitlines()]


def ext_of(trainer, cls):
    return next(e for e in trainer.extensions if isinstance(e, cls))


# ------------------------------------------------------------------------------- reserved capacity


@pytest.mark.slow
@pytest.mark.parametrize("optimizer, wd", [("adamw", 0.1), ("adam", 0.0)])
def test_reserved_entries_stay_bit_identical_while_masked(tmp_path, optimizer, wd):
    cfg = cs_cfg(f"train.optimizer={optimizer}", f"train.weight_decay={wd}", "model.drop_rate=0.0",
                 stage_steps=15, steps=40)
    trainer = CurriculumTrainer(cfg, tmp_path, CPU, progress=False, stop_at_step=30)
    init = copy.deepcopy(trainer.model.state_dict())
    trainer.train()
    model = trainer.model
    masked = model.channel_mask == 0
    assert int((~masked).sum()) == 32 and trainer.step == 30  # still in stage 'mid'
    params = dict(model.named_parameters())
    names = {id(p): n for n, p in params.items()}
    ema = dict(trainer.ema.model.named_parameters())
    for param, entries in model.reserved_entries(masked):
        name, entries = names[id(param)], entries.expand_as(param)
        assert torch.equal(param[entries], init[name][entries]), f"{name}: reserved entries moved"
        assert torch.equal(ema[name][entries], init[name][entries]), f"{name}: EMA drifted"
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.all(trainer.optimizer.state[param][key][entries] == 0), f"{name}: Adam {key}"
        assert not torch.equal(param[~entries], init[name][~entries]), f"{name}: active entries must train"
    # channels regrown at step 15 trained afterwards; their birth stage is recorded
    born = (model.channel_birth_stage == 1).nonzero().flatten()
    assert len(born) == 16 and set(born.tolist()) == set(transitions(tmp_path)[1]["regrown"])
    conv2 = params["middle.2.conv2.weight"]
    assert not torch.equal(conv2[born], init["middle.2.conv2.weight"][born])


# ------------------------------------------------------------------------------------ regrowth choice


def record_accumulation(monkeypatch):
    """Capture, independently of the extension, what each criterion accumulates at every step."""
    seen = []
    original = ChannelSparsity.after_backward

    def after_backward(self, ctx):
        probe = self.model.gate_probe
        if probe is not None and not hasattr(probe, "spied"):
            collect, probe.spied = probe.collect, True

            def spy(*size):
                part = collect(*size)
                seen.append(("gate", ctx.step, part.double().clone()))
                return part
            probe.collect = spy
        grad = self.model.middle[0].conv2.weight.grad
        seen.append(("weight", ctx.step, grad.abs().sum(dim=(1, 2, 3)).double().clone()))
        original(self, ctx)

    monkeypatch.setattr(ChannelSparsity, "after_backward", after_backward)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gate_gradient", "weight_gradient", "gradient"])
def test_regrowth_picks_the_largest_accumulated_scores(tmp_path, monkeypatch, method):
    seen = record_accumulation(monkeypatch)
    trainer = run(cs_cfg(f"sparsity.regrowth_method={method}"), tmp_path)
    recs = transitions(tmp_path)
    assert [r["active_channels"] for r in recs] == [16, 32, 64]
    assert recs[0]["regrown"] == list(range(16))
    kind = "gate" if method == "gate_gradient" else "weight"
    mask = torch.zeros(64, dtype=torch.bool)
    mask[:16] = True
    for rec, start in zip(recs[1:], (0, 5) if kind == "gate" else (0, 0), strict=True):
        # gate: summed over the stage just ended (reset at each regrowth); weight: since the start (seed)
        score = sum(p for k, step, p in seen if k == kind and start <= step < rec["step"])
        want = select_channels(score, ~mask, rec["active_channels"] - int(mask.sum()))
        assert rec["regrown"] == want
        mask[want] = True
    assert torch.equal(trainer.model.channel_mask.bool(), mask)


@pytest.mark.slow
def test_gradient_is_the_seed_criterion_and_differs_from_gate_gradient(tmp_path):
    picks = {m: transitions(run(cs_cfg(f"sparsity.regrowth_method={m}"), tmp_path / m).run_dir)[1]["regrown"]
             for m in ("gradient", "weight_gradient", "gate_gradient")}
    assert picks["gradient"] == picks["weight_gradient"] != picks["gate_gradient"]


@pytest.mark.slow
def test_random_regrowth_is_seeded(tmp_path):
    pick = lambda d, seed: transitions(run(cs_cfg("sparsity.regrowth_method=random", f"train.seed={seed}",
                                              stage_steps=2, steps=5), tmp_path / d).run_dir)[1]["regrown"]
    assert pick("a", 0) == pick("b", 0) != pick("c", 1)


@pytest.mark.slow
def test_zero_out_regrowth_preserves_the_function_when_groupnorm_cannot_mix(tmp_path):
    """With one GroupNorm group per channel the only coupling left is gone, so zero_out must leave the probe
    loss unchanged at the transition, while keep changes it."""
    loss = {}
    for init in ("zero_out", "keep"):
        trainer = run(cs_cfg("model.norm_groups=128", f"sparsity.regrow_init={init}", stage_steps=3, steps=7),
                      tmp_path / init)
        rec = transitions(trainer.run_dir)[1]
        loss[init] = (rec["probe_loss_before"], rec["probe_loss_after"])
        if init == "zero_out":
            fan_out = trainer.model.fan_out_entries(trainer.model.channel_birth_stage == 1)
            ema = trainer.ema.model.fan_out_entries(trainer.model.channel_birth_stage == 1)
            # one step after the transition the fan-out has moved off zero in the model, not yet far in the EMA
            assert all(torch.count_nonzero(p[e.expand_as(p)]) > 0 for p, e in fan_out)
            assert all(p[e.expand_as(p)].abs().max() < 1e-2 for p, e in ema)
    assert loss["zero_out"][1] == pytest.approx(loss["zero_out"][0], rel=1e-6)
    assert abs(loss["keep"][1] - loss["keep"][0]) > 1e-5


# ---------------------------------------------------------------------------------- resume and logs


@pytest.mark.slow
def test_cs_resume_across_a_transition_is_bit_identical(tmp_path):
    cfg = cs_cfg()
    full = run(cfg, tmp_path / "full")
    part = tmp_path / "part"
    run(cfg, part, stop_at_step=3)  # mid-stage: the gate score must survive the checkpoint
    run(cfg, part, resume_state=load_checkpoint(part), stop_at_step=10)  # exactly at a boundary
    resumed = run(cfg, part, resume_state=load_checkpoint(part))
    assert_same_state(full, resumed)
    for key in ("channel_mask", "channel_birth_stage"):
        assert torch.equal(getattr(full.model, key), getattr(resumed.model, key))
    assert [r["regrown"] for r in transitions(full.run_dir)] == [r["regrown"] for r in transitions(part)]
    assert "channel_birth_stage" in load_checkpoint(part)["model"]
    loaded = load_network(part)  # sampling rebuilds the SparseUNet with its mask from the stored config
    assert torch.equal(loaded.model.channel_mask, resumed.ema.model.channel_mask)


@pytest.mark.slow
def test_cr_logs_loss_mse_reg_and_structured_sparsity(tmp_path, capsys):
    cfg = tiny_cfg("eval.num_samples=0", "train.num_samples=0", "regularization.enabled=true",
                   "regularization.lambda_max=0.08", "train.log_intv=1")
    trainer = run(cfg, tmp_path)
    out = capsys.readouterr().out
    assert re.search(r"1/1\.75 epochs \[full\]: loss=[\d.]+, mse=[\d.]+, reg=[\d.]+", out), out
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for rec in recs:
        assert rec["loss"] == pytest.approx(rec["mse"] + rec["reg"])
    first = recs[0]  # step 1: λ = 0.08, loss = mse + λ/B·Σ‖W_c‖ (B = 8); Σ is logged after the step
    assert first["lambda"] == 0.08 and first["reg"] > 0 and recs[-1]["reg"] == 0.0
    assert first["reg"] == pytest.approx(0.08 / 8 * first["group_l1"], rel=1e-2)
    sparsity = [json.loads(x) for x in (tmp_path / "structured_sparsity.jsonl").read_text().splitlines()]
    assert [(s["stage"], s["step"]) for s in sparsity] == [("high", 5), ("full", 14)]
    assert len(sparsity[0]["layers"]) == sum(isinstance(m, torch.nn.Conv2d) for m in trainer.model.modules())


@pytest.mark.slow
def test_cr_prox_produces_exact_zero_channels_and_combine_reg(tmp_path):
    cfg = tiny_cfg("eval.num_samples=0", "train.num_samples=0", "regularization.enabled=true",
                   "regularization.prox=true", "regularization.lambda_max=20", "regularization.combine=reg",
                   "regularization.schedule=list", "regularization.per_stage=[20, 20]", "train.steps=6")
    trainer = run(cfg, tmp_path)
    zero_rows = sum(int((w.detach().flatten(1).norm(dim=1) == 0).sum()) for w in ext_of_group_l1(trainer).weights)
    assert zero_rows > 0
    report = [json.loads(x) for x in (tmp_path / "structured_sparsity.jsonl").read_text().splitlines()][-1]
    assert report["total_share"] * report["groups"] >= zero_rows


def ext_of_group_l1(trainer):
    from ddpm_curriculum.sparsity.group_l1 import GroupL1

    return ext_of(trainer, GroupL1)


# --------------------------------------------------------------------------------------------- DDP


def _regrow_and_record(cfg, run_dir):
    """Train, recording the scores each regrowth ranked (one [C] tensor per transition)."""
    scores, select = [], channel_mask.select_channels

    def recording(score, masked, count):
        scores.append(score.clone())
        return select(score, masked, count)

    channel_mask.select_channels = recording
    try:
        return run(cfg, run_dir), scores
    finally:
        channel_mask.select_channels = select


def _ddp_worker(rank, run_dir, out):
    trainer, scores = _regrow_and_record(cs_cfg("model.drop_rate=0.0", steps=11), run_dir)
    torch.save({"mask": trainer.model.channel_mask, "birth": trainer.model.channel_birth_stage,
                "scores": torch.stack(scores)}, f"{out}/rank{rank}.pt")


@pytest.mark.slow
def test_two_gloo_ranks_regrow_the_same_channels_as_one_process(tmp_path):
    ddp_spawn(_ddp_worker, str(tmp_path / "ddp"), str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key in ("mask", "birth", "scores"):
        assert torch.equal(r0[key], r1[key]), f"ranks differ in {key}"
    single, scores = _regrow_and_record(cs_cfg("model.drop_rate=0.0", steps=11), tmp_path / "single")
    assert torch.equal(r0["birth"], single.model.channel_birth_stage)
    assert sorted(r0["birth"].tolist()) == [0] * 16 + [1] * 16 + [2] * 32
    # each score covers both ranks' halves of the batch: world-size independent up to float rounding
    assert r0["scores"].shape == (2, 64) and bool((r0["scores"][0, 16:] > 0).all())
    torch.testing.assert_close(r0["scores"], torch.stack(scores), rtol=1e-3, atol=0)


@pytest.mark.slow
def test_decoder_location_keeps_reserved_entries_bit_identical_and_regrows_every_block(tmp_path):
    cfg = cs_cfg("sparsity.location=decoder", "model.drop_rate=0.0", stage_steps=15, steps=40)
    trainer = CurriculumTrainer(cfg, tmp_path, CPU, progress=False, stop_at_step=30)
    init = copy.deepcopy(trainer.model.state_dict())
    trainer.train()
    model = trainer.model
    masked = model.channel_mask == 0
    # every up block's input keeps its own share active: 50% in stage 'mid'
    for where in model.segment_slices():
        assert int((~masked[where]).sum()) == (where.stop - where.start) // 2
    names = {id(p): n for n, p in model.named_parameters()}
    ema = dict(trainer.ema.model.named_parameters())
    for param, entries in model.reserved_entries(masked):
        name, entries = names[id(param)], entries.expand_as(param)
        assert torch.equal(param[entries], init[name][entries]), f"{name}: reserved entries moved"
        assert torch.equal(ema[name][entries], init[name][entries]), f"{name}: EMA drifted"
        assert not torch.equal(param[~entries], init[name][~entries]), f"{name}: active entries must train"
    recs = transitions(tmp_path)
    assert recs[1]["active_channels"] == int((~masked).sum()) == model.gated_channels // 2
    born = (model.channel_birth_stage == 1).nonzero().flatten().tolist()
    assert born == recs[1]["regrown"] and len(born) == model.gated_channels // 4


def test_decoder_location_refuses_the_weight_gradient_criterion():
    from ddpm_curriculum.errors import UserError

    with pytest.raises(UserError, match="use gate_gradient or random"):
        cs_cfg("sparsity.location=decoder", "sparsity.regrowth_method=weight_gradient")
