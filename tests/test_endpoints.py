"""Pre-registered endpoints (T50, AUC, exposure) and Holm-corrected paired contrasts, against closed forms,
scipy and a brute-force Holm procedure; and a grid with contrasts end to end."""

import json

import numpy as np
import pytest
from scipy import stats

from ddpm_curriculum.experiments import run_grid
from ddpm_curriculum.experiments.endpoints import (drawn_per_t_bin, exposure, first_crossing, holm_adjust,
                                                   mean_over_training, paired_contrasts)

from .helpers import write_grid


def test_first_crossing_interpolates_starts_at_zero_and_censors():
    pts = [(100, 0.1), (200, 0.3), (300, 0.9)]
    assert first_crossing(pts, 0.5, 300).step == pytest.approx(200 + (0.5 - 0.3) / 0.6 * 100)
    early = first_crossing([(100, 0.8), (200, 1.0)], 0.5, 200)  # from (0, 0) to (100, 0.8)
    assert early.step == pytest.approx(62.5) and not early.censored
    never = first_crossing(pts[:2], 0.5, 200)
    assert never.censored and never.step == 200
    assert first_crossing([(0, 0.7), (10, 0.9)], 0.5, 10).step == 0  # already above at step 0


def test_mean_over_training_is_the_trapezoid_area_over_the_budget():
    steps, vals = np.array([64, 128, 512, 1024]), np.array([0.1, 0.4, 0.2, 0.9])
    expected = np.trapezoid(np.r_[0.0, vals], np.r_[0, steps]) / 1024
    assert mean_over_training(list(zip(steps, vals, strict=True)), 1024) == pytest.approx(expected)
    assert mean_over_training([(10, 2.0)], 10, start=2.0) == pytest.approx(2.0)  # a constant curve
    with pytest.raises(ValueError, match="not the budget"):
        mean_over_training([(10, 1.0)], 20)


def _holm_brute_force(p, alpha):
    """Rejected set of Holm's step-down procedure, run literally."""
    order, rejected = sorted(range(len(p)), key=lambda i: p[i]), set()
    for rank, i in enumerate(order):
        if p[i] > alpha / (len(p) - rank):
            break
        rejected.add(i)
    return rejected


def test_holm_adjusted_p_values_match_the_step_down_procedure():
    assert holm_adjust([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    rng = np.random.default_rng(0)
    for _ in range(200):
        p = list(rng.uniform(0, 0.08, rng.integers(1, 6)))
        for alpha in (0.01, 0.05):
            assert {i for i, q in enumerate(holm_adjust(p)) if q <= alpha} == _holm_brute_force(p, alpha)


def test_paired_contrasts_match_scipy_and_use_holm_levels():
    rng = np.random.default_rng(1)
    seeds = range(5)
    arms = {name: {s: float(v) for s, v in zip(seeds, rng.normal(mu, 0.1, 5), strict=True)}
            for name, mu in [("a", 1.0), ("b", 0.7), ("c", 0.98), ("d", 1.0)]}
    pairs = [("a − b", arms["a"], arms["b"]), ("c − d", arms["c"], arms["d"]),
             ("a − d", arms["a"], {s: v for s, v in arms["d"].items() if s < 4})]  # unpaired seed 4 is dropped
    out = paired_contrasts(pairs)
    for c, (_, x, y) in zip(out, pairs, strict=True):
        s = sorted(set(x) & set(y))
        ref = stats.ttest_rel([x[i] for i in s], [y[i] for i in s])
        assert c.n == len(s) and c.p == pytest.approx(ref.pvalue)
        ci = ref.confidence_interval(c.level)
        assert c.mean - c.half == pytest.approx(ci.low) and c.mean + c.half == pytest.approx(ci.high)
    assert [c.p_holm for c in out] == pytest.approx(holm_adjust([c.p for c in out]))
    levels = sorted(c.level for c in out)  # the smallest p is tested at α/3, then α/2, then α
    assert levels == pytest.approx([0.95, 1 - 0.05 / 2, 1 - 0.05 / 3])
    assert out[0].different() and out[0].level == pytest.approx(1 - 0.05 / 3)
    assert paired_contrasts([("x", {0: 1.0}, {0: 0.5})])[0].p_holm is None  # one seed: not tested


def test_exposure_counts_from_metrics_with_resumed_duplicates(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 2, "samples_per_t_bin": [1, 2, 3, 4, 5]}, {"step": 4, "samples_per_t_bin": [0, 1, 0, 9, 0]},
             {"step": 4, "samples_per_t_bin": [2, 0, 0, 8, 0]},  # the resumed run rewrote step 4
             {"step": 6, "samples_per_t_bin": [7, 7, 7, 7, 7]}, {"step": 5, "note": "no counts"}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert drawn_per_t_bin(path, 4) == [3, 2, 3, 12, 5]
    assert exposure(drawn_per_t_bin(path, 4), 0.2) == 3 and exposure([1, 2, 3, 4, 5], 0.4) == 3
    assert exposure([1, 2, 3], 0.2) is None  # bins do not split at 0.2·T
    assert drawn_per_t_bin(tmp_path / "none.jsonl", 4) is None


@pytest.mark.slow
def test_grid_with_contrasts_reports_endpoints_and_exposure(tmp_path):
    grid_path = write_grid(tmp_path, contrasts=[["C", "baseline"]],
                           endpoints={"t50_metric": "major_coverage", "t50_threshold": 0.01,
                                      "auc_metrics": ["val_loss"], "end_metrics": ["val_loss"]})
    records = run_grid(grid_path, tmp_path / "out", log=lambda *_: None)
    by = {(r["arm"], r["seed"], r["step"]): r for r in records}
    for (_arm, _seed, step), rec in by.items():
        assert sum(rec["drawn_per_t_bin"]) == 8 * step  # every drawn sample counted once, stops included
        assert {"tki_50", "tki_mse_50"} <= set(rec) and "tki_300" not in rec  # T = 100: only t = 50 exists
    # C's first two steps draw only t >= 0.8·T, so at step 3 it has seen at most one batch of low t
    for seed in (0, 1):
        c, b = by[("C", seed, 3)]["drawn_per_t_bin"], by[("baseline", seed, 3)]["drawn_per_t_bin"]
        assert sum(c[8:]) >= 16 and exposure(c, 0.2) <= 8 < sum(b[:2]) + 8
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Pre-registered endpoints" in report and "equal steps are not equal exposure" in report
    assert "| C − baseline |" in report and "AUC(val_loss)" in report and "end(val_loss)" in report
    assert "**better**" not in report and "**worse**" not in report  # only contrasts get a verdict


def test_bad_contrast_is_refused(tmp_path):
    from ddpm_curriculum.errors import UserError
    from ddpm_curriculum.experiments import load_grid

    for bad in (["C"], ["C", "nope"], ["C", "C"]):
        with pytest.raises(UserError, match="must name two different arms"):
            load_grid(write_grid(tmp_path, contrasts=[bad]))


def test_t50_cell_says_when_no_seed_crossed():
    from ddpm_curriculum.experiments.report import _t50_cell

    assert _t50_cell({0: 1792.0, 1: 1792.0}, {0: True, 1: True}) == "> 1792"
    assert _t50_cell({0: 700.0, 1: 900.0, 2: 1792.0}, {0: False, 1: False, 2: True}) == \
        "800 ± 1.4e+02 (1 seed(s) > budget)"


def test_the_study_grid_is_pre_registered_with_a_budget_every_main_arm_can_cross():
    from ddpm_curriculum.experiments import expand_runs, load_grid
    from ddpm_curriculum.experiments.runner import steps_per_epoch

    from .helpers import ROOT

    grid = load_grid(ROOT / "configs/experiments/twoscale_study.json")
    assert grid.contrasts == [["C", "baseline"], ["C", "matched"], ["CS", "C"], ["CS", "CS_random"],
                              ["C_window", "baseline"]]
    assert grid.endpoints.t50_metric == "minor_present" and len(grid.eval_at) >= 8 and grid.seeds == [0, 1, 2]
    runs = expand_runs(grid, steps_per_epoch=steps_per_epoch)
    assert {r.eval_steps[-1] for r in runs} == {1792}  # >= 2.5 x the baseline's measured T50 (~700 steps)
    assert {r.arm for r in runs} >= {"baseline", "C", "matched", "CS", "CS_random", "C_window", "CS_decoder"}
