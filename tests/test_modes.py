"""The mode registry (ddpm_curriculum/modes): the explicit ``mode`` key and its switches, derivation for the seeds'
configs, the parts each mode declares, and adding a mode as one registry entry (the example of
docs/architecture.md)."""

import json

import pytest
from ddpm_curriculum.bench.modes import MODES as BENCH_MODES
from ddpm_curriculum.config import config_from_dict, load_config
from ddpm_curriculum.errors import UserError
from ddpm_curriculum.hooks import TrainingExtension
from ddpm_curriculum.modes import MODES, Mode, mode_of
from ddpm_curriculum.training import builders
from ddpm_curriculum.training.checkpoint import load_checkpoint
from ddpm_curriculum.training.extensions import build_extensions
from .helpers import ROOT, TINY, run, tiny_cfg

STAGES = TINY["curriculum"]["stages"]


def raw(**sections):
    out = json.loads(json.dumps({k: v for k, v in TINY.items() if k != "curriculum"}))
    out.update(sections)
    return out


@pytest.mark.parametrize("name, switches", [
    ("baseline", {"curriculum": False, "sparsity": False, "regularization": False, "maskpro": False}),
    ("C", {"curriculum": True, "sparsity": False, "regularization": False, "maskpro": False}),
    ("CS", {"curriculum": True, "sparsity": True, "regularization": False, "maskpro": False}),
    ("CR", {"curriculum": True, "sparsity": False, "regularization": True, "maskpro": False}),
    ("prune", {"sparsity": False, "regularization": False, "maskpro": True}),
])
def test_an_explicit_mode_sets_its_switches_and_derivation_gives_it_back(name, switches):
    cfg = config_from_dict(raw(mode=name, curriculum={"stages": STAGES}))
    assert cfg.mode == name
    assert {s: getattr(cfg, s).enabled for s in switches} == switches
    derived = cfg.to_dict()
    derived["mode"] = None  # the same config from its switches alone, as the seeds' configs are read
    assert config_from_dict(derived).mode == name
    assert config_from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()  # config.json reloads to itself


def test_mode_errors_are_one_line_and_name_the_fix():
    cases = [
        (raw(mode="CS", sparsity={"enabled": False}, curriculum={"stages": STAGES}),
         "'mode' = 'CS' needs 'sparsity.enabled' = true"),
        (raw(mode="C", regularization={"enabled": True}, curriculum={"stages": STAGES}),
         "'mode' = 'C' needs 'regularization.enabled' = false"),
        (raw(mode="CSR", curriculum={"stages": STAGES}), "choose one of ['baseline', 'C', 'CS', 'CR', 'prune']"),
        (raw(mode=3), "config key 'mode' must be str"),
        (raw(sparsity={"enabled": True}, maskpro={"enabled": True}, curriculum={"enabled": True, "stages": STAGES}),
         "pick one mode (CS or prune)"),
        (raw(regularization={"enabled": True}), "mode CR follows the curriculum stages"),
    ]
    for config, fragment in cases:
        with pytest.raises(UserError) as err:
            config_from_dict(config)
        assert fragment in str(err.value) and "\n" not in str(err.value), str(err.value)
    with pytest.raises(UserError, match="'mode' = 'C' needs 'sparsity.enabled' = false, but the config sets it to tr"):
        config_from_dict(raw(mode="C", curriculum={"stages": STAGES}), ["sparsity.enabled=true"])


def test_set_mode_on_the_command_line():
    cfg = tiny_cfg("mode=CR")
    assert cfg.mode == "CR" and cfg.regularization.enabled and cfg.curriculum.enabled
    assert tiny_cfg().mode == "C"  # TINY gives no mode: derived from curriculum.enabled


def test_every_mode_builds_what_it_declares():
    """The network and the extensions come from the mode's entry (CS: gated network + channel sparsity)."""
    for name, want_ext, gated in [("C", [], False), ("CS", ["ChannelSparsity"], True), ("CR", ["GroupL1"], False)]:
        cfg = tiny_cfg(f"mode={name}")
        model = builders.make_model(cfg)
        assert hasattr(model, "channel_mask") == gated, name
        assert [type(e).__name__ for e in build_extensions(cfg, model)] == want_ext, name
    finetune = tiny_cfg("mode=prune", "maskpro.phase=finetune")
    assert mode_of(finetune).update(finetune) is None  # GradientUpdate
    assert mode_of(tiny_cfg("mode=prune")).update(tiny_cfg("mode=prune")).__name__ == "PolicyGradientUpdate"


def test_the_mode_bench_switches_come_from_the_registry():
    """bench/modes.py turns a mode-C config into each trainer-step mode with the registry's switches."""
    base = ROOT / "configs/twoscale_c.json"
    for name, switches in BENCH_MODES.items():
        assert load_config(base, switches).mode == name
    assert set(BENCH_MODES) == set(MODES) - {"prune"}


class HalfL2(TrainingExtension):
    """A toy mode's extension: ½·λ·‖θ‖² added to the loss."""

    name = "half_l2"

    def loss_terms(self, ctx):
        return {"half_l2": 0.5e-3 * sum(p.pow(2).sum() for p in ctx.model.parameters())}


def test_adding_a_mode_is_one_registry_entry(monkeypatch, tmp_path):
    """The docs/architecture.md example: a mode without options is a ``Mode`` in the registry and nothing else;
    config, CLI switches, extensions and the recorded config follow."""
    monkeypatch.setitem(MODES, "L2", Mode("L2", "any t schedule + ½·λ·‖θ‖²",
                                          extensions=lambda cfg, model: [HalfL2()]))
    cfg = tiny_cfg("mode=L2", "train.steps=6", "train.num_samples=0", "eval.num_samples=0", "train.log_intv=1")
    assert cfg.mode == "L2" and cfg.curriculum.enabled  # TINY's stages; curriculum=None lets the mode take either
    trainer = run(cfg, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    terms = [r["half_l2"] for r in records if "half_l2" in r]
    assert len(terms) == 6 and all(t > 0 for t in terms)
    want = 0.5e-3 * sum(float(p.detach().double().pow(2).sum()) for p in trainer.model.parameters())
    assert terms[-1] == pytest.approx(want, rel=0.05)  # logged before the last step moved the weights a little
    assert load_checkpoint(tmp_path)["config"]["mode"] == "L2"  # the value in force is the one recorded
    assert config_from_dict(cfg.to_dict()).mode == "L2"
    assert config_from_dict(cfg.to_dict(), ["mode=null"]).mode == "C"  # without its key: the seeds' rule
