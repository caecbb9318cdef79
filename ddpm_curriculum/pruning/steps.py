"""The steps of ``prune.py`` besides pruning itself (``prune.py STEP [options]``; each has its own ``--help``).

    prune.py baseline_loss --original_model DENSE --initial_mask_path MASKS [--targets all] [--output_dir D]
        seed 003's inference_loss_diffusion.py: losses of the dense network with the masks (``baseline.py``)
    prune.py export --format diffusers --model_path NET --save_path DIR
        a diffusers UNet2DModel folder (``models/export.py``)
"""

from __future__ import annotations

import argparse

from .cli import _add


def _network_options(p: argparse.ArgumentParser, *names: str, help: str) -> None:
    _add(p, *names, dest="model_path", required=True, help=help)
    _add(p, "--no_ema", action="store_true", help="the raw weights instead of the EMA weights")
    p.add_argument("--dataset", help="dataset of an imported ddpm-torch/diffusers network (default cifar10)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override the loaded network's config (e.g. model.norm_eps=1e-5)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")


def baseline_loss_main(argv) -> int:
    from .. import dist
    from ..training import builders
    from .baseline import TARGETS, baseline_losses, save_loss_arrays, target_masks
    from .cli import load_source_network
    from .masks import apply_masks, load_masks

    p = argparse.ArgumentParser(prog="prune.py baseline_loss",
                                description="Diffusion loss of the original (dense) network with the extracted "
                                            "masks applied, as .npy arrays (seed 003's inference_loss_diffusion.py)")
    _network_options(p, "--original_model", "--model_path", help="the ORIGINAL dense network (not the pruned one)")
    _add(p, "--initial_mask_path", "--masks", required=True,
         help="a mask folder ({layer_name}.pt files, prune.py --output_dir) or a masks.pt")
    _add(p, "--targets", choices=list(TARGETS), default="all", help="apply only the masks under this block")
    _add(p, "--dataset_size", type=int, help="first N training images (default: all)")
    _add(p, "--batch_size", type=int, default=64)
    _add(p, "--max_batches", type=int, help="at most this many batches")
    p.add_argument("--seed", type=int, default=0, help="seed of the timesteps and noise of every batch")
    _add(p, "--output_dir", default="baseline_losses", help="where the .npy arrays and summary.json go")
    args = p.parse_args(argv)
    device = dist.init(args.device)
    net = load_source_network(args)
    masks = target_masks(load_masks(args.initial_mask_path), args.targets)
    model = net.model.cpu()
    apply_masks(model, masks)  # ORIGINAL_MODEL + EXTRACTED_MASK
    dataset = builders.make_dataset(net.config)
    size = len(dataset) if args.dataset_size is None else args.dataset_size
    print(f"{net.source} ({net.weights} weights) with {len(masks)} masks ({args.targets}); loss of up to "
          f"{size} images of {net.config.dataset.name}, batch {args.batch_size} on {device}")
    arrays = baseline_losses(net.diffusion, model.to(device), dataset, size, args.batch_size, args.max_batches,
                             args.seed, device)
    info = {"original_model": str(net.source), "weights": net.weights, "masks": str(args.initial_mask_path),
            "targets": args.targets, "masked_layers": len(masks), "dataset": net.config.dataset.name,
            "dataset_size": size, "batch_size": args.batch_size, "max_batches": args.max_batches, "seed": args.seed}
    summary = save_loss_arrays(args.output_dir, arrays, info)
    print(f"baseline loss {summary['mean']:.6g} ± {summary['std']:.3g} over {summary['num_samples']} samples "
          f"({summary['num_batches']} batches); wrote {args.output_dir}/"
          + ", ".join([*summary["files"].values(), "summary.json"]))
    return 0


def export_main(argv) -> int:
    from ..models.export import EXPORTERS, WEIGHTS_FORMATS
    from ..training import builders
    from .cli import load_source_network

    p = argparse.ArgumentParser(prog="prune.py export", description="Export a network to another library's format")
    p.add_argument("--format", choices=sorted(EXPORTERS), default="diffusers",
                   help="diffusers: a UNet2DModel save_pretrained folder")
    _network_options(p, "--model_path", help="run dir / checkpoint / pruned.pt / nm_compact.pt / ddpm-torch .pt")
    _add(p, "--save_path", required=True, help="output folder")
    _add(p, "--weights_format", choices=WEIGHTS_FORMATS,
         help="default: safetensors when the safetensors package is installed, else bin")
    args = p.parse_args(argv)
    net = load_source_network(args)
    if net.masks:
        print(f"note: {net.source} is pruned ({len(net.masks)} masked layers); its zeros are exported as weights, "
              f"the masks themselves are not part of a {args.format} folder")
    res = EXPORTERS[args.format](net.model.cpu(), net.config.to_dict()["model"], net.config.to_dict()["diffusion"],
                                 builders.image_shape(net.config)[1], args.save_path, args.weights_format)
    files = ["config.json", res["weights"]] + (["scheduler_config.json"] if res["scheduler"] else [])
    print(f"wrote {res['dir']}: {', '.join(files)} ({res['tensors']} tensors); load it with "
          f"diffusers.UNet2DModel.from_pretrained({res['dir']!r})"
          + ("" if res["scheduler"] else f"; no scheduler_config.json: {res['scheduler_note']}"))
    return 0


STEPS = {"baseline_loss": baseline_loss_main, "export": export_main}
