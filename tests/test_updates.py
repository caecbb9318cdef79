"""Update rules (training/updates.py): a mode chooses how a step changes the run; the trainer's loop, status
all-reduce, checkpoints and resume are shared. Mode prune's rule is tested in test_prune_mode.py."""

import copy

import torch

from ddpm_curriculum import dist
from ddpm_curriculum.modes import MODES, Mode
from ddpm_curriculum.training import CurriculumTrainer
from ddpm_curriculum.training.checkpoint import load_checkpoint
from ddpm_curriculum.training.updates import StepResult, UpdateRule

from .helpers import CPU, run, tiny_cfg

QUIET = ("train.num_samples=0", "eval.num_samples=0", "model.drop_rate=0.0", "train.log_intv=1")


class SignDescent(UpdateRule):
    """θ ← θ − lr·sign(∇L): a rule with no optimizer state, as a new mode would add one (the docs' example)."""

    name = "sign"
    trains_weights = True

    def __init__(self, cfg, model, diffusion):
        self.cfg, self.model, self.diffusion, self.train_model = cfg, model, diffusion, model
        self.batches = []  # what forward saw, for the test

    @classmethod
    def for_run(cls, cfg, model, diffusion, extensions, device, resume_state):
        return cls(cfg, model, diffusion)

    def attach(self, ddp_model, train_model):
        self.train_model = train_model

    @property
    def lr(self):
        return self.cfg.train.lr

    def forward(self, batch, ctx):
        self.batches.append(batch)
        per_sample = self.diffusion.training_losses(self.train_model, batch.x0, batch.t, batch.noise)
        per_sample.mean().backward()
        return StepResult(per_sample.detach())

    @torch.no_grad()
    def apply(self, result, status, ctx):
        for p in self.model.parameters():
            p -= self.lr * p.grad.sign()
            p.grad = None
        return torch.zeros(())


def _sign_mode(monkeypatch):
    monkeypatch.setitem(MODES, "sign", Mode("sign", "sign descent", update=lambda cfg: SignDescent))


def test_a_new_update_rule_is_one_mode_entry(monkeypatch, tmp_path):
    """One step of the registered rule equals θ0 − lr·sign(∇L) computed by hand on the batch the step drew."""
    _sign_mode(monkeypatch)
    cfg = tiny_cfg("mode=sign", "train.lr=1e-3", *QUIET)
    trainer = CurriculumTrainer(cfg, tmp_path, CPU, progress=False, stop_at_step=1)
    start = copy.deepcopy(trainer.model)
    trainer.train()
    assert trainer.optimizer is None and trainer.ema is None  # the rule has neither
    batch = trainer.update_rule.batches[0]
    trainer.diffusion.training_losses(start, batch.x0, batch.t, batch.noise).mean().backward()
    for (name, p0), p1 in zip(start.named_parameters(), trainer.model.parameters(), strict=True):
        assert torch.equal(p1, p0.detach() - 1e-3 * p0.grad.sign()), name
    assert load_checkpoint(tmp_path)["config"]["mode"] == "sign"


def test_a_rule_without_optimizer_state_resumes_exactly(monkeypatch, tmp_path):
    _sign_mode(monkeypatch)
    cfg = tiny_cfg("mode=sign", *QUIET)
    full = run(cfg, tmp_path / "full")
    CurriculumTrainer(cfg, tmp_path / "part", CPU, progress=False, stop_at_step=3).train()
    state = load_checkpoint(tmp_path / "part", for_resume=True)  # no optimizer, scheduler or scaler entry
    assert "optimizer" not in state
    resumed = CurriculumTrainer(cfg, tmp_path / "part", CPU, progress=False, resume_state=state)
    resumed.train()
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_every_step_has_one_status_all_reduce(monkeypatch, tmp_path):
    """The non-finite check, the stop request and the loss mean share one collective per step (modes C, CS, and a
    registered rule); CS adds its own gate-gradient probe's sum."""
    _sign_mode(monkeypatch)
    calls = []
    real = dist.all_reduce_sum
    monkeypatch.setattr(dist, "all_reduce_sum", lambda x: calls.append(x.numel()) or real(x))
    for mode in ("C", "CS", "sign"):
        trainer = CurriculumTrainer(tiny_cfg(f"mode={mode}", *QUIET), tmp_path / mode, CPU,
                                    progress=False)
        trainer._enter_stage(trainer.plan[0])
        images = torch.stack([trainer.dataset[i][0] for i in range(trainer.cfg.train.batch_size)])
        calls.clear()
        loss, stop = trainer.train_step(images)
        status = [n for n in calls if n == 4]  # [non-finite, stop, loss sum, count]
        assert status == [4] and len(calls) == (2 if mode == "CS" else 1), (mode, calls)  # CS: its gate probe
        assert loss > 0 and stop is False
