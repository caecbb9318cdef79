"""Command line of ``prune.py``: prune a trained DDPM, or extract the masks of a pruned one.

    python prune.py --method magnitude --model_path runs/quickstart-… --save_path runs/pruned --pruning_ratio 0.5
    python prune.py --method structured --criterion taylor --model_path runs/quickstart-… --save_path runs/struct
    python prune.py --method nm --n 2 --m 4 --model_path google-ddpm-cifar10-32/ --save_path runs/nm24
    python prune.py --method extract --model_path runs/finetune-… --save_path runs/final --n 2 --m 4
    python prune.py extract --model_path runs/pruned --output_dir initial_mask_diffusion     # seed 003 layout
    python prune.py baseline_loss --original_model ddpm-cifar10-32 --initial_mask_path initial_mask_diffusion
    python prune.py export --format diffusers --model_path runs/final/pruned.pt --save_path runs/final_diffusers

Writes into ``--save_path``: ``pruned.pt`` (a normal checkpoint whose pruned weights are 0, plus its
``masks``), ``masks.pt`` (``{layer_name: bool}``, True = kept), ``pruning_stats.json``, ``nm_compact.pt``
(kept values + index patterns, when every mask is N:M), ``preview.png``, and for ``twoscale`` models the
oracle metrics before (``eval_original.json``) and after (``eval.json``) pruning; with ``--mask_dir`` (seed 003's
``--output_dir``) also one ``{layer_name}.pt`` per mask and ``extraction_summary.txt``. ``--method structured``
writes a smaller network instead (``pruned.pt`` without masks, its config's ``model.widths`` recording the
pruned widths; ``structured.py``), with the same stats, preview and evaluation files. The first argument may
name a step instead: a method (``prune.py extract …`` = ``--method extract``) or one of ``STEPS``
(``baseline_loss``, ``export``: see ``steps.py``).
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import torch

from ..atomic import atomic_write
from ..config import config_from_dict
from ..errors import UserError
from ..sampling import sampler_spec, spec_from_sample_steps
from ..training.checkpoint import FORMAT_VERSION, atomic_torch_save, load_network
from ..training.reporting import evaluate_samples, save_grid
from .magnitude import SCOPES, magnitude_masks, random_masks
from .masks import (DEFAULT_PROTECT, apply_masks, masks_from_nonzero, save_mask_dir, save_masks, select_layers,
                    sparsity_summary)
from .nm import NM_ORDERS, check_nm, export_compact, nm_eligible, nm_mask
from .structured import CRITERIA as STRUCTURED_CRITERIA
from .structured import DEFAULT_TAYLOR_THRESHOLD


def _magnitude(layers, args):
    return magnitude_masks(layers, args.pruning_ratio, args.scope)


def _random(layers, args):
    return random_masks(layers, args.pruning_ratio, args.seed)


def _nm(layers, args):
    return {name: nm_mask(m.weight, args.n, args.m, args.nm_order) for name, m in layers.items()}


def _extract(layers, args):
    return masks_from_nonzero(layers)


def prune_structured(out: Path, net, args) -> dict:
    """``--method structured``: a smaller network in ``pruned.pt`` (no masks); returns the statistics."""
    from .structured import StructuredOptions, calibration_batch, prune_network

    if args.layers:
        raise UserError("--layers selects layers for mask pruning; structured pruning removes coupled channel "
                        "groups across layers: drop --layers (use --protect to keep a layer's channels)")
    default = () if args.no_default_protect else DEFAULT_PROTECT
    opts = StructuredOptions(args.pruning_ratio, args.criterion, args.norm, args.scope,
                             tuple(args.protect) + tuple(default), args.seed)
    opts.check()
    calib = calibration_batch(net.config, args.calib_samples, args.seed) if args.criterion == "taylor" else None
    model, cfg_dict, stats = prune_network(net, opts, calib, args.taylor_threshold)
    state = {"format_version": FORMAT_VERSION, "config": cfg_dict, "model": model.state_dict(), "ema": None,
             "step": net.step, "pruning": {k: stats[k] for k in ("method", "criterion", "pruning_ratio", "scope",
                                                                 "source", "weights")}}
    atomic_torch_save(out / "pruned.pt", state)
    net.model, net.config = model, config_from_dict(cfg_dict)
    return stats


# load_network formats that store no dataset (CIFAR-10 is assumed unless --dataset says otherwise)
IMPORTED_FORMATS = ("ddpm-torch", "diffusers")
# method → masks from the chosen {name: layer} (and the parsed arguments)
METHODS = {"magnitude": _magnitude, "random": _random, "nm": _nm, "extract": _extract}
# methods that change the architecture instead of masking weights: method → (out, net, args) → stats
PIPELINES = {"structured": prune_structured}


def _add(p, *names, **kw):
    """One option under both spellings (seed 003 uses --model_path; --model-path works too)."""
    spellings = []
    for n in names:
        spellings += [n, n.replace("_", "-")] if "_" in n else [n]
    p.add_argument(*dict.fromkeys(spellings), **kw)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Prune a trained DDPM (magnitude, random, N:M) or extract the masks "
                                            "of a pruned one. See README.md, 'Pruning'. Other steps: "
                                            "prune.py baseline_loss --help, prune.py export --help.")
    p.add_argument("--method", choices=sorted({*METHODS, *PIPELINES}), help="default magnitude (or --pruner)")
    p.add_argument("--pruner", choices=["magnitude", "random"], help="seed 003 spelling of --method")
    _add(p, "--pruning_method", choices=sorted(STRUCTURED_CRITERIA), help="seed 004's stage 1 (Diff-Pruning): "
         "= --method structured --criterion PRUNING_METHOD")
    _add(p, "--model_path", required=True, help="run dir / checkpoint / pruned.pt / ddpm-torch .pt / diffusers folder")
    _add(p, "--save_path", help="output directory (default: --output_dir)")
    _add(p, "--mask_dir", "--output_dir", help="also write one {layer_name}.pt mask per layer and "
         "extraction_summary.txt here (seed 003's get_mask_diffusion.py --output_dir)")
    _add(p, "--pruning_ratio", type=float, default=0.5, help="share of weights set to 0 (magnitude, random); "
         "structured: share of each coupled channel group removed")
    p.add_argument("--scope", choices=SCOPES, default="layer", help="magnitude: ratio per layer or over all "
                   "layers; structured: per channel group or ranked over all groups")
    p.add_argument("--criterion", choices=sorted(STRUCTURED_CRITERIA),
                   help="structured: channel-group importance (default magnitude; taylor = Diff-Pruning's)")
    p.add_argument("--norm", type=int, default=2, help="structured magnitude: L1 (1) or L2 (2) norm")
    _add(p, "--calib_samples", type=int, default=64, help="structured taylor: training images in the batch")
    _add(p, "--taylor_threshold", type=float, default=DEFAULT_TAYLOR_THRESHOLD,
         help="structured taylor: sum gradients over t = 0, 1, … until L_t < this × max L (Diff-Pruning: 0.05)")
    p.add_argument("--n", type=int, default=2, help="N of N:M (nm; compliance reported for every method)")
    p.add_argument("--m", type=int, default=4, help="M of N:M")
    _add(p, "--nm_order", choices=NM_ORDERS, default="asp", help="asp: groups along input channels per kernel "
         "tap (sparse cuDNN layout); im2col: along C_in·kh·kw")
    p.add_argument("--protect", action="append", default=[], metavar="REGEX", help="also protect these layers")
    _add(p, "--no_default_protect", action="store_true", help="do not protect in_conv, out_conv, embed, class_emb")
    p.add_argument("--layers", action="append", default=[], metavar="REGEX", help="only prune these layers")
    _add(p, "--no_ema", action="store_true", help="prune the raw weights instead of the EMA weights")
    p.add_argument("--dataset", help="dataset of an imported ddpm-torch/diffusers network (default cifar10); "
                                     "a network of this project keeps the dataset it was trained on")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override the loaded network's config (e.g. dataset.image_size=64)")
    p.add_argument("--seed", type=int, default=0, help="random pruner seed")
    p.add_argument("--device", help="cpu, cuda or cuda:N for sampling (default: cuda when available)")
    _add(p, "--batch_size", type=int, default=256, help="sampling batch size")
    _add(p, "--eval_samples", type=int, help="twoscale: samples for the oracle metrics (default eval.num_samples)")
    _add(p, "--preview_samples", type=int, default=16, help="images in preview.png (0: none)")
    _add(p, "--sample_steps", type=int, help="DDIM steps for preview/eval, 0 = ancestral (default: the network's "
                                             "config, its sampler block or train.sample_steps)")
    args = p.parse_args(argv)
    given = {flag: v for flag, v in (("--method", args.method), ("--pruner", args.pruner),
                                     ("--pruning_method", args.pruning_method and "structured")) if v}
    if len(set(given.values())) > 1:
        (f1, v1), (f2, v2) = [(f, v) for f, v in given.items()][:2]
        v2 = args.pruning_method if f2 == "--pruning_method" else v2
        raise UserError(f"{f1} {v1} conflicts with {f2} {v2}; give one of them")
    if args.pruning_method and args.criterion not in (None, args.pruning_method):
        raise UserError(f"--pruning_method {args.pruning_method} conflicts with --criterion {args.criterion}; "
                        f"give one of them")
    args.method = next(iter(given.values()), "magnitude")
    args.criterion = args.criterion or args.pruning_method or "magnitude"
    if args.mask_dir and args.method in PIPELINES:
        raise UserError(f"--mask_dir writes masks, but --method {args.method} removes channels instead of masking "
                        f"them; drop --mask_dir (or use --save_path)")
    args.save_path = args.save_path or args.mask_dir
    if not args.save_path:
        raise UserError("prune.py needs --save_path DIR (or --output_dir DIR, seed 003's mask folder)")
    check_nm(args.n, args.m, args.nm_order)
    return args


def choose_layers(model, args) -> tuple[dict, dict]:
    """The layers the method works on, and {name: why skipped} for the other Conv2d/Linear layers."""
    # extract reads whatever was pruned, so it protects only what the user asks to
    default = () if args.no_default_protect or args.method == "extract" else DEFAULT_PROTECT
    protect = list(args.protect) + list(default)
    layers, skipped = select_layers(model, include=args.layers, protect=protect)
    if args.method == "nm":
        for name in [k for k, v in layers.items() if not nm_eligible(v.weight.shape, args.m, args.nm_order)]:
            skipped[name] = f"not N:M eligible (grouped dimension not a multiple of {args.m})"
            del layers[name]
    return layers, skipped


def export_nm(path: Path, model, masks, args, cfg, step) -> dict | None:
    """``nm_compact.pt`` next to the pruned checkpoint, and its size against the dense weights."""
    obj, dense_layers = export_compact(model.state_dict(), masks, args.n, args.m, args.nm_order, cfg.to_dict(), step)
    if not obj["nm"]:
        return {"file": None, "note": f"no layer is {args.n}:{args.m}; nothing to export compactly"}
    atomic_torch_save(path, obj)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return {"file": path.name, "compact_bytes": path.stat().st_size, "dense_bytes": buf.tell(),
            "compact_over_dense": path.stat().st_size / buf.tell(), "layers_kept_dense": dense_layers}


def evaluate(net, args, model, out: Path, device) -> dict | None:
    """Oracle metrics of ``model`` when the network was trained on twoscale (same seed and count every time)."""
    cfg = net.config
    n = cfg.eval.num_samples if args.eval_samples is None else args.eval_samples
    if cfg.dataset.name != "twoscale" or n == 0:
        return None
    from ..training import builders

    overrides, raw = [f"eval.num_samples={n}", f"eval.batch_size={args.batch_size}"], cfg.to_dict()
    if args.sample_steps is not None:  # replaces the network's sampler, block included
        overrides.append(f"train.sample_steps={args.sample_steps}")
        raw["sampler"] = {}
    ecfg = config_from_dict(raw, overrides)
    return evaluate_samples(ecfg, net.diffusion, model.to(device), builders.make_dataset(ecfg), device, out,
                            net.step)["metrics"]


def preview(net, args, model, path: Path, device) -> None:
    if args.preview_samples <= 0:
        return
    from ..training import builders

    # images 0 … n−1 of generate.py --seed args.seed with the sampler of --sample_steps, else the network's own
    # (its config's sampler block, or train.sample_steps)
    spec = sampler_spec(net.config) if args.sample_steps is None else spec_from_sample_steps(args.sample_steps)
    save_grid(net.diffusion, model.to(device), spec, args.seed, args.preview_samples,
              builders.image_shape(net.config), path, device, args.batch_size)


def prune(net, args) -> tuple[dict, dict]:
    """Masks chosen by ``args.method``, applied to ``net.model`` in place → (masks, statistics)."""
    model = net.model.cpu()
    layers, skipped = choose_layers(model, args)
    masks = METHODS[args.method](layers, args)
    if not masks:
        raise UserError(f"--method {args.method} found nothing to prune in {args.model_path}"
                        + (" (no weight is zero: is it a pruned network?)" if args.method == "extract" else ""))
    apply_masks(model, masks)
    stats = sparsity_summary(model, masks, args.n, args.m, args.nm_order)
    stats.update(method=args.method, source=str(net.source), source_format=net.format, weights=net.weights,
                 pruning_ratio=args.pruning_ratio if args.method in ("magnitude", "random") else None,
                 scope=args.scope if args.method == "magnitude" else None, skipped=skipped)
    return masks, stats


def save_pruned(out: Path, net, masks: dict, stats: dict, args) -> None:
    """``pruned.pt`` (a plain checkpoint with zeros, plus masks), ``masks.pt`` and, if N:M, ``nm_compact.pt``."""
    info = {k: stats[k] for k in ("method", "source", "weights", "pruning_ratio", "scope")}
    state = {"format_version": FORMAT_VERSION, "config": net.config.to_dict(), "model": net.model.state_dict(),
             "ema": None, "step": net.step, "masks": masks,
             "pruning": dict(info, n=args.n, m=args.m, order=args.nm_order)}
    atomic_torch_save(out / "pruned.pt", state)
    save_masks(out / "masks.pt", masks)
    if all(v["nm_compliance"] == 1.0 for v in stats["layers"].values()):
        stats["export"] = export_nm(out / "nm_compact.pt", net.model, masks, args, net.config, net.step)
    else:
        stats["export"] = {"file": None, "note": f"masks are not all {args.n}:{args.m}; no compact export"}


def load_source_network(args):
    """``args.model_path`` (EMA weights unless ``args.no_ema``, ``--set`` overrides), with ``--dataset`` naming
    the dataset of an imported network."""
    net = load_network(args.model_path, use_ema=not args.no_ema, overrides=args.overrides)
    if args.dataset and args.dataset != net.config.dataset.name:
        if net.format not in IMPORTED_FORMATS:  # its config names the dataset it was trained on
            raise UserError(f"--dataset {args.dataset}, but {net.source} was trained on "
                            f"'{net.config.dataset.name}' (its stored config says so); --dataset only names the "
                            f"dataset of an imported ddpm-torch/diffusers network: drop it")
        net = load_network(args.model_path, use_ema=not args.no_ema,
                           overrides=[f"dataset.name={args.dataset}", *args.overrides])
    return net


def main(argv=None) -> int:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in METHODS:  # ``prune.py extract …`` = ``prune.py --method extract …``
        argv = ["--method", *argv]
    elif argv and not argv[0].startswith("-"):
        from .steps import STEPS

        if argv[0] not in STEPS:
            raise UserError(f"unknown step {argv[0]!r}; give a method ({', '.join(sorted(METHODS))}) or a step "
                            f"({', '.join(sorted(STEPS))}) first, or options only")
        return STEPS[argv[0]](argv[1:])
    args = parse_args(argv)
    from .. import dist

    device = dist.init(args.device)  # one process: just picks the device
    net = load_source_network(args)
    out = Path(args.save_path)
    out.mkdir(parents=True, exist_ok=True)
    print(f"loaded {net.format} network from {net.source} ({net.weights} weights, step {net.step})")
    before = evaluate(net, args, net.model, out / "eval_original.json", device)
    if args.method in PIPELINES:
        stats = PIPELINES[args.method](out, net, args)
    else:
        masks, stats = prune(net, args)
        save_pruned(out, net, masks, stats, args)
        if args.mask_dir:
            save_mask_dir(args.mask_dir, masks, f"masks of {net.source} ({net.weights} weights), method "
                                                f"{args.method}: one {{layer_name}}.pt per layer, bool, True = kept")
    after = evaluate(net, args, net.model, out / "eval.json", device)
    stats["oracle_metrics"] = {"before": before, "after": after} if after is not None else None
    atomic_write(out / "pruning_stats.json", lambda f: f.write(json.dumps(stats, indent=2).encode()))
    preview(net, args, net.model, out / "preview.png", device)
    REPORTS.get(args.method, _report)(stats, out, args.mask_dir)
    return 0


def _report_structured(stats: dict, out: Path, mask_dir=None) -> None:
    b, a = stats["before"], stats["after"]
    print(f"structured ({stats['criterion']}, ratio {stats['pruning_ratio']}): {len(stats['layers'])} layers "
          f"narrowed; parameters {b['params']:,} → {a['params']:,} ({100 * stats['params_ratio']:.1f}%), "
          f"MACs per image {b['macs']:,} → {a['macs']:,} ({100 * stats['macs_ratio']:.1f}%)")
    if stats["taylor"]:
        print(f"taylor: gradients of t = 0..{stats['taylor']['timesteps_used'] - 1} "
              f"(threshold {stats['taylor']['threshold']})")
    _print_oracle_metrics(stats)
    print(f"wrote {out}/pruned.pt (a smaller network; model.widths in its config), pruning_stats.json")


REPORTS = {"structured": _report_structured}


def _print_oracle_metrics(stats: dict) -> None:
    for when, metrics in (stats["oracle_metrics"] or {}).items():
        if metrics:
            print(f"oracle metrics {when}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                                                        if k != "num_samples"))


def _report(stats: dict, out: Path, mask_dir=None) -> None:
    t = stats["totals"]
    comp = "n/a" if t["nm_compliance"] is None else f"{100 * t['nm_compliance']:.1f}%"
    print(f"{stats['method']}: {t['layers']} layers pruned to {100 * t['layer_sparsity']:.1f}% sparsity "
          f"({t['layer_kept']:,} of {t['layer_params']:,} kept); network {t['nonzeros']:,} nonzero of "
          f"{t['params']:,} parameters ({100 * t['overall_sparsity']:.1f}% zero); {t['n']}:{t['m']} compliance {comp}")
    skipped = list(stats["skipped"].items())
    if skipped:
        print(f"skipped {len(skipped)} layers: " + ", ".join(f"{k} ({v})" for k, v in skipped[:6])
              + (" …" if len(skipped) > 6 else ""))
    ex = stats["export"]
    if ex.get("file"):
        print(f"compact {t['n']}:{t['m']} export {ex['file']}: {ex['compact_bytes']:,} bytes = "
              f"{100 * ex['compact_over_dense']:.1f}% of the dense {ex['dense_bytes']:,}")
    _print_oracle_metrics(stats)
    print(f"wrote {out}/pruned.pt, masks.pt, pruning_stats.json"
          + (f"; {len(stats['layers'])} mask files in {mask_dir}" if mask_dir else ""))
