"""Pre-registered endpoints of a study grid and the paired contrasts between its arms.

Per (arm, seed) run, from its evaluation points (step s_i, value v_i), i = 1..n, in increasing step:

* **T50** ("faster"): the first step at which ``metric`` reaches ``threshold``, linearly interpolated between
  the last point below and the first point at or above it. The run is taken to start at (0, ``start``)
  (``start`` = 0: an untrained network shows no minor feature), so a crossing before the first point is
  interpolated from step 0. A run that never reaches the threshold is *censored*: its T50 is reported as
  "> budget" and enters paired differences as the budget, which makes such a difference a bound, not an
  estimate (the report says how many runs were censored).
* **AUC** ("faster", continuous): the trapezoid area under v(s) over [0, budget] divided by the budget, i.e.
  the value averaged over training, with the same start point (0, ``start``). Points must span the budget.
* **End value** ("better"): v at the last point (the budget).
* **Exposure**: how many training samples with t < ``exposure_below``·T the run has drawn up to each point,
  counted from ``metrics.jsonl`` (``samples_per_t_bin``, recorded by the runner as ``drawn_per_t_bin``).
  Equal steps are not equal exposure: a curriculum that holds low-noise training back has seen far fewer
  low-t samples at the same step.

A contrast "A − B" pairs the runs of A and B by seed, d_s = e(A, s) − e(B, s), and tests mean(d) = 0 with the
paired Student t-test. Over the m pre-registered contrasts of one endpoint the p-values are Holm-adjusted
(step-down: p_(i) sorted ascending, adjusted p_(i) = max_{j ≤ i} min(1, (m − j + 1)·p_(j))). A contrast is
called different only when its adjusted p < α. Its interval is the t-interval at level 1 − α/(m − i + 1),
the level at which Holm tests the i-th smallest p, so it excludes 0 exactly when that step of the procedure
rejects (the step-down rule can still keep a later contrast undecided after an earlier one was not rejected;
the adjusted p decides). Every other number in a report is an estimate without a better/worse label.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from scipy import stats

from ..config import read_jsonl


@dataclass(frozen=True)
class Crossing:
    step: float  # interpolated step of the first crossing, or the budget when censored
    censored: bool


def _with_start(points: list[tuple[float, float]], start: float) -> list[tuple[float, float]]:
    pts = sorted(points)
    return pts if pts and pts[0][0] == 0 else [(0.0, start), *pts]


def first_crossing(points: list[tuple[float, float]], threshold: float, budget: float,
                   start: float = 0.0) -> Crossing:
    """T50-style endpoint: first step with value ≥ ``threshold`` (linear interpolation; see module doc)."""
    pts = _with_start(points, start)
    if pts[0][1] >= threshold:
        return Crossing(pts[0][0], False)
    for (s0, v0), (s1, v1) in zip(pts, pts[1:], strict=False):
        if v1 >= threshold:
            return Crossing(s0 + (threshold - v0) / (v1 - v0) * (s1 - s0), False)
    return Crossing(float(budget), True)


def mean_over_training(points: list[tuple[float, float]], budget: float, start: float = 0.0) -> float:
    """AUC endpoint: trapezoid area under the curve over [0, budget], divided by the budget."""
    pts = _with_start(points, start)
    if pts[-1][0] != budget:
        raise ValueError(f"the last evaluation point is step {pts[-1][0]}, not the budget {budget}")
    area = sum((s1 - s0) * (v0 + v1) / 2 for (s0, v0), (s1, v1) in zip(pts, pts[1:], strict=False))
    return area / budget


def holm_adjust(pvalues: list[float]) -> list[float]:
    """Holm step-down adjusted p-values, in the input order."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


@dataclass
class Contrast:
    name: str  # "A − B"
    mean: float
    n: int
    p: float | None = None  # paired t-test, two-sided
    p_holm: float | None = None
    level: float | None = None  # confidence level of the interval below
    half: float | None = None  # half-width of that interval
    censored: int = 0  # runs entering the difference at the budget (T50 only)

    def different(self, alpha: float = 0.05) -> bool | None:
        return None if self.p_holm is None else self.p_holm < alpha


def paired_contrasts(pairs: list[tuple[str, dict, dict]], alpha: float = 0.05) -> list[Contrast]:
    """``pairs``: (name, {seed: value of A}, {seed: value of B}); paired t-tests, Holm over the list."""
    out, sds = [], {}
    for name, a, b in pairs:
        diffs = [a[s] - b[s] for s in sorted(set(a) & set(b))]
        c = Contrast(name, statistics.fmean(diffs) if diffs else math.nan, len(diffs))
        if len(diffs) >= 2:
            sds[name] = sd = statistics.stdev(diffs)
            if sd == 0:
                c.p = 1.0 if c.mean == 0 else 0.0
            else:
                c.p = 2 * stats.t.sf(abs(c.mean) / (sd / math.sqrt(c.n)), c.n - 1)
        out.append(c)
    tested = [c for c in out if c.p is not None]
    for c, adj in zip(tested, holm_adjust([c.p for c in tested]), strict=True):
        c.p_holm = adj
    for rank, c in enumerate(sorted(tested, key=lambda c: c.p)):
        c.level = 1 - alpha / (len(tested) - rank)
        c.half = stats.t.ppf(0.5 + c.level / 2, c.n - 1) * sds[c.name] / math.sqrt(c.n)
    return out


def drawn_per_t_bin(metrics_path: Path, step: int) -> list[int] | None:
    """Training samples drawn per equal-width bin of t up to ``step``, summed from ``metrics.jsonl``.

    Each line's ``samples_per_t_bin`` counts one logging interval's draws (global over ranks); lines are
    de-duplicated by step (a resumed run rewrites the lines after its checkpoint). None when the log
    predates the field.
    """
    by_step = {}
    for rec in read_jsonl(metrics_path):
        if "samples_per_t_bin" in rec and rec.get("step", math.inf) <= step:
            by_step[rec["step"]] = rec["samples_per_t_bin"]
    if not by_step:
        return None
    return [int(sum(col)) for col in zip(*by_step.values(), strict=False)]


def exposure(counts: list[int], below: float) -> int | None:
    """Samples with t < ``below``·T among per-bin ``counts``; None when the bins do not split there."""
    cut = below * len(counts)
    if abs(cut - round(cut)) > 1e-9:
        return None
    return int(sum(counts[:round(cut)]))
