"""Channel attribution (issue 10 §4): gradient × activation against finite differences, ablations that
restore the gates, the random-group null, and scripts/attribute_channels.py on a CS and a baseline run."""

import json

import pytest
import torch

from ddpm_curriculum.data.twoscale import TwoScaleDataset
from ddpm_curriculum.diffusion import GaussianDiffusion, make_betas
from ddpm_curriculum.experiments.attribution import Probe, ablation, gradient_activation, random_groups
from ddpm_curriculum.models import DecoderSparseUNet, SparseUNet
from ddpm_curriculum.training import CurriculumTrainer

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
    assert cs["location"] == "bottleneck" and cs["groups"] == {"0": 16, "1": 16, "2": 32}
    assert set(cs["ablation"]["50"]) == {"open", "0", "1", "2"} and cs["generation"]["channels"] == 48
    assert "| 50 | 1 (16) |" in res.stdout
    null = script("scripts/attribute_channels.py", str(runs / "c"), "--like", str(runs / "cs"), "--n", "8",
                  "--num-samples", "0", "--ts", "50", "--null-repeats", "2", "--json", str(tmp_path / "n.json"))
    assert null.returncode == 0, null.stderr
    result = json.loads((tmp_path / "n.json").read_text())
    assert result["groups"] == {"0": 16, "1": 16, "2": 32} and result["null_repeats"] == 2
    bad = script("scripts/attribute_channels.py", str(runs / "c"))
    assert bad.returncode == 2 and "pass --like CS_RUN" in bad.stderr and "Traceback" not in bad.stderr
