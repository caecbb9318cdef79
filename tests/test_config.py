"""Config loading, overrides, validation errors and the generated reference docs."""

import json
from pathlib import Path

import pytest

from ddpm_curriculum.config import Config, config_from_dict, config_markdown, load_config
from ddpm_curriculum.errors import UserError
from ddpm_curriculum.training.plan import build_plan, stage_at

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.json"))


def minimal(**sections):
    raw = {"train": {"epochs": 10}}
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    return raw


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.mode in {"baseline", "C", "CS", "CR", "prune"}


def test_seed_celeba32_cs_example_loads_unchanged():
    cfg = load_config(ROOT / "tests" / "fixtures" / "seed001_celeba32_cs.json")
    assert cfg.mode == "CS"
    assert cfg.dataset.name == "celeba32"
    assert cfg.model.ch_multipliers == [1, 2, 2]
    assert [s.epochs for s in cfg.curriculum.stages] == [1, 1, 1, 2, 5]
    assert cfg.curriculum.stages[0].name == "stage1_high_noise"
    assert cfg.sparsity.initial_sparsity == 0.8 and cfg.regularization.lambda_max == 3e-5
    assert cfg.diffusion.model_var_type == "fixed-small"


def test_defaults_and_types():
    cfg = config_from_dict(minimal())
    assert cfg.mode == "baseline"
    assert cfg.dataset.name == "twoscale" and cfg.dataset.k1 == 4 and cfg.dataset.alpha2 == 0.15
    cfg = config_from_dict(minimal(train={"lr": 1}))  # ints are accepted for floats
    assert isinstance(cfg.train.lr, float)


@pytest.mark.parametrize("raw, fragment", [
    (minimal(train={"lrr": 1e-4}), "did you mean 'lr'"),
    (minimal(model={"hid_channel": 64}), "did you mean 'hid_channels'"),
    ({"train": {"epochs": 10}, "trian": {}}, "did you mean 'train'"),
    (minimal(train={"lr": "fast"}), "'train.lr' must be float"),
    (minimal(train={"batch_size": 12.5}), "'train.batch_size' must be int"),
    (minimal(curriculum={"enabled": "yes"}), "'curriculum.enabled' must be bool"),
    (minimal(train={"lr": -1.0}), "'train.lr' = -1.0 must be > 0"),
    (minimal(diffusion={"beta_schedule": "sigmoid"}), "['linear', 'cosine', 'quad']"),
    (minimal(model={"apply_attn": [True]}), "'model.apply_attn' has 1 entries"),
    ({"train": {}}, "exactly one of 'train.epochs' and 'train.steps'"),
    ({"train": {"epochs": 1, "steps": 5}}, "exactly one of 'train.epochs' and 'train.steps'"),
    (minimal(train={"batch_size": 10, "accum_steps": 3}), "not divisible by 'train.accum_steps'"),
    (minimal(curriculum={"enabled": True}), "'curriculum.stages' is empty"),
    (minimal(curriculum={"enabled": True, "stages": [{"t_min": 0.5, "t_max": 0.5, "epochs": 1}]}),
     "t_min = 0.5 must be smaller than t_max = 0.5"),
    (minimal(curriculum={"enabled": True, "stages": [{"t_min": 0.0, "t_max": 1.2, "epochs": 1}]}),
     "'curriculum.stages[0].t_max' = 1.2 must be <= 1.0"),
    (minimal(curriculum={"enabled": True, "stages": [{"t_min": 0.0, "t_max": 1.0, "epochs": 0}]}),
     "'curriculum.stages[0].epochs' = 0 must be >= 1"),
    (minimal(curriculum={"enabled": True, "stages": [{"t_min": 0.0, "t_max": 1.0}]}),
     "give exactly one of 'epochs' and 'steps'"),
    (minimal(curriculum={"enabled": True, "stages": [{"t_min": 0.5, "t_max": 1.0, "epochs": 6},
                                                     {"t_min": 0.0, "t_max": 1.0, "epochs": 6}]}),
     "the stages last 12 epochs but 'train.epochs' = 10"),
    (minimal(curriculum={"enabled": True, "stages": [{"t_max": 1.0, "epochs": 1}]},
             sparsity={"enabled": True}, regularization={"enabled": True}), "pick one mode"),
    (minimal(sparsity={"enabled": True}), "set 'curriculum.enabled' to true"),
    ([1, 2], "JSON object at the top level"),
    ({"train": {"epochs": 1}, "model": "unet"}, "config section 'model' must be a JSON object"),
])
def test_bad_configs_are_rejected_with_the_key_path(raw, fragment):
    with pytest.raises(UserError) as err:
        config_from_dict(raw)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_overrides_are_typed_and_validated():
    raw = minimal(curriculum={"enabled": True, "stages": [{"t_min": 0.8, "t_max": 1.0, "epochs": 1},
                                                          {"t_min": 0.0, "t_max": 1.0, "epochs": 1}]})
    cfg = config_from_dict(raw, ["train.lr=1e-3", "train.epochs=20", "curriculum.enabled=false",
                                 "model.ch_multipliers=[1,2]", "model.apply_attn=[false,true]",
                                 "curriculum.stages.0.epochs=3", "dataset.root=/data/x y",
                                 "train.grad_norm=null"])
    assert cfg.train.lr == 1e-3 and cfg.train.epochs == 20 and not cfg.curriculum.enabled
    assert cfg.model.ch_multipliers == [1, 2] and cfg.model.apply_attn == [False, True]
    assert cfg.curriculum.stages[0].epochs == 3
    assert cfg.dataset.root == "/data/x y" and cfg.train.grad_norm is None
    assert cfg.mode == "baseline"
    # overriding a key of the seed's string-form dataset section
    seed = json.loads((ROOT / "tests/fixtures/seed001_celeba32_cs.json").read_text())
    assert config_from_dict(seed, ["dataset.root=/celeba"]).dataset.root == "/celeba"
    for bad, fragment in [("train.lr", "section.key=value"), ("lr=1", "section.key=value"),
                          ("trian.lr=1", "did you mean 'train'"), ("train.lr=abc", "must be float"),
                          ("curriculum.stages.5.epochs=1", "out of range"),
                          ("train.bogus=1", "unknown config key 'train.bogus'")]:
        with pytest.raises(UserError, match=None) as err:
            config_from_dict(raw, [bad])
        assert fragment in str(err.value), (bad, str(err.value))


def test_comment_keys_are_ignored_everywhere():
    cfg = config_from_dict({"_comment": "x", "train": {"epochs": 3, "_why": "y"}})
    assert cfg.train.epochs == 3


def test_mode_derivation():
    stages = [{"t_min": 0.5, "t_max": 1.0, "epochs": 1}, {"t_min": 0.0, "t_max": 1.0, "epochs": 1}]
    assert config_from_dict(minimal(curriculum={"enabled": True, "stages": stages})).mode == "C"
    assert config_from_dict(minimal(curriculum={"enabled": True, "stages": stages},
                                    sparsity={"enabled": True})).mode == "CS"
    assert config_from_dict(minimal(curriculum={"enabled": True, "stages": stages},
                                    regularization={"enabled": True})).mode == "CR"


def test_stage_plan_boundaries_and_last_stage_runs_to_the_end():
    seed = load_config(ROOT / "tests/fixtures/seed001_celeba32_cs.json")
    plan = build_plan(seed, steps_per_epoch=7)
    assert [(s.start_step, s.end_step) for s in plan] == [(0, 7), (7, 14), (14, 21), (21, 35), (35, 700)]
    assert [stage_at(plan, s).index for s in (0, 6, 7, 20, 21, 34, 35, 699, 700)] == [0, 0, 1, 2, 3, 3, 4, 4, 4]
    base = config_from_dict({"train": {"steps": 50}})
    assert [(s.t_min, s.t_max, s.start_step, s.end_step) for s in build_plan(base, 3)] == [(0.0, 1.0, 0, 50)]
    mixed = config_from_dict({"train": {"steps": 10}, "curriculum": {"enabled": True, "stages": [
        {"t_min": 0.5, "t_max": 1.0, "epochs": 4}, {"t_min": 0.0, "t_max": 1.0, "steps": 1}]}})
    with pytest.raises(UserError, match="need 12 steps but training has 10"):
        build_plan(mixed, steps_per_epoch=3)


def test_config_docs_are_up_to_date():
    doc = (ROOT / "docs" / "config.md").read_text()
    assert doc.strip() == config_markdown().strip(), \
        "regenerate with: python -m ddpm_curriculum.config --markdown > docs/config.md"


def test_config_choices_are_the_registries():
    """Every choices list of config.py that names registered things equals its registry (or is read from it),
    so adding a schedule, sampler, pacing, regrowth rule … cannot leave the config behind."""
    import dataclasses

    from ddpm_curriculum import config as C
    from ddpm_curriculum.data import dataset_names
    from ddpm_curriculum.diffusion import BETA_SCHEDULES, LOSS_WEIGHTINGS, LOSSES, PREDICTION_TYPES, VAR_TYPES
    from ddpm_curriculum.diffusion.curriculum import SPACES
    from ddpm_curriculum.evaluation.extra import EXTRA_METRICS
    from ddpm_curriculum.models import GATED_MODEL_NAMES, MODELS
    from ddpm_curriculum.modes import MODES
    from ddpm_curriculum.pruning.nm import NM_ORDERS
    from ddpm_curriculum.sampling import SAMPLERS
    from ddpm_curriculum.diffusion import DDIM_SKIP_TYPES
    from ddpm_curriculum.sections import field_choices
    from ddpm_curriculum.sparsity.channel_mask import REGROWTH
    from ddpm_curriculum.training.plan import PACINGS

    def choices(cls, key):
        return field_choices({f.name: f for f in dataclasses.fields(cls)}[key].metadata)

    pairs = [((C.DiffusionConfig, "beta_schedule"), BETA_SCHEDULES),
             ((C.DiffusionConfig, "model_mean_type"), PREDICTION_TYPES),
             ((C.DiffusionConfig, "model_var_type"), VAR_TYPES), ((C.DiffusionConfig, "loss_type"), LOSSES),
             ((C.TrainConfig, "loss_weighting"), ["none", *LOSS_WEIGHTINGS]),
             ((C.CurriculumConfig, "space"), SPACES), ((C.CurriculumConfig, "pacing"), PACINGS),
             ((C.SparsityConfig, "regrowth_method"), REGROWTH), ((C.SparsityConfig, "location"), GATED_MODEL_NAMES),
             ((C.MaskProConfig, "order"), NM_ORDERS), ((C.DatasetConfig, "name"), dataset_names()),
             ((C.Config, "mode"), MODES), ((C.SamplerConfig, "name"), SAMPLERS),
             ((C.SamplerConfig, "skip_type"), DDIM_SKIP_TYPES)]
    for (cls, key), registry in pairs:
        assert set(choices(cls, key)) == set(registry), (cls.__name__, key)
    assert set(choices(C.ModelConfig, "name")) == set(MODELS) - set(GATED_MODEL_NAMES.values()) | {"sparse_unet"}
    assert set(C.EXTRA_EVAL_METRICS) == set(EXTRA_METRICS)
