"""A small CNN classifier trained here, whose penultimate features define the ``fd_classifier`` metric.

This is *not* FID: the features come from a network trained on the evaluated dataset itself (so it sees what
separates its classes), not from the ImageNet Inception. Numbers are comparable only between evaluations
that use the same weights file (same architecture, data, seed and training length).

Weights file (``torch.save``, loads with ``weights_only=True``): ``{"format": FORMAT, "version": 1,
"state_dict": {…tensors…}, "meta": {…JSON-able…}}``; ``meta`` holds the architecture arguments, the class
names, the image shape, the training and test counts and the test accuracy, the data description and the
training time.

Data: a class-subfolder tree ``root/{train,test}/<class>/*.{png,jpg,…}`` (class = folder name, sorted),
read by :func:`class_folder_images` — self-contained here, so it can later be replaced by a labelled
dataset's own labels.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..atomic import atomic_write
from ..errors import UserError

FORMAT = "ddpm-curriculum-feature-net"
VERSION = 1


class FeatureNet(nn.Module):
    """Three conv stages (width w, 2w, 4w; each conv-BN-ReLU ×2 then 2×2 max-pool), global average pool,
    Linear → ReLU to ``feature_dim`` (the penultimate features), Linear to the classes.

    Input: float [B, C, H, W] in [−1, 1]. ``features(x)`` → [B, feature_dim]; ``forward(x)`` → logits.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.config = {"in_channels": in_channels, "num_classes": num_classes, "width": width,
                       "feature_dim": feature_dim}
        layers, c = [], in_channels
        for w in (width, 2 * width, 4 * width):
            for _ in range(2):
                layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                c = w
            layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(c, feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def to_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, C] → float [B, C, H, W] in [−1, 1] (the scaling the diffusion models use)."""
    x = torch.as_tensor(np.ascontiguousarray(images))
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ----- data: a class-subfolder tree -----

def class_folder_images(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """All images of ``root/split/<class>/`` → (uint8 [N, H, W, C], int64 labels [N], class names)."""
    from PIL import Image

    from ..data.images import IMAGE_ERRORS, IMAGE_EXTENSIONS

    folder = Path(root) / split
    if not folder.is_dir():
        raise UserError(f"{folder} not found; pass --data-root with {split}/<class>/ image folders")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise UserError(f"{folder} has {len(classes)} class folder(s); a classifier needs at least 2 "
                        f"({split}/<class>/*.png)")
    images, labels, shape = [], [], None
    for label, name in enumerate(classes):
        files = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        for path in files:
            try:
                with Image.open(path) as im:
                    arr = np.asarray(im if im.mode == "L" else im.convert("RGB"))
            except IMAGE_ERRORS as exc:
                raise UserError(f"cannot read image {path} ({type(exc).__name__}); remove or replace the file") \
                    from None
            arr = arr[..., None] if arr.ndim == 2 else arr
            if shape is None:
                shape = arr.shape
            elif arr.shape != shape:
                raise UserError(f"image {path} has shape {arr.shape[:2]}x{arr.shape[2]} but the others "
                                f"{shape[:2]}x{shape[2]}; all images must have one size")
            images.append(arr)
            labels.append(label)
    if not images:
        raise UserError(f"no images in the class folders of {folder}")
    return np.stack(images), np.asarray(labels, np.int64), classes


# ----- weights file -----

def save_feature_net(path: str | Path, model: FeatureNet, meta: dict) -> Path:
    """Write the state dict and ``meta`` (must be JSON-able) atomically."""
    meta = json.loads(json.dumps({**meta, "arch": model.config}))  # fails loudly on anything not JSON-able
    state = {"format": FORMAT, "version": VERSION,
             "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "meta": meta}
    buf = io.BytesIO()
    torch.save(state, buf)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda f: f.write(buf.getvalue()))


def load_feature_net(path: str | Path) -> tuple[FeatureNet, dict]:
    """(model in eval mode on the CPU, meta) from a file written by :func:`save_feature_net`."""
    path = Path(path)
    fix = "train one with scripts/train_feature_net.py"
    if not path.is_file():
        raise UserError(f"feature net not found: {path}; pass the file scripts/train_feature_net.py wrote")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"cannot read feature net {path} ({type(exc).__name__}); {fix}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not a feature-net file (no format '{FORMAT}'); {fix}")
    if state.get("version") != VERSION:
        raise UserError(f"{path} has feature-net version {state.get('version')}, this code reads {VERSION}; {fix}")
    meta = state["meta"]
    try:
        model = FeatureNet(**meta["arch"])
        model.load_state_dict(state["state_dict"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise UserError(f"{path}: weights do not match the stored architecture ({type(exc).__name__}); {fix}") \
            from None
    return model.eval(), meta


class FeatureExtractor(nn.Module):
    """The feature net behind eval.py's Inception interface (``evaluation.features.extract_features``):
    takes float [B, 3, H, W] in [0, 1] (grayscale expanded to 3 equal channels) and returns
    ``{dims: features}``; checks the image size against the one it was trained on."""

    def __init__(self, model: FeatureNet, meta: dict, source: str):
        super().__init__()
        self.model, self.meta, self.source = model, meta, source
        self.dims = model.config["feature_dim"]

    def check_shape(self, shape_hwc, what: str) -> None:
        want = tuple(self.meta["image_shape_hwc"])
        if tuple(shape_hwc) != want:
            raise UserError(f"{what} are {shape_hwc[1]}x{shape_hwc[0]}x{shape_hwc[2]} but feature net "
                            f"{self.source} was trained on {want[1]}x{want[0]}x{want[2]}; use a feature net "
                            f"trained on images of this size")

    def forward(self, x: torch.Tensor, dims=None) -> dict:
        c = self.model.config["in_channels"]
        return {self.dims: self.model.features(x[:, :c] * 2.0 - 1.0)}


def fd_kid(fake_stats, fake_kept, real_stats, real_kept, kid_subsets: int = 100, kid_subset_size: int = 1000) -> dict:
    """fd_classifier and KID from two sides' FeatureStats and kept feature rows (metrics/fid.py's functions)."""
    from .fid import frechet_distance, kernel_inception_distance

    (mu1, sigma1), (mu2, sigma2) = fake_stats.mean_cov(), real_stats.mean_cov()
    kid, kid_std = kernel_inception_distance(np.asarray(fake_kept), np.asarray(real_kept), kid_subsets,
                                             kid_subset_size, seed=0)
    return {"fd_classifier": frechet_distance(mu1, sigma1, mu2, sigma2), "kid_classifier": kid,
            "kid_classifier_std": kid_std}


@torch.no_grad()
def local_features(model: FeatureNet, source, batch_size: int = 256, device="cpu", keep: int = 10000):
    """Single-process features of an image source (``len``, ``load``) → (FeatureStats, kept rows [≤ keep, d]).
    eval.py uses the sharded ``evaluation.features.extract_features`` instead; this one serves the in-process
    evaluations (eval.json, experiment grids), which run on one rank."""
    from .fid import FeatureStats

    stats, kept = FeatureStats(model.config["feature_dim"], device), []
    for lo in range(0, len(source), batch_size):
        feats = model.features(to_input(source.load(range(lo, min(len(source), lo + batch_size)))).to(device))
        stats.update(feats)
        if sum(len(k) for k in kept) < keep:
            kept.append(feats.float().cpu())
    return stats, torch.cat(kept)[:keep].numpy()


# ----- training -----

def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and ±4-pixel translations (zero padding): x [B, C, H, W]."""
    flip = torch.rand(x.shape[0], generator=g) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    pad = 4
    padded = nn.functional.pad(x, (pad, pad, pad, pad))
    dy, dx = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=g))
    return padded[:, :, dy:dy + x.shape[2], dx:dx + x.shape[3]]


@torch.no_grad()
def accuracy(model: FeatureNet, images: np.ndarray, labels: np.ndarray, batch_size: int = 500) -> float:
    model.eval()
    correct = 0
    for lo in range(0, len(images), batch_size):
        logits = model(to_input(images[lo:lo + batch_size]))
        correct += int((logits.argmax(1).numpy() == labels[lo:lo + batch_size]).sum())
    return correct / len(images)


def train_feature_net(root: str | Path, out: str | Path, minutes: float = 5.0, max_epochs: int = 30,
                      batch_size: int = 128, lr: float = 2e-3, width: int = 32, feature_dim: int = 128,
                      seed: int = 0, log=print) -> dict:
    """Train on ``root/train``, measure accuracy on ``root/test``, save to ``out``; returns the meta.

    Stops after ``max_epochs`` epochs or at the first epoch end past ``minutes`` of training (Adam, cosine
    learning rate over the epochs planned from the first epoch's speed, flips and translations)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    train_x, train_y, classes = class_folder_images(root, "train")
    test_x, test_y, test_classes = class_folder_images(root, "test")
    if test_classes != classes:
        raise UserError(f"{root}: train classes {classes} differ from test classes {test_classes}; use one set "
                        f"of class folders")
    if test_x.shape[1:] != train_x.shape[1:]:
        raise UserError(f"{root}: test images are {test_x.shape[1:]} but train images {train_x.shape[1:]}")
    load_sec = time.perf_counter() - start
    model = FeatureNet(train_x.shape[-1], len(classes), width, feature_dim)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = (len(train_x) + batch_size - 1) // batch_size
    labels = torch.from_numpy(train_y)
    t0, epochs, planned = time.perf_counter(), 0, max_epochs
    while epochs < planned:
        model.train()
        order = torch.randperm(len(train_x), generator=g)
        for step in range(steps_per_epoch):
            frac = (epochs * steps_per_epoch + step) / (planned * steps_per_epoch)
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + np.cos(np.pi * min(frac, 1.0)))
            idx = order[step * batch_size:(step + 1) * batch_size]
            x = _augment(to_input(train_x[idx.numpy()]), g)
            loss = nn.functional.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        epochs += 1
        elapsed = time.perf_counter() - t0
        if epochs == 1:  # plan the cosine schedule over the epochs that fit the time budget
            planned = max(1, min(max_epochs, int(minutes * 60 // elapsed)))
        log(f"epoch {epochs}/{planned}: loss {loss.item():.3f}, {elapsed:.0f} s")
    train_sec = time.perf_counter() - t0
    test_acc = accuracy(model, test_x, test_y)
    meta = {"classes": classes, "image_shape_hwc": list(train_x.shape[1:]), "num_train": len(train_x),
            "num_test": len(test_x), "test_accuracy": test_acc,
            "data": {"root": str(Path(root).resolve()), "layout": "train|test/<class>/<image>"},
            "training": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
                         "augment": "flip + 4px translate", "train_sec": round(train_sec, 1),
                         "load_sec": round(load_sec, 1), "threads": torch.get_num_threads()},
            "note": "fd_classifier features (penultimate layer); not FID, comparable only with this file"}
    save_feature_net(out, model, meta)
    log(f"test accuracy {test_acc:.4f} on {len(test_x)} images; {epochs} epochs in {train_sec:.0f} s → {out}")
    return meta


def main(argv=None) -> int:
    """``scripts/train_feature_net.py``."""
    import argparse

    from ..errors import check_output_file

    p = argparse.ArgumentParser(description="Train the small CNN classifier whose penultimate features the "
                                            "eval.py fd_classifier metric uses (not FID).")
    p.add_argument("--data-root", required=True, help="folder with train/<class>/ and test/<class>/ images")
    p.add_argument("--out", required=True, help="weights file to write (.pt)")
    p.add_argument("--minutes", type=float, default=5.0, help="training time budget (default 5)")
    p.add_argument("--max-epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--width", type=int, default=32, help="channels of the first stage (then 2x, 4x)")
    p.add_argument("--feature-dim", type=int, default=128, help="size of the penultimate features")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("max_epochs", "batch_size", "width", "feature_dim"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be ≥ 1")
    if not args.minutes > 0 or not args.lr > 0:
        raise UserError("--minutes and --lr must be > 0")
    check_output_file(args.out, "--out")
    train_feature_net(args.data_root, args.out, args.minutes, args.max_epochs, args.batch_size, args.lr,
                      args.width, args.feature_dim, args.seed, log=lambda m: print(m, flush=True))
    return 0
