"""Does the reserved capacity carry the fine features? Channel attribution for twoscale networks (issue 10 §4).

For a network with channel gates (mode CS: ``SparseUNet`` at the bottleneck or ``DecoderSparseUNet`` on every
up block's input) the channels are grouped by ``channel_birth_stage``: group g = the channels that became
active in stage g (0 = active from the start). For a network without gates (baseline, C) the same gated
class is built around its weights with every gate open, and the groups are random channel sets of the sizes
of a CS run's groups: the null that says how much *any* set of that many channels matters.

All probes run on the first ``n`` held-out twoscale images x0 with true class (k, j), fixed noise ε and
x_t = q_sample(x0, t, ε), at ``ts`` (default: one t inside the minor decision window and two low t):

* **recovery** r_minor(t) = mean_i ⟨x̂0_i, P2[k_i, j_i]⟩/‖P2‖²/α2 and r_major(t) = the same with P1[k_i] and α1,
  x̂0 the network's denoised estimate (1 = the template fully recovered at its true amplitude);
* **ablation**: the drop of r_minor and r_major when group g's gates are closed (all others open), and the
  ratio of the two drops (minor-selectivity; > 1: the group carries more of the fine than of the coarse feature);
* **gradient × activation** (at an open gate, m_c = 1): Σ_{c ∈ g} |∂f/∂m_c| for f = r_minor and f = r_major,
  the first-order effect of closing each channel of the group;
* **at generation** (``sample_ablation``): ``num_samples`` DDIM samples with the late-born channels
  (birth stage ≥ 1) closed versus all open, scored with the oracle metrics (drop in ``minor_present`` and in
  ``minor_amplitude_excess``).
"""

from __future__ import annotations

import contextlib
import json

import torch

from ..atomic import append_line
from ..config import read_jsonl
from ..errors import UserError
from ..models import GATED_MODEL_NAMES
from ..sparsity.schedules import stage_active_channels
from ..training import builders
from .report import interval_cell

DEFAULT_TS = (450, 100, 50)  # inside the default data's minor window (t 328–606), and two low t
LATE = "late"  # the group key of all channels born after the start


def gated_network(net, location: str | None = None):
    """(gated model, location): ``net.model`` itself when it has gates, else its weights in the gated class
    of ``location`` (default ``bottleneck``) with every gate open."""
    model = net.model
    if hasattr(model, "channel_mask"):
        return model, "decoder" if hasattr(model, "gated_blocks") else "bottleneck"
    location = location or "bottleneck"
    gated = builders.make_model(net.config, GATED_MODEL_NAMES[location])
    missing, unexpected = gated.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"channel_mask", "channel_birth_stage"}, (missing, unexpected)
    gated.channel_birth_stage.fill_(-1)  # no birth record: the groups come from random_groups
    return gated.to(next(model.parameters()).device).eval(), location


def birth_groups(model) -> dict[int, torch.Tensor]:
    """{stage: bool [C] of the channels born in that stage} (only stages with channels)."""
    birth = model.channel_birth_stage.cpu()
    return {int(s): birth == s for s in sorted(set(birth.tolist())) if s >= 0}


def birth_group_sizes(cfg) -> dict[int, int]:
    """{stage: channels born in it} of a mode-CS config, from its sparsity schedule alone (a CS run of that
    config has exactly these group sizes whatever its seed, so a null needs no CS checkpoint)."""
    model = builders.make_model(cfg)
    per_segment = [stage_active_channels(cfg, c) for c in model.gate_segments]
    totals = [sum(k) for k in zip(*per_segment, strict=True)]
    sizes = {0: totals[0], **{g: totals[g] - totals[g - 1] for g in range(1, len(totals))}}
    return {g: n for g, n in sizes.items() if n > 0}


def random_groups(model, sizes: list[int] | dict[int, int], seed: int) -> dict[int, torch.Tensor]:
    """Disjoint random channel sets of the given sizes (a list, or {group: size}), drawn uniformly among all
    gated channels (so a decoder-null group spans the up blocks about in proportion to their widths, as a CS
    group does)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(model.gated_channels, generator=g)
    out, start = {}, 0
    for i, size in (sizes.items() if isinstance(sizes, dict) else enumerate(sizes)):
        flags = torch.zeros(model.gated_channels, dtype=torch.bool)
        flags[perm[start:start + size]] = True
        out[i], start = flags, start + size
    return out


def with_late(groups: dict) -> dict:
    """``groups`` plus ``"late"``: the union of the groups born after the start (stage >= 1), when any."""
    late = [c for g, c in groups.items() if g >= 1]
    return {**groups, LATE: torch.stack(late).any(0)} if late else dict(groups)


@contextlib.contextmanager
def closed(model, channels: torch.Tensor):
    """Temporarily close the gates of ``channels`` (bool [C])."""
    saved = model.channel_mask.clone()
    model.channel_mask[channels.to(saved.device)] = 0.0
    try:
        yield model
    finally:
        model.channel_mask.copy_(saved)


class Probe:
    """Fixed held-out inputs and the two recovery functions (see the module docstring)."""

    def __init__(self, dataset, diffusion, ts=DEFAULT_TS, n: int = 256, seed: int = 0):
        self.dataset, self.diffusion = dataset, diffusion
        self.ts = [t for t in ts if t < diffusion.timesteps]
        x0, labels = dataset.held_out(n)
        k2 = dataset.prototypes_minor.shape[1]
        p2 = dataset.prototypes_minor.flatten(2).flatten(0, 1)[labels]  # [n, D]
        p1 = dataset.prototypes_major.flatten(1)[labels // k2]
        self.templates = {"minor": (p2, dataset.alpha2), "major": (p1, dataset.alpha1)}
        g = torch.Generator().manual_seed(seed)
        self.x_t = {t: diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=g)) for t in self.ts}

    def x0_hat(self, model, t: int) -> torch.Tensor:
        device = next(model.parameters()).device
        x = self.x_t[t].to(device)
        tt = torch.full((len(x),), t, device=device, dtype=torch.long)
        return self.diffusion.predict_x0(x, tt, model(x, tt)).flatten(1)

    def recovery(self, x0_hat: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for name, (p, alpha) in self.templates.items():
            p = p.to(device=x0_hat.device, dtype=x0_hat.dtype)
            out[name] = ((x0_hat * p).sum(1) / (p * p).sum(1)).mean() / alpha
        return out


@torch.no_grad()
def ablation(model, probe: Probe, groups: dict[int, torch.Tensor]) -> dict:
    """{t: {"open": {minor, major}, g: {"minor_drop", "major_drop", "selectivity"}}}."""
    out = {}
    for t in probe.ts:
        base = {k: v.item() for k, v in probe.recovery(probe.x0_hat(model, t)).items()}
        row = {"open": base}
        for g, channels in groups.items():
            with closed(model, channels):
                r = {k: v.item() for k, v in probe.recovery(probe.x0_hat(model, t)).items()}
            drops = {f"{k}_drop": base[k] - r[k] for k in base}
            drops["selectivity"] = drops["minor_drop"] / drops["major_drop"] if drops["major_drop"] else None
            row[g] = drops
        out[t] = row
    return out


def gradient_activation(model, probe: Probe, groups: dict[int, torch.Tensor]) -> dict:
    """{t: {g: {"minor", "major"}}}: Σ_{c ∈ g} |∂r/∂m_c| at the open gates (m = the current mask)."""
    saved = model.channel_mask
    out = {}
    try:
        for t in probe.ts:
            leaf = saved.clone().requires_grad_(True)
            model.channel_mask = leaf
            r = probe.recovery(probe.x0_hat(model, t))
            grads = {k: torch.autograd.grad(v, leaf, retain_graph=True)[0].abs().cpu() for k, v in r.items()}
            out[t] = {g: {k: float(grad[ch].sum()) for k, grad in grads.items()} for g, ch in groups.items()}
    finally:
        model.channel_mask = saved
    return out


@torch.no_grad()
def sample_ablation(model, diffusion, dataset, channels: torch.Tensor, num_samples: int = 256,
                    sample_steps: int = 25, seed: int = 0, batch_size: int = 256) -> dict:
    """Oracle metrics of samples with all gates open and with ``channels`` closed, and the drops."""
    from ..training.reporting import sample_oracle_metrics

    device = next(model.parameters()).device
    args = (diffusion, model, dataset, num_samples, sample_steps, seed, batch_size, device)
    open_ = sample_oracle_metrics(*args)
    with closed(model, channels):
        shut = sample_oracle_metrics(*args)
    keys = ("minor_present", "minor_amplitude_excess", "major_present")
    return {"open": {k: open_[k] for k in keys}, "closed": {k: shut[k] for k in keys},
            "drop": {k: open_[k] - shut[k] for k in keys}, "channels": int(channels.sum())}


def attribute(net, *, location: str | None = None, sizes: list[int] | dict[int, int] | None = None, ts=DEFAULT_TS,
              n: int = 256, seed: int = 0, null_repeats: int = 4, num_samples: int = 256,
              sample_steps: int = 25) -> dict:
    """Everything above for one network (``LoadedNetwork``): its birth groups when it has them, otherwise
    ``null_repeats`` draws of random groups of ``sizes`` (averaged)."""
    model, location = gated_network(net, location)
    model.eval()
    dataset, diffusion = builders.make_dataset(net.config), net.diffusion
    probe = Probe(dataset, diffusion, ts, n, seed)
    groups = birth_groups(model)
    result = {"location": location, "gated_channels": model.gated_channels, "ts": probe.ts}
    if groups:
        groups = with_late(groups)
        result["groups"] = {g: int(c.sum()) for g, c in groups.items()}
        result["ablation"] = ablation(model, probe, groups)
        result["gradient_activation"] = gradient_activation(model, probe, groups)
        late = groups.get(LATE)
    else:
        if not sizes:
            raise ValueError("a network without birth groups needs the group sizes of a CS run (sizes)")
        draws = [with_late(random_groups(model, sizes, seed + r)) for r in range(null_repeats)]
        result["groups"] = {g: int(c.sum()) for g, c in draws[0].items()}
        result["null_repeats"] = null_repeats
        result["ablation"] = _mean_nested([ablation(model, probe, d) for d in draws])
        result["gradient_activation"] = _mean_nested([gradient_activation(model, probe, d) for d in draws])
        late = draws[0].get(LATE)
    if late is not None and num_samples:
        result["generation"] = sample_ablation(model, diffusion, dataset, late, num_samples, sample_steps, seed)
    return result


def _mean_nested(items: list):
    """Element-wise mean of equally shaped nested dicts of numbers (None stays None if any is None)."""
    first = items[0]
    if isinstance(first, dict):
        return {k: _mean_nested([it[k] for it in items]) for k in first}
    if first is None or any(it is None for it in items):
        return None
    return sum(items) / len(items)


# ----- an experiment grid's final networks (run_experiments.py --attribute) -----

def attribute_grid(grid, out_dir, records: list[dict], quick: bool = False, log=print) -> list[dict]:
    """Attribute every finished run's final network once and append it to ``OUT/attribution.jsonl``.

    Gated arms (mode CS) use their own birth groups; each ``attribution.nulls`` pair [ARM, LIKE] attributes
    ARM's network with random groups of the sizes LIKE's config gives its birth groups, at LIKE's gate
    location (the null; it needs no LIKE checkpoint). Returns all records."""
    from pathlib import Path

    from ..training.checkpoint import checkpoint_name, load_network
    from .grid import attribution_settings, expand_runs

    settings = attribution_settings(grid, quick)
    out_dir = Path(out_dir)
    path = out_dir / "attribution.jsonl"
    done = {(r["arm"], r["seed"], r.get("like")) for r in read_jsonl(path)}
    finals = {(r["arm"], r["seed"]): r["step"] for r in records if r.get("final") and "error" not in r}

    def network(arm, seed):
        return load_network(out_dir / arm / f"seed{seed}" / "checkpoints" / checkpoint_name(finals[arm, seed]))

    kwargs = dict(ts=settings.ts, n=settings.n, seed=settings.seed, null_repeats=settings.null_repeats,
                  num_samples=settings.num_samples, sample_steps=settings.sample_steps)
    jobs = [(arm, seed, None) for (arm, seed) in sorted(finals)]
    jobs += [(arm, seed, like) for arm, like in settings.nulls for (a, seed) in sorted(finals) if a == arm]
    like_cfg = {(r.arm, r.seed): r.config for r in expand_runs(grid, quick, steps_per_epoch=lambda cfg: 1)}
    for arm, seed, like in jobs:
        if (arm, seed, like) in done:
            continue
        net = network(arm, seed)
        if like is None:
            if not hasattr(net.model, "channel_mask"):
                continue  # no gates: attributed only as a null
            result = attribute(net, **kwargs)
        else:
            cfg = like_cfg[like, seed]
            if cfg.mode != "CS":
                raise UserError(f"attribution null [{arm}, {like}]: {like} is not a mode-CS arm (no birth groups)")
            result = attribute(net, location=cfg.sparsity.location, sizes=birth_group_sizes(cfg), **kwargs)
        rec = {"arm": arm, "seed": seed, "step": finals[arm, seed], "like": like, "result": result}
        append_line(path, json.dumps(rec))
        log(f"attribution {arm}/seed{seed}" + (f" (null, {like}'s groups)" if like else "") + " written")
    return read_jsonl(path)


def attribution_lines(records: list[dict], plot_folder=None) -> list[str]:
    """Report section: per probe t and arm, the recovery drops when the first-stage group or the late-born
    channels are closed (mean ± 95% t-interval over seeds), and the drops at generation; with
    ``plot_folder`` (and matplotlib) also ``attribution.png``."""
    if not records:
        return []
    rows: dict[tuple, list[dict]] = {}
    for r in records:
        rows.setdefault((r["arm"], r.get("like")), []).append(r["result"])
    ts = sorted({int(t) for res in (x for v in rows.values() for x in v) for t in res["ts"]}, reverse=True)
    label = {k: (f"{k[0]} (null: random groups of {k[1]}'s sizes)" if k[1] else k[0]) for k in rows}
    lines = ["## Attribution at the end of training", "",
             "Does the capacity born late (CS stages ≥ 2) carry the fine feature? Recovery r = mean ⟨x̂0, P⟩/‖P‖²/α "
             "of the true template on fixed held-out x_t; a drop is r(all open) − r(group closed). 'first' = the "
             "channels active from the start, 'late' = all channels born later. A null closes random channel "
             "sets of the same sizes in a network without birth groups. Mean ± 95% t-interval over seeds (n); "
             "estimates, no verdicts. `ddpm_curriculum/experiments/attribution.py`.", "",
             "| t | arm | n | r_minor open | minor drop first | major drop first | minor drop late | "
             "major drop late |", "|---|---|---|---|---|---|---|---|"]

    def cell(results, t, group, key):
        vals = [res["ablation"][str(t)][group][key] for res in results if group in res["ablation"][str(t)]]
        return interval_cell(vals)

    for t in ts:
        for k, results in rows.items():
            results = [res for res in results if str(t) in res["ablation"]]
            opened = interval_cell([res["ablation"][str(t)]["open"]["minor"] for res in results])
            lines.append(f"| {t} | {label[k]} | {len(results)} | {opened} | {cell(results, t, '0', 'minor_drop')} | "
                         f"{cell(results, t, '0', 'major_drop')} | {cell(results, t, LATE, 'minor_drop')} | "
                         f"{cell(results, t, LATE, 'major_drop')} |")
    gen = {k: [res["generation"] for res in v if "generation" in res] for k, v in rows.items()}
    if any(gen.values()):
        lines += ["", "At generation: DDIM samples with the late channels closed versus all open (drops = open − "
                  "closed):", "", "| arm | n | late channels | minor_present open | minor_present drop | "
                  "minor_amplitude_excess drop | major_present drop |", "|---|---|---|---|---|---|---|"]
        for k, g in gen.items():
            if g:
                lines.append(f"| {label[k]} | {len(g)} | {g[0]['channels']} | "
                             f"{interval_cell([x['open']['minor_present'] for x in g])} | "
                             + " | ".join(interval_cell([x["drop"][m] for x in g]) for m in
                                          ("minor_present", "minor_amplitude_excess", "major_present")) + " |")
    if plot_folder is not None and _attribution_plot(rows, label, ts, plot_folder):
        lines += ["", "![attribution](plots/attribution.png)"]
    return lines + [""]


def _attribution_plot(rows: dict, label: dict, ts: list[int], folder) -> bool:
    """Minor and major recovery drops of the late channels per arm (mean over seeds, one panel per t)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from pathlib import Path

    fig, axes = plt.subplots(1, len(ts), figsize=(3.2 * len(ts), 3.4), squeeze=False)
    for ax, t in zip(axes[0], ts, strict=True):
        names, minor, major = [], [], []
        for k, results in rows.items():
            vals = [res["ablation"][str(t)][LATE] for res in results
                    if str(t) in res["ablation"] and LATE in res["ablation"][str(t)]]
            if vals:
                names.append(label[k].replace(" (null: random groups of ", "\nnull~").replace("'s sizes)", ""))
                minor.append(sum(v["minor_drop"] for v in vals) / len(vals))
                major.append(sum(v["major_drop"] for v in vals) / len(vals))
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], minor, 0.4, label="minor drop")
        ax.bar([i + 0.2 for i in x], major, 0.4, label="major drop")
        ax.set_xticks(list(x), names, rotation=60, fontsize=6)
        ax.set_title(f"late channels closed, t = {t}", fontsize=8)
        ax.axhline(0, color="k", lw=0.5)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    Path(folder).mkdir(parents=True, exist_ok=True)
    fig.savefig(Path(folder) / "attribution.png", dpi=90)
    plt.close(fig)
    return True


# ----- command line (scripts/attribute_channels.py) -----

def markdown(name: str, result: dict) -> list[str]:
    """One table row per (t, group): recovery drops, selectivity and gradient × activation."""
    lines = [f"### {name} ({result['location']}, {result['gated_channels']} gated channels"
             + (f", null: {result['null_repeats']} random draws" if "null_repeats" in result else "") + ")", "",
             "| t | group (channels) | r_minor drop | r_major drop | minor/major drop | grad×act minor | "
             "grad×act major |", "|---|---|---|---|---|---|---|"]
    for t in result["ts"]:
        row, grads = result["ablation"][t], result["gradient_activation"][t]
        lines.append(f"| {t} | all open | r_minor {row['open']['minor']:.3f} | r_major {row['open']['major']:.3f} "
                     f"| | | |")
        for g, size in result["groups"].items():
            d, ga = row[g], grads[g]
            sel = "—" if d["selectivity"] is None else f"{d['selectivity']:.2f}"
            lines.append(f"| {t} | {g} ({size}) | {d['minor_drop']:.3f} | {d['major_drop']:.3f} | {sel} | "
                         f"{ga['minor']:.3g} | {ga['major']:.3g} |")
    gen = result.get("generation")
    if gen:
        lines += ["", f"At generation, {gen['channels']} late-born channels closed: "
                  + ", ".join(f"{k} {gen['open'][k]:.3f} → {gen['closed'][k]:.3f}" for k in gen["drop"])]
    return lines + [""]


def main(argv=None) -> int:
    import argparse
    from pathlib import Path

    from ..training.checkpoint import load_network

    p = argparse.ArgumentParser(description="Attribute a twoscale network's minor/major recovery to channel "
                                            "groups (CS birth groups, or random groups as the null).")
    p.add_argument("run", help="run directory or checkpoint (the EMA network is used)")
    p.add_argument("--like", metavar="CS_RUN", help="for a network without gates: take the group sizes (and "
                                                    "location) of this CS run's birth groups")
    p.add_argument("--location", choices=sorted(GATED_MODEL_NAMES), help="gate location for a network "
                                                                         "without gates (default: --like's)")
    p.add_argument("--ts", type=int, nargs="+", default=list(DEFAULT_TS), help="probe timesteps")
    p.add_argument("--n", type=int, default=256, help="held-out images per probe")
    p.add_argument("--num-samples", type=int, default=256, help="samples of the generation ablation (0 = off)")
    p.add_argument("--sample-steps", type=int, default=25, help="DDIM steps of those samples")
    p.add_argument("--null-repeats", type=int, default=4, help="random group draws for the null")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT", help="write the result here (default RUN/attribution.json)")
    args = p.parse_args(argv)
    net = load_network(args.run)
    if net.config.dataset.name != "twoscale":
        raise UserError(f"{args.run} was trained on '{net.config.dataset.name}'; attribution needs twoscale's "
                        f"known templates")
    sizes, location = None, args.location
    if args.like:
        ref, ref_location = gated_network(load_network(args.like))
        groups = birth_groups(ref)
        if not groups:
            raise UserError(f"--like {args.like} has no birth groups; pass a mode-CS run")
        sizes, location = [int(c.sum()) for c in groups.values()], location or ref_location
    elif not hasattr(net.model, "channel_mask"):
        raise UserError(f"{args.run} has no channel gates (not mode CS); pass --like CS_RUN for the group sizes")
    result = attribute(net, location=location, sizes=sizes, ts=args.ts, n=args.n, seed=args.seed,
                       null_repeats=args.null_repeats, num_samples=args.num_samples, sample_steps=args.sample_steps)
    run = Path(args.run)
    out = Path(args.json) if args.json else (run if run.is_dir() else run.parent.parent) / "attribution.json"
    out.write_text(json.dumps(result, indent=2))
    print("\n".join(markdown(str(args.run), result)))
    print(f"json: {out}")
    return 0
