"""The trainer's extension hooks and FrozenEntries (the mechanism behind reserved channels and pruned weights)."""

import dataclasses
import json

import pytest
import torch

from ddpm_curriculum.training import CurriculumTrainer
from ddpm_curriculum.training import trainer as trainer_module
from ddpm_curriculum.training.checkpoint import load_checkpoint
from ddpm_curriculum.hooks import HookContext
from ddpm_curriculum.training.extensions import FrozenEntries, TrainingExtension
from .helpers import CPU, tiny_cfg


@pytest.mark.parametrize("opt_cls, kw", [(torch.optim.Adam, {"weight_decay": 0.1}),
                                         (torch.optim.AdamW, {"weight_decay": 0.1}),
                                         (torch.optim.SGD, {"momentum": 0.9, "weight_decay": 0.1})])
def test_frozen_entries_stay_bit_identical_with_zero_moments(opt_cls, kw):
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 4)
    frozen = torch.zeros(4, 6, dtype=torch.bool)
    frozen[1] = True  # a whole output row
    frozen[:, 5] = True  # and a whole input column
    before = layer.weight.detach().clone()
    opt = opt_cls(layer.parameters(), lr=0.1, **kw)
    fe = FrozenEntries()
    fe.freeze(layer.weight, frozen)
    for _ in range(5):
        layer(torch.randn(8, 6)).square().sum().backward()
        fe.zero_grads()
        assert torch.all(layer.weight.grad[frozen] == 0)
        opt.step()
        opt.zero_grad()
        fe.restore(opt)
    assert torch.equal(layer.weight[frozen], before[frozen])
    assert not torch.equal(layer.weight[~frozen], before[~frozen])
    for key in FrozenEntries.MOMENT_KEYS:
        if key in opt.state[layer.weight]:
            assert torch.all(opt.state[layer.weight][key][frozen] == 0), key
    # releasing part of it lets those entries train again
    fe.release(layer.weight, frozen & (torch.arange(6) == 5))
    layer(torch.randn(8, 6)).square().sum().backward()
    fe.zero_grads()
    opt.step()
    fe.restore(opt)
    assert torch.equal(layer.weight[1, :5], before[1, :5])
    assert not torch.equal(layer.weight[:, 5], before[:, 5])


class Recorder(TrainingExtension):
    """Records hook calls, adds λ·Σ(out_conv weight²) to the loss, keeps a counter as state and records a field in
    each stage's transitions.jsonl line and one line per stage end in recorder.jsonl."""

    name = "recorder"

    def __init__(self, lam=0.0):
        self.events, self.lam, self.steps = [], lam, 0

    def on_stage_start(self, ctx, stage):
        assert isinstance(ctx, HookContext)
        self.events.append(("stage", ctx.step, stage.name))
        return {"recorder_steps": self.steps}

    def loss_terms(self, ctx):
        return {"l2": self.lam * ctx.model.out_conv[2].weight.square().sum()}

    def after_backward(self, ctx):
        assert ctx.model.out_conv[2].weight.grad is not None

    def after_step(self, ctx):
        self.steps += 1

    def on_stage_end(self, ctx, stage):
        return {"recorder.jsonl": {"step": ctx.step, "stage": stage.name}}

    def log_fields(self, ctx):
        return {"recorder_steps": self.steps}

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]


@pytest.fixture
def recorder(monkeypatch):
    """Every trainer built in the test gets a fresh Recorder(λ = recorder.lam); the list collects them."""
    made = []

    class Made(list):
        lam = 0.0

    made = Made()

    def build(cfg, model):
        made.append(Recorder(made.lam))
        return [made[-1]]

    monkeypatch.setattr(trainer_module, "build_extensions", build)
    return made


@pytest.mark.slow
def test_hooks_run_at_stage_starts_and_state_survives_resume(tmp_path, recorder):
    cfg = tiny_cfg("eval.num_samples=0")
    CurriculumTrainer(cfg, tmp_path / "a", CPU, progress=False).train()
    full = recorder[-1]
    assert [e for e in full.events if e[0] == "stage"] == [("stage", 0, "high"), ("stage", 5, "full")]
    assert full.steps == 14
    lines = lambda run, name: [json.loads(x) for x in (tmp_path / run / name).read_text().splitlines()]
    # on_stage_start's fields join the stage's transitions line; on_stage_end's records go to their file
    assert [(r["step"], r["stage"], r["recorder_steps"]) for r in lines("a", "transitions.jsonl")] == \
        [(0, "high", 0), (5, "full", 5)]
    assert lines("a", "recorder.jsonl") == [{"step": 5, "stage": "high"}, {"step": 14, "stage": "full"}]
    # stop exactly at the stage boundary: the next stage's hook must still run after the resume
    CurriculumTrainer(cfg, tmp_path / "b", CPU, progress=False, stop_at_step=5).train()
    resumed = CurriculumTrainer(cfg, tmp_path / "b", CPU, progress=False,
                                resume_state=load_checkpoint(tmp_path / "b"))
    resumed.train()
    assert recorder[-1].events == [("stage", 5, "full")] and recorder[-1].steps == 14
    assert load_checkpoint(tmp_path / "b")["extensions"]["recorder"] == {"steps": 14}
    assert lines("b", "transitions.jsonl") == lines("a", "transitions.jsonl")
    assert lines("b", "recorder.jsonl") == lines("a", "recorder.jsonl")


def test_hooks_get_a_frozen_context_with_the_raw_model_and_the_services(tmp_path):
    cfg = tiny_cfg("eval.num_samples=0", "train.num_samples=0")
    trainer = CurriculumTrainer(cfg, tmp_path, CPU, progress=False)
    ctx = trainer.hook_context()
    assert ctx.model is trainer.model and ctx.ema_model is trainer.ema.model and ctx.optimizer is trainer.optimizer
    assert (ctx.step, ctx.world, ctx.grad_scale, ctx.run_dir, ctx.cfg) == (0, 1, 1.0, trainer.run_dir, cfg)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.step = 3
    assert ctx.probe_loss() == ctx.probe_loss() > 0  # a fixed batch, fixed t and ε
    state = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in trainer.model.state_dict().items()}
    ctx.load_weights(state)
    assert all(float(p.detach().abs().sum()) == 0 for p in trainer.model.parameters())
    assert all(float(p.abs().sum()) == 0 for p in trainer.ema.model.parameters()) and trainer.ema.num_updates == 0


@pytest.mark.slow
def test_loss_terms_change_training_and_are_recorded(tmp_path, recorder):
    cfg = tiny_cfg("eval.num_samples=0", "train.steps=6")
    plain = CurriculumTrainer(cfg, tmp_path / "a", CPU, progress=False)
    plain.train()
    recorder.lam = 10.0
    penalised = CurriculumTrainer(cfg, tmp_path / "b", CPU, progress=False)
    penalised.train()
    assert set(penalised.loss_terms) == {"l2"} and float(penalised.loss_terms["l2"]) > 0
    w = lambda t: t.model.out_conv[2].weight
    assert w(penalised).norm() < w(plain).norm()


@pytest.mark.slow
def test_resuming_without_the_extension_state_is_a_clear_error(tmp_path, monkeypatch):
    cfg = tiny_cfg("eval.num_samples=0", "train.steps=6")
    CurriculumTrainer(cfg, tmp_path, CPU, progress=False).train()
    monkeypatch.setattr(trainer_module, "build_extensions", lambda cfg, model: [Recorder()])
    from ddpm_curriculum.errors import UserError

    with pytest.raises(UserError, match="no state for 'recorder'"):
        CurriculumTrainer(cfg, tmp_path, CPU, resume_state=load_checkpoint(tmp_path))
