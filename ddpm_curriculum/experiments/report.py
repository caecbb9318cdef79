"""Summaries of an experiment grid: mean ± std over seeds and paired differences to the baseline arm.

For arm a and seed s at one evaluation step, d_s = m(a, s) − m(baseline, s) (same seed = same initial
weights, data order and noise, so the pairing removes most of the seed-to-seed variance). The report gives
mean(d) with a 95% Student-t interval mean(d) ± t_{0.975, n−1}·sd(d)/√n over the n seeds both arms
finished; with n = 1 there is no interval. An arm is marked better/worse only when the interval excludes 0.
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from pathlib import Path

from scipy import stats

from .endpoints import first_crossing, exposure, mean_over_training, paired_contrasts

# (metric, better direction: +1 higher, −1 lower, 0 closer to 1), in report order
METRICS = [
    ("val_loss", -1), ("val_loss_low_t", -1), ("val_loss_high_t", -1),
    ("minor_present", +1), ("minor_amplitude", 0), ("minor_amplitude_excess", +1),
    ("minor_amplitude_excess_norm", +1), ("minor_floor", -1),
    ("minor_coverage", +1), ("tki_mse_400", +1), ("tki_400", 0),
    ("major_present", +1), ("major_amplitude", 0), ("major_coverage", +1), ("residual_ratio", 0),
    ("fid", -1), ("fd_classifier", -1), ("kid_classifier", -1), ("nll_bpd", -1), ("spectrum_high_error", -1),
]
KEY_METRICS = ("val_loss", "val_loss_low_t", "minor_present", "minor_amplitude", "major_present",
               "residual_ratio", "fid", "nll_bpd", "fd_classifier", "kid_classifier", "spectrum_high_error")


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1 divisor; 0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired_interval(diffs: list[float], level: float = 0.95) -> tuple[float, float | None]:
    """Mean of paired differences and the half-width of its Student-t interval (None for n < 2)."""
    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n < 2:
        return mean, None
    return mean, stats.t.ppf(0.5 + level / 2, n - 1) * statistics.stdev(diffs) / math.sqrt(n)


def verdict(mean: float, half: float | None, direction: int, base_mean: float | None = None) -> str:
    """'better' / 'worse' when the interval excludes 0, else 'no detectable difference'."""
    if half is None or abs(mean) <= half:
        return "no detectable difference"
    if direction == 0:  # closer to the ideal value 1 is better
        improves = abs(base_mean + mean - 1) < abs(base_mean - 1)
    else:
        improves = mean * direction > 0
    return "better" if improves else "worse"


def index(records: list[dict]) -> dict:
    """{(arm, step): {seed: record}} of the successful records (the last one wins)."""
    out: dict = {}
    for rec in records:
        if "error" not in rec:
            out.setdefault((rec["arm"], rec["step"]), {})[rec["seed"]] = rec
    return out


def compare(by_point: dict, arm: str, base: str, step: int, metric: str):
    """Paired difference of ``metric`` between ``arm`` and ``base`` at ``step`` → (mean, half, n) or None."""
    a, b = by_point.get((arm, step), {}), by_point.get((base, step), {})
    seeds = sorted(set(a) & set(b))
    diffs = [a[s][metric] - b[s][metric] for s in seeds if metric in a[s] and metric in b[s]]
    if not diffs:
        return None
    mean, half = paired_interval(diffs)
    return mean, half, len(diffs)


def interval_cell(values: list[float]) -> str:
    """``mean ± half-width`` of the 95% Student-t interval of ``values`` (mean alone for n = 1; — for none)."""
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    mean, half = paired_interval(values)
    return _fmt(mean) if half is None else f"{_fmt(mean)} ± {half:.2g}"


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _pm(mean: float, spread: float) -> str:
    """``mean ± spread`` with the spread to two significant digits."""
    return f"{_fmt(mean)} ± {spread:.2g}"


def _arm_order(records, grid) -> list[str]:
    return [a.name for a in grid.arms if any(r["arm"] == a.name for r in records)]


def _table_final(by_point, arms, final_step, metrics) -> list[str]:
    lines = ["| arm | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for arm in arms:
        recs = list(by_point.get((arm, final_step), {}).values())
        cells = []
        for m in metrics:
            vals = [r[m] for r in recs if m in r]
            cells.append("—" if not vals else _pm(*mean_std(vals)))
        lines.append(f"| {arm} (n={len(recs)}) | " + " | ".join(cells) + " |")
    return lines


def _table_diffs(by_point, arms, base, step, metrics, directions, labels: bool = True) -> list[str]:
    lines = ["| arm − " + base + " | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for arm in arms:
        if arm == base:
            continue
        cells = []
        for m in metrics:
            c = compare(by_point, arm, base, step, m)
            if c is None:
                cells.append("—")
                continue
            mean, half, n = c
            base_vals = [r[m] for r in by_point.get((base, step), {}).values() if m in r]
            v = verdict(mean, half, directions[m], statistics.fmean(base_vals) if base_vals else None)
            mark = {"better": " **better**", "worse": " **worse**"}.get(v, "") if labels else ""
            cells.append(f"{_pm(mean, half)}{mark}" if half is not None else f"{_fmt(mean)} (n=1)")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def _table_over_training(by_point, arms, steps, metric) -> list[str]:
    lines = [f"| {metric} | " + " | ".join(f"step {s}" for s in steps) + " |", "|---" * (len(steps) + 1) + "|"]
    for arm in arms:
        cells = []
        for s in steps:
            vals = [r[metric] for r in by_point.get((arm, s), {}).values() if metric in r]
            cells.append("—" if not vals else _pm(*mean_std(vals)))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def summary_sentences(by_point, arms, base, step, directions) -> list[str]:
    """One plain sentence per metric: which arms differ detectably from the baseline at ``step``."""
    out = []
    for m in KEY_METRICS:
        better, worse = [], []
        for arm in arms:
            c = None if arm == base else compare(by_point, arm, base, step, m)
            if c is None:
                continue
            base_vals = [r[m] for r in by_point.get((base, step), {}).values() if m in r]
            v = verdict(c[0], c[1], directions[m], statistics.fmean(base_vals) if base_vals else None)
            (better if v == "better" else worse if v == "worse" else []).append(arm)
        if better or worse:
            out.append(f"- `{m}`: better than {base}: {', '.join(better) or 'none'}; "
                       f"worse: {', '.join(worse) or 'none'}; every other arm: no detectable difference.")
        else:
            out.append(f"- `{m}`: no arm differs detectably from {base}.")
    return out


def _run_curves(by_point: dict) -> dict:
    """{(arm, seed): [records in step order]}."""
    runs: dict = {}
    for (arm, _), recs in by_point.items():
        for seed, rec in recs.items():
            runs.setdefault((arm, seed), []).append(rec)
    return {k: sorted(v, key=lambda r: r["step"]) for k, v in runs.items()}


def endpoint_values(by_point: dict, ep) -> dict:
    """{endpoint name: {arm: {seed: value}}} of the pre-registered endpoints, plus "_censored" and
    "_exposure" ({arm: {seed: …}}) for finished runs (those with a ``final`` record)."""
    out: dict = {"_censored": {}, "_exposure": {}}
    for (arm, seed), recs in _run_curves(by_point).items():
        if not recs[-1].get("final"):
            continue
        budget = recs[-1]["step"]

        def put(name, value):
            out.setdefault(name, {}).setdefault(arm, {})[seed] = value  # noqa: B023 (called in this iteration)

        curve = [(r["step"], r[ep.t50_metric]) for r in recs if ep.t50_metric in r]
        if curve:
            cross = first_crossing(curve, ep.t50_threshold, budget)
            put(f"T50({ep.t50_metric} ≥ {ep.t50_threshold:g})", cross.step)
            out["_censored"].setdefault(arm, {})[seed] = cross.censored
        for m in ep.auc_metrics:
            curve = [(r["step"], r[m]) for r in recs if m in r]
            if curve and curve[-1][0] == budget:
                put(f"AUC({m})", mean_over_training(curve, budget))
        for m in ep.end_metrics:
            if m in recs[-1]:
                put(f"end({m})", recs[-1][m])
        if "drawn_per_t_bin" in recs[-1]:
            out["_exposure"].setdefault(arm, {})[seed] = exposure(recs[-1]["drawn_per_t_bin"], ep.exposure_below)
    return out


def _mean_or_dash(values) -> str:
    values = [v for v in values if v is not None]
    return "—" if not values else _pm(*mean_std(values))


def _t50_cell(values: dict, censored: dict) -> str:
    """T50 over seeds: "> budget" when no seed crossed, else mean ± std of the crossings (+ how many did not)."""
    crossed = [v for s, v in values.items() if not censored.get(s)]
    if not crossed:
        return f"> {_fmt(max(values.values()))}" if values else "—"
    rest = len(values) - len(crossed)
    return _pm(*mean_std(crossed)) + (f" ({rest} seed(s) > budget)" if rest else "")


def endpoint_lines(by_point: dict, grid, arms: list[str]) -> list[str]:
    """The pre-registered section: endpoints per arm, exposure over training, Holm-corrected contrasts."""
    ep = grid.endpoints
    values = endpoint_values(by_point, ep)
    names = [k for k in values if not k.startswith("_")]
    cens, expo = values["_censored"], values["_exposure"]
    below = f"t < {ep.exposure_below:g}·T"
    lines = ["## Pre-registered endpoints", "",
             f"Endpoints and contrasts were fixed in the grid file before the run "
             f"(`ddpm_curriculum/experiments/endpoints.py` defines them). T50 starts from (step 0, 0) and is "
             f"censored at the budget (\"> budget\"); a censored run enters a difference at the budget, so that "
             f"difference is a bound. Exposure = training samples drawn with {below}: **equal steps are not equal "
             f"exposure**.", "",
             "| arm | " + " | ".join(names) + f" | censored T50 | samples with {below} at the end |",
             "|---" * (len(names) + 3) + "|"]
    for arm in arms:
        c = cens.get(arm, {})
        cells = [_t50_cell(values[n].get(arm, {}), c) if n.startswith("T50") else
                 _mean_or_dash(values[n].get(arm, {}).values()) for n in names]
        cells.append(f"{sum(c.values())}/{len(c)}" if c else "—")
        cells.append(_mean_or_dash([float(v) for v in expo.get(arm, {}).values() if v is not None]))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    steps = sorted({s for (a, s) in by_point})
    lines += ["", f"Exposure over training (samples with {below}, mean over seeds):", "",
              "| arm | " + " | ".join(f"step {s}" for s in steps) + " |", "|---" * (len(steps) + 1) + "|"]
    for arm in arms:
        cells = []
        for s in steps:
            e = [exposure(r["drawn_per_t_bin"], ep.exposure_below) for r in by_point.get((arm, s), {}).values()
                 if "drawn_per_t_bin" in r]
            e = [v for v in e if v is not None]
            cells.append(f"{statistics.fmean(e):.0f}" if e else "—")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    for name in names:
        pairs = [(f"{a} − {b}", values[name].get(a, {}), values[name].get(b, {})) for a, b in grid.contrasts]
        lines += ["", f"### {name}: contrasts (paired by seed, Holm over {len(pairs)} contrasts, "
                      f"α = {ep.alpha:g})", "",
                  "| contrast | mean difference | interval | p | p (Holm) | verdict | exposure A / B at the end |",
                  "|---|---|---|---|---|---|---|"]
        for (a, b), c in zip(grid.contrasts, paired_contrasts(pairs, ep.alpha), strict=True):
            ea = _mean_or_dash([float(v) for v in expo.get(a, {}).values() if v is not None])
            eb = _mean_or_dash([float(v) for v in expo.get(b, {}).values() if v is not None])
            bound = sum(cens.get(a, {}).values()) + sum(cens.get(b, {}).values()) if name.startswith("T50") else 0
            if c.p_holm is None:
                lines.append(f"| {c.name} | {_fmt(c.mean)} (n={c.n}) | — | — | — | not tested (n < 2) | {ea} / {eb} |")
                continue
            verdict_text = "different" if c.different(ep.alpha) else "no detectable difference"
            if bound:
                verdict_text += f" ({bound} censored runs: a bound)"
            lines.append(f"| {c.name} | {_fmt(c.mean)} (n={c.n}) | ± {c.half:.2g} ({c.level:.2%}) | {c.p:.3g} | "
                         f"{c.p_holm:.3g} | {verdict_text} | {ea} / {eb} |")
    return lines + [""]


def floor_lines(path: Path) -> list[str]:
    """The report section of ``floor.json`` (none when it does not exist)."""
    import json

    if not path.exists():
        return []
    floor = json.loads(path.read_text())
    names = [m for m, _ in METRICS if m in floor]
    return [f"## Floor: {floor['num_images']} held-out real images scored as samples", "",
            "What a perfect generator scores with this sample count and reference (finite-sample bias; "
            "`run_experiments.py --floor`, `experiments/evaluate.py: real_image_floor`). Differences between arms "
            "smaller than the distance to this floor are not resolved by these metrics.", "",
            "| " + " | ".join(names) + " |", "|---" * len(names) + "|",
            "| " + " | ".join(_fmt(floor[m]) for m in names) + " |", ""]


def write_report(records: list[dict], grid, base: str, out_dir: Path, quick: bool = False,
                 command: str | None = None, extra: list[str] = ()) -> Path:
    """Write ``report.md`` (and ``plots/*.png`` when matplotlib is installed); returns the report path.
    ``extra``: further sections (markdown lines) placed before the plots."""
    import sys

    by_point = index(records)
    arms = _arm_order(records, grid)
    directions = dict(METRICS)
    steps = sorted({r["step"] for r in records if "error" not in r})
    finals = sorted({r["step"] for r in records if r.get("final")})
    present = [m for m, _ in METRICS if any(m in r for r in records)]
    key = [m for m in KEY_METRICS if m in present]
    lines = [f"# Experiment report{' (quick mode)' if quick else ''}", "",
             f"Command: `{command or ' '.join(['python', *sys.argv])}`  ",
             f"Written {time.strftime('%Y-%m-%d %H:%M')} on {platform.machine()} with "
             f"{len({(r['arm'], r['seed']) for r in records if 'error' not in r})} finished runs.", "",
             "Mean ± std over seeds; differences are paired by seed with a 95% Student-t interval; " +
             ("only the pre-registered contrasts get a verdict (Holm-corrected); "
              if grid.contrasts else "**better**/**worse** only where the interval excludes 0; ") +
             "see `ddpm_curriculum/experiments/report.py`. Metrics: `ddpm_curriculum/experiments/evaluate.py` "
             "and the oracle metrics in README.md.", ""]
    failures = [r for r in records if "error" in r]
    if failures:
        lines += ["## Failed runs", ""] + [f"- {r['arm']}/seed{r['seed']}: {r['error']}" for r in failures] + [""]
    study = bool(grid.contrasts)  # pre-registered contrasts: only those get a verdict
    if study:
        lines += endpoint_lines(by_point, grid, arms)
    for final in finals[-1:]:
        kimg = next(r["kimg"] for r in records if r.get("step") == final and "kimg" in r)
        lines += [f"## At the end of training (step {final}, {kimg:g} kimg)", ""]
        lines += _table_final(by_point, arms, final, key) + [""]
        lines += [f"### Differences to `{base}`", ""]
        if study:
            lines += ["Exploratory estimates (95% t-intervals, no multiplicity correction, no verdict):", ""]
        lines += _table_diffs(by_point, arms, base, final, key, directions, labels=not study) + [""]
        if not study:
            lines += ["### In one sentence per metric", ""]
            lines += summary_sentences(by_point, arms, base, final, directions) + [""]
    lines += ["## Over training", ""]
    for m in present:
        lines += _table_over_training(by_point, arms, steps, m) + [""]
    lines += list(extra)
    plots = write_plots(records, arms, present, out_dir / "plots", grid)
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots] + [""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def write_plots(records, arms, metrics, folder: Path, grid=None) -> list[Path]:
    """Metric vs training images per arm (mean and 95% t-interval over seeds; no bar for one seed), and with
    pre-registered endpoints a T50 plot (each seed a dot, censored seeds a triangle at the budget); [] without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    by_point = index(records)
    paths = []
    for m in metrics:
        fig, ax = plt.subplots(figsize=(5, 3.4))
        for arm in arms:
            pts = sorted((s, [r[m] for r in recs.values() if m in r], next(iter(recs.values()))["kimg"])
                         for (a, s), recs in by_point.items() if a == arm)
            pts = [(kimg, *paired_interval(v)) for _, v, kimg in pts if v]
            if pts:
                x, mu, half = zip(*pts, strict=True)
                ax.errorbar(x, mu, yerr=[h or 0.0 for h in half], marker="o", ms=3, capsize=2, label=arm)
        ax.set_xlabel("training images (kimg)")
        ax.set_ylabel(f"{m} (mean, 95% CI)")
        ax.legend(fontsize=6)
        fig.tight_layout()
        path = folder / f"{m}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    if grid is not None and grid.contrasts:
        paths += _t50_plot(plt, by_point, grid, arms, folder)
    return paths


def _t50_plot(plt, by_point, grid, arms, folder: Path) -> list[Path]:
    values = endpoint_values(by_point, grid.endpoints)
    name = next((k for k in values if k.startswith("T50")), None)
    if name is None:
        return []
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for i, arm in enumerate(arms):
        seeds = values[name].get(arm, {})
        cens = values["_censored"].get(arm, {})
        for seed, step in seeds.items():
            ax.plot(i, step, "v" if cens.get(seed) else "o", color="C0" if not cens.get(seed) else "C3", ms=5)
        crossed = [v for s, v in seeds.items() if not cens.get(s)]
        if crossed:
            ax.plot([i - 0.25, i + 0.25], [statistics.fmean(crossed)] * 2, color="k", lw=1)
    ax.set_xticks(range(len(arms)), arms, rotation=45, fontsize=7)
    ax.set_ylabel(f"{name} (step)")
    ax.set_title("dot: a seed; red triangle: censored at the budget; bar: mean of crossings", fontsize=7)
    fig.tight_layout()
    path = folder / "T50.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path]
