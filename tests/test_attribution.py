"""Channel attribution (issue 10 §4): gradient × activation against finite differences, ablations that
restore the gates, the random-group null, and scripts/attribute_channels.py on a CS and a baseline run."""

import json

import pytest
import torch

from ddpm_curriculum.data.twoscale import TwoScaleDataset
from ddpm_curriculum.diffusion import GaussianDiffusion, make_betas
from ddpm_curriculum.errors import UserError
from ddpm_curriculum.experiments import load_grid
from ddpm_curriculum.experiments.attribution import (Probe, ablation, attribute, attribute_grid, attribution_lines,
                                                     birth_group_sizes, birth_groups, gradient_activation,
                                                     random_groups)
from ddpm_curriculum.models import GATED_MODEL_NAMES, DecoderSparseUNet, SparseUNet
from ddpm_curriculum.sparsity.channel_mask import ChannelSparsity
from ddpm_curriculum.training.builders import make_model
from ddpm_curriculum.training import CurriculumTrainer
from ddpm_curriculum.training.checkpoint import latest_checkpoint, load_network

from .helpers import CPU, KW, cs_cfg, randomize, run_script as script


def small_probe(ts=(40, 10)):
    dataset = TwoScaleDataset(image_size=8, k1=2, k2=2, num_samples=32)
    diffusion = GaussianDiffusion(make_betas("linear", 100, 1e-4, 0.02))
    return Probe(dataset, diffusion, ts, n=6, seed=3)


@pytest.mark.slow
@pytest.mark.parametrize("cls", [SparseUNet, DecoderSparseUNet])
def test_gradient_activation_matches_central_differences(cls):
    torch.manual_seed(0)
    model = randomize(cls(**KW), 0).double().eval()
    probe = small_probe(ts=(40,))
    probe.x_t = {t: x.double() for t, x in probe.x_t.items()}
    probe.templates = {k: (p.double(), a) for k, (p, a) in probe.templates.items()}
    groups = random_groups(model, [5, 7], seed=1)
    got = gradient_activation(model, probe, groups)[40]
    eps = 1e-5
    for g, channels in groups.items():
        want = {"minor": 0.0, "major": 0.0}
        for c in channels.nonzero().flatten().tolist():
            r = []
            for sign in (1, -1):
                model.channel_mask[c] = 1 + sign * eps
                with torch.no_grad():
                    r.append(probe.recovery(probe.x0_hat(model, 40)))
                model.channel_mask[c] = 1.0
            for k in want:
                want[k] += abs((r[0][k] - r[1][k]).item() / (2 * eps))
        assert got[g]["minor"] == pytest.approx(want["minor"], rel=1e-5)
        assert got[g]["major"] == pytest.approx(want["major"], rel=1e-5)
    assert torch.equal(model.channel_mask, torch.ones_like(model.channel_mask))  # gates restored


@pytest.mark.slow
def test_ablation_drops_are_direct_maskings_and_restore_the_gates():
    torch.manual_seed(0)
    model = randomize(DecoderSparseUNet(**KW), 0).eval()
    probe = small_probe()
    groups = {0: torch.zeros(model.gated_channels, dtype=torch.bool), **{1 + g: c for g, c in
                                                                          random_groups(model, [40], 2).items()}}
    before = model.channel_mask.clone()
    out = ablation(model, probe, groups)
    assert torch.equal(model.channel_mask, before)
    for t in probe.ts:
        assert out[t][0]["minor_drop"] == 0 and out[t][0]["major_drop"] == 0  # closing nothing changes nothing
        model.channel_mask[groups[1]] = 0
        with torch.no_grad():
            r = probe.recovery(probe.x0_hat(model, t))
        model.channel_mask.copy_(before)
        assert out[t][1]["minor_drop"] == pytest.approx(out[t]["open"]["minor"] - r["minor"].item())
        assert out[t][1]["major_drop"] == pytest.approx(out[t]["open"]["major"] - r["major"].item())


def test_random_groups_are_disjoint_with_the_requested_sizes():
    model = SparseUNet(**KW)
    groups = random_groups(model, [10, 20, 30], seed=0)
    assert [int(c.sum()) for c in groups.values()] == [10, 20, 30]
    assert int(torch.stack(list(groups.values())).sum(0).max()) == 1
    assert not torch.equal(groups[0], random_groups(model, [10, 20, 30], seed=1)[0])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("attr")
    CurriculumTrainer(cs_cfg(), root / "cs", CPU, progress=False).train()
    CurriculumTrainer(cs_cfg("sparsity.enabled=false"), root / "c", CPU, progress=False).train()
    return root


@pytest.mark.slow
def test_script_attributes_a_cs_run_and_a_null_from_a_baseline(runs, tmp_path):
    res = script("scripts/attribute_channels.py", str(runs / "cs"), "--n", "8", "--num-samples", "8",
                 "--sample-steps", "2", "--ts", "50", "10")
    assert res.returncode == 0, res.stderr
    cs = json.loads((runs / "cs" / "attribution.json").read_text())
    assert cs["location"] == "bottleneck" and cs["groups"] == {"0": 16, "1": 16, "2": 32, "late": 48}
    assert set(cs["ablation"]["50"]) == {"open", "0", "1", "2", "late"} and cs["generation"]["channels"] == 48
    assert "| 50 | 1 (16) |" in res.stdout
    null = script("scripts/attribute_channels.py", str(runs / "c"), "--like", str(runs / "cs"), "--n", "8",
                  "--num-samples", "0", "--ts", "50", "--null-repeats", "2", "--json", str(tmp_path / "n.json"))
    assert null.returncode == 0, null.stderr
    result = json.loads((tmp_path / "n.json").read_text())
    assert result["groups"] == {"0": 16, "1": 16, "2": 32, "late": 48} and result["null_repeats"] == 2
    bad = script("scripts/attribute_channels.py", str(runs / "c"))
    assert bad.returncode == 2 and "pass --like CS_RUN" in bad.stderr and "Traceback" not in bad.stderr


def test_grid_attribution_runs_each_final_network_once_and_reports_it(runs, tmp_path):
    """run_experiments.py --attribute: a CS arm with its own birth groups and a null [baseline, CS]; the records
    equal a direct attribute() call, a second pass adds nothing, and the report section shows both."""
    out = tmp_path / "grid"
    for arm, src in (("CS", "cs"), ("baseline", "c")):
        (out / arm).mkdir(parents=True)
        (out / arm / "seed0").symlink_to(runs / src)
    step = int(latest_checkpoint(runs / "cs").stem.split("_")[1])
    records = [{"arm": a, "seed": 0, "step": step, "final": True} for a in ("baseline", "CS")]
    settings = {"nulls": [["baseline", "CS"]], "ts": [50, 10], "n": 8, "num_samples": 8, "sample_steps": 2,
                "null_repeats": 2}
    for name, cfg in (("cs", cs_cfg()), ("c", cs_cfg("sparsity.enabled=false"))):
        (tmp_path / f"{name}.json").write_text(json.dumps(cfg.to_dict()))
    arms = [{"name": "baseline", "config": str(tmp_path / "c.json")},
            {"name": "CS", "config": str(tmp_path / "cs.json")}]
    (tmp_path / "g.json").write_text(json.dumps({"arms": arms, "attribution": settings}))
    grid = load_grid(tmp_path / "g.json")
    got = attribute_grid(grid, out, records, log=lambda *_: None)
    assert [(r["arm"], r["like"]) for r in got] == [("CS", None), ("baseline", "CS")]
    kwargs = {k: v for k, v in settings.items() if k != "nulls"}
    direct = attribute(load_network(runs / "cs"), **kwargs)
    assert got[0]["result"] == json.loads(json.dumps(direct))
    assert got[1]["result"]["groups"] == {"0": 16, "1": 16, "2": 32, "late": 48}
    assert attribute_grid(grid, out, records, log=lambda *_: pytest.fail("attributed twice")) == got
    text = "\n".join(attribution_lines(got))
    late = got[0]["result"]["ablation"]["50"]["late"]["minor_drop"]
    assert "| 50 | CS | 1 | " in text and f"| {late:.4g} |" in text
    assert "baseline (null: random groups of CS's sizes)" in text
    (tmp_path / "bad.json").write_text(json.dumps({"arms": [{"name": "CS"}], "attribution": {"nulls": [["CS", "x"]]}}))
    with pytest.raises(UserError, match="attribution null"):
        load_grid(tmp_path / "bad.json")
    swapped = {**settings, "nulls": [["CS", "baseline"]]}
    (tmp_path / "g2.json").write_text(json.dumps({"arms": arms, "attribution": swapped}))
    with pytest.raises(UserError, match="baseline is not a mode-CS arm"):
        attribute_grid(load_grid(tmp_path / "g2.json"), out, records, log=lambda *_: None)


@pytest.mark.parametrize("location", ["bottleneck", "decoder"])
def test_birth_group_sizes_from_the_config_equal_a_cs_runs_groups(location, runs):
    """The null's group sizes come from the config alone; they equal what a CS run's gates record."""
    if location == "bottleneck":
        net = load_network(runs / "cs")
        actual = {g: int(c.sum()) for g, c in birth_groups(net.model).items()}
        assert birth_group_sizes(cs_cfg()) == actual == {0: 16, 1: 16, 2: 32}
    else:
        cfg = cs_cfg("sparsity.location=decoder")
        model = make_model(cfg, GATED_MODEL_NAMES["decoder"])
        ext = ChannelSparsity(cfg, model)
        ext._initial_mask()
        sizes = birth_group_sizes(cfg)
        assert sizes[0] == int(model.channel_mask.sum())
        assert sum(sizes.values()) == model.gated_channels
