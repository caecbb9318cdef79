"""Curriculum variants and the baselines that separate ordering from reweighting: Min-SNR / P2 loss weights
for each prediction type, the matched-histogram sampler, log-SNR stage bounds and patience pacing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ddpm_curriculum.config import config_from_dict
from ddpm_curriculum.diffusion import (CurriculumDiffusion, GaussianDiffusion, loss_weight_table,
                                       logsnr_range_indices, make_betas, matched_histogram)
from ddpm_curriculum.errors import UserError
from ddpm_curriculum.training import CurriculumTrainer, builders
from ddpm_curriculum.training.checkpoint import load_checkpoint
from ddpm_curriculum.training.plan import PatiencePacing, curriculum_layout
from ddpm_curriculum.training.reporting import MetricsLog
from .helpers import CPU, ROOT, assert_same_state, run, tiny_cfg

BETAS = make_betas("linear", 1000, 1e-4, 0.02)


# ------------------------------------------------------------------------------------- loss weights


@pytest.mark.parametrize("pred", ["eps", "x0", "v"])
def test_min_snr_and_p2_weights_match_the_published_formulas(pred):
    snr = GaussianDiffusion(BETAS).snr_table
    gamma, k, g2 = 5.0, 1.0, 0.5
    min_snr = {"eps": np.minimum(1.0, gamma / snr), "x0": np.minimum(snr, gamma),
               "v": np.minimum(snr, gamma) / (snr + 1)}[pred]
    p2 = {"eps": 1 / (k + snr) ** g2, "x0": snr / (k + snr) ** g2, "v": snr / ((snr + 1) * (k + snr) ** g2)}[pred]
    np.testing.assert_allclose(loss_weight_table("min_snr", snr, pred, gamma=gamma), min_snr, rtol=1e-12)
    np.testing.assert_allclose(loss_weight_table("p2", snr, pred, k=k, gamma=g2), p2, rtol=1e-12)


@pytest.mark.parametrize("kind, params", [("min_snr", {"gamma": 5.0}), ("p2", {"k": 1.0, "gamma": 1.0})])
def test_weighted_objective_is_the_same_for_every_parameterisation(kind, params):
    """For one prediction, w_eps·‖ε−ε̂‖² = w_x0·‖x0−x̂0‖² = w_v·‖v−v̂‖²: the conversion keeps the objective."""
    d = GaussianDiffusion(BETAS)
    g = torch.Generator().manual_seed(0)
    x0, eps, eps_hat = (torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0, 10, 200, 500, 800, 999])
    ab = torch.from_numpy(d.alphas_bar)[t].view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    x0_hat = (x_t - (1 - ab).sqrt() * eps_hat) / ab.sqrt()
    v, v_hat = ab.sqrt() * eps - (1 - ab).sqrt() * x0, ab.sqrt() * eps_hat - (1 - ab).sqrt() * x0_hat
    err = {"eps": (eps - eps_hat), "x0": (x0 - x0_hat), "v": (v - v_hat)}
    losses = {p: torch.from_numpy(loss_weight_table(kind, d.snr_table, p, **params))[t]
              * err[p].square().flatten(1).sum(1) for p in err}
    torch.testing.assert_close(losses["x0"], losses["eps"], rtol=1e-9, atol=0)
    torch.testing.assert_close(losses["v"], losses["eps"], rtol=1e-9, atol=0)


def test_metrics_log_reports_the_weighted_objective_and_the_plain_loss():
    log = MetricsLog(None, 2, 10, CPU)
    per_sample, weights, t = torch.tensor([1.0, 3.0]), torch.tensor([0.5, 0.25]), torch.tensor([1, 8])
    log.add(per_sample, weights, t, torch.tensor(1.0), 2, {"reg": torch.tensor(0.1)})
    rec = log.flush()
    assert rec["loss"] == pytest.approx((0.5 + 0.75) / 2 + 0.1) and rec["mse"] == pytest.approx(2.0)
    assert rec["reg"] == pytest.approx(0.1) and rec["loss_per_t_bin"] == [1.0, 3.0]


@pytest.mark.slow
def test_trainer_backpropagates_the_weighted_loss(tmp_path, monkeypatch):
    cfg = tiny_cfg("curriculum.enabled=false", "curriculum.stages=[]", "train.loss_weighting=min_snr",
                   "train.min_snr_gamma=5", "train.log_intv=1", "eval.num_samples=0", "train.num_samples=0",
                   "train.steps=2")
    trainer = run(cfg, tmp_path / "w")
    rec = json.loads((tmp_path / "w" / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["loss"] < rec["mse"]  # eps-prediction Min-SNR weights are ≤ 1, < 1 where snr > 5
    # all-zero weights → zero gradients → Adam leaves every parameter where it was
    zero = CurriculumTrainer(cfg, tmp_path / "z", CPU, progress=False)
    zero.loss_weights = lambda t: torch.zeros(t.shape)
    before = {k: v.clone() for k, v in zero.model.state_dict().items()}
    zero.train()
    assert all(torch.equal(before[k], v) for k, v in zero.model.state_dict().items())
    assert not all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


# -------------------------------------------------------------------------------- matched histogram


def test_matched_histogram_is_the_average_of_the_curriculum_over_steps():
    cfg = config_from_dict(json.loads((ROOT / "configs" / "twoscale_matched.json").read_text()))
    diffusion = builders.make_diffusion(cfg)
    probs = builders.timestep_probs(cfg, diffusion, steps_per_epoch=128)
    brute = np.zeros(1000)
    for stage in curriculum_layout(cfg, 128):  # every step draws uniformly from its stage's range
        lo, hi = diffusion.range_indices(stage.t_min, stage.t_max)
        brute[lo:hi + 1] += stage.num_steps / (hi - lo + 1)
    np.testing.assert_allclose(probs, brute / brute.sum(), rtol=1e-12)
    assert probs[900] / probs[100] == pytest.approx((0.1 / 200 + 0.1 / 400 + 0.1 / 600 + 0.2 / 800 + 0.5 / 1000)
                                                    / (0.5 / 1000))
    np.testing.assert_allclose(matched_histogram([(0, 1), (1, 1)], [1, 1], 3), [0.25, 0.75, 0.0])


def test_histogram_sampler_draws_the_given_frequencies():
    d = CurriculumDiffusion(make_betas("linear", 10, 1e-4, 0.02))
    probs = np.array([0.0, 0.1, 0.0, 0.4, 0.0, 0.0, 0.2, 0.0, 0.0, 0.3])
    d.set_timestep_probs(probs)
    t = d.sample_timesteps(200_000, generator=torch.Generator().manual_seed(0))
    freq = np.bincount(t.numpy(), minlength=10) / len(t)
    np.testing.assert_allclose(freq, probs, atol=4e-3)
    assert d.time_range == (1, 9)
    with pytest.raises(UserError, match="summing to 1"):
        d.set_timestep_probs(np.ones(10))


def test_matched_sampler_needs_a_baseline_with_stages():
    stages = [{"t_min": 0.5, "t_max": 1.0, "epochs": 1}, {"t_min": 0.0, "t_max": 1.0, "epochs": 1}]
    with pytest.raises(UserError, match="set 'curriculum.enabled' to false"):
        config_from_dict({"train": {"epochs": 2}, "curriculum": {"enabled": True, "stages": stages,
                                                                   "sampler": "matched_histogram"}})
    with pytest.raises(UserError, match="matched_histogram sampler needs stages"):
        config_from_dict({"train": {"epochs": 2}, "curriculum": {"sampler": "matched_histogram"}})


# ------------------------------------------------------------------------------------ log-SNR bounds


def test_logsnr_bounds_follow_the_half_open_rule_on_the_logsnr_axis():
    ab = GaussianDiffusion(BETAS).alphas_bar
    logsnr = np.log(ab / (1 - ab))
    u = (logsnr[0] - logsnr) / (logsnr[0] - logsnr[-1])
    assert logsnr_range_indices(0.0, 1.0, ab) == (0, 999)
    edges = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    ranges = [logsnr_range_indices(a, b, ab) for a, b in zip(edges, edges[1:], strict=False)]
    for (a, b), (lo, hi) in zip(zip(edges, edges[1:], strict=False), ranges, strict=False):
        inside = [t for t in range(1000) if a <= u[t] and (u[t] < b or b == 1.0)]
        assert (lo, hi) == (inside[0], inside[-1])
    assert all(ranges[i][1] + 1 == ranges[i + 1][0] for i in range(4))  # a partition of 0..999
    # not the same as t-space: under the linear schedule the top fifth of log-SNR starts well below t = 800
    assert ranges[-1][0] < 800
    d = CurriculumDiffusion(BETAS, space="logsnr")
    d.set_time_range(0.8, 1.0)
    assert d.time_range == ranges[-1]


# ---------------------------------------------------------------------------------- patience pacing


def patience_cfg(*overrides):
    stages = ('curriculum.stages=[{"t_min": 0.8, "t_max": 1.0, "steps": 6, "name": "a"}, '
              '{"t_min": 0.4, "t_max": 1.0, "steps": 5, "name": "b"}, {"t_min": 0.0, "t_max": 1.0, "steps": 1}]')
    return tiny_cfg(stages, "curriculum.pacing=patience", "curriculum.patience=2", "eval.num_samples=0",
                    "train.num_samples=0", *overrides)


def test_patience_pacing_advances_after_a_plateau_and_never_beyond_the_maximum():
    cfg = patience_cfg("curriculum.loss_smoothing=0", "curriculum.min_delta=0.1")
    pacing = PatiencePacing(cfg, steps_per_epoch=8)
    plan, ends = pacing.plan(), []
    losses = [1.0, 0.5, 0.49, 0.48,  # stage a: improves by > 10% once, then 2 steps without → ends after step 4
              1.0, 0.8, 0.6, 0.4, 0.3, 0.2, 0.1]  # stage b keeps improving → runs its 5-step maximum
    for step, loss in enumerate(losses, start=1):
        if pacing.update(plan, step, loss):
            plan = pacing.plan()
            ends.append(step)
    assert ends == [4]
    assert [(s.start_step, s.end_step) for s in plan] == [(0, 4), (4, 9), (9, 14)]
    clone = PatiencePacing(cfg, 8)
    clone.load_state_dict(pacing.state_dict())
    assert clone.plan() == plan and clone.state_dict() == pacing.state_dict()


@pytest.mark.slow
def test_patience_run_resumes_bit_identically_across_an_early_transition(tmp_path):
    cfg = patience_cfg("curriculum.min_delta=1.0")  # nothing counts as improvement → stages end after 3 steps
    full = run(cfg, tmp_path / "full")
    starts = [json.loads(x)["step"] for x in (tmp_path / "full" / "transitions.jsonl").read_text().splitlines()]
    assert starts == [0, 3, 6]  # both early, the last stage runs to step 14
    part = tmp_path / "part"
    run(cfg, part, stop_at_step=2)
    run(cfg, part, resume_state=load_checkpoint(part), stop_at_step=5)
    resumed = run(cfg, part, resume_state=load_checkpoint(part))
    assert_same_state(full, resumed)
    assert [json.loads(x)["step"] for x in (part / "transitions.jsonl").read_text().splitlines()] == starts
    fixed = run(tiny_cfg("eval.num_samples=0", "train.num_samples=0"), tmp_path / "fixed")
    assert fixed.plan == fixed.pacing.plan() and fixed.pacing.state_dict() == {}


def test_timestep_sampler_is_a_pure_function_of_the_stage():
    """TimestepSampler.for_stage draws exactly what CurriculumDiffusion's time range / histogram draw, holds no
    state, and the trainer's current sampler is that of the stage it entered last."""
    from ddpm_curriculum.diffusion.timestep_sampling import TimestepSampler

    d = CurriculumDiffusion(make_betas("linear", 50))
    for t_min, t_max in [(0.8, 1.0), (0.0, 1.0), (0.3, 0.5)]:
        sampler = TimestepSampler.for_stage(d, t_min, t_max)
        d.set_time_range(t_min, t_max)
        assert sampler.time_range == d.time_range == d.range_indices(t_min, t_max)
        a = sampler.sample(64, generator=torch.Generator().manual_seed(5))
        assert torch.equal(a, d.sample_timesteps(64, generator=torch.Generator().manual_seed(5)))
        assert torch.equal(a, sampler.sample(64, generator=torch.Generator().manual_seed(5)))  # no state moved
    probs = np.zeros(50)
    probs[[3, 7, 40]] = [0.2, 0.3, 0.5]
    hist = TimestepSampler.for_stage(d, 0.0, 1.0, probs)
    d.set_timestep_probs(probs)
    assert hist.time_range == (3, 40)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(hist.sample(1000, generator=g1), d.sample_timesteps(1000, generator=g2))
    assert set(hist.sample(1000).tolist()) == {3, 7, 40}
    with pytest.raises(UserError, match="50 non-negative numbers summing to 1"):
        TimestepSampler.for_stage(d, 0.0, 1.0, np.ones(50))


def test_the_trainer_takes_its_timesteps_from_the_entered_stage(tmp_path):
    trainer = CurriculumTrainer(tiny_cfg("eval.num_samples=0", "train.num_samples=0"), tmp_path, CPU,
                                progress=False)
    high, full = trainer.plan
    assert trainer.timesteps.time_range == trainer.timesteps_for(high).time_range == (80, 99)
    trainer._enter_stage(full)
    assert trainer.timesteps.time_range == (0, 99) and trainer.timesteps is trainer.timesteps_for(full)
