"""Generate a folder of numbered PNGs, resumably and sharded over ranks.

Layout of ``save_dir``::

    000000.png 000001.png …      image i (uint8; RGB, or L for 1-channel models), a function of (seed, i)
    generate.json                 what produced them (checkpoint, weights, sampler, seed, shape, and for
                                  class-conditional networks the classes and guidance w): a rerun with
                                  other settings is refused instead of mixing images; ``sha256``: the digest
                                  of every PNG as it was written
    generate.digests.R.jsonl      while rank R samples: the digests of its images so far (merged into
                                  generate.json at the end, or by the next run after a kill)
    samples_NxHxWxC.npz           optional: all N images, uint8 NHWC, key ``arr_0`` (ADM / ddpm-torch format)
    preview/grid.png              optional: the first images as a grid (outside the top level, so eval.py,
                                  which reads the top level only, never scores it)

Every PNG is written to a temporary name and renamed, so a killed run leaves only complete files. A rerun
keeps the PNGs whose bytes match their recorded digest and regenerates the missing, damaged and replaced ones
(a manifest from before digests: it keeps every PNG that decodes, and records their digests); since an image
depends only on (seed, i), the folder ends up identical to an uninterrupted run, for any batch size or world
size.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .. import dist
from ..atomic import atomic_write
from ..config import read_json_file
from ..data.images import IMAGE_ERRORS
from ..errors import UserError
from .guidance import image_labels
from .samplers import SamplerSpec, normalize_sampler_dict, sample_batch, to_uint8

MANIFEST = "generate.json"
# manifest entries that must match for a rerun to continue a folder (the checkpoint path may move);
# "conditioning" is null for unconditional networks, so manifests written before it existed still match
MANIFEST_KEYS = ("fingerprint", "weights", "seed", "image_shape", "sampler", "conditioning")
DIGESTS = "sha256"  # manifest key: {PNG name: sha256 of the file's bytes as written}
JOURNAL = "generate.digests.{rank}.jsonl"
PREVIEW = Path("preview") / "grid.png"
PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def sample_name(index: int) -> str:
    return f"{index:06d}.png"


def shard(indices: Sequence[int], rank: int, world: int) -> list[int]:
    """This rank's share of ``indices``: every world-th one starting at ``rank`` (balanced to ±1)."""
    return list(indices[rank::world])


def write_png(path: Path, image: np.ndarray) -> str:
    """uint8 [H, W, C] → PNG at ``path``, atomically; returns the sha256 of the bytes written. Not fsynced
    (50k files would crawl): after a power loss a damaged PNG fails its digest on resume and is regenerated."""
    import io

    img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)  # uint8 → L, RGB or RGBA
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    data = buf.getvalue()
    atomic_write(path, lambda f: f.write(data), durable=False)
    return hashlib.sha256(data).hexdigest()


def file_digest(path: Path) -> str | None:
    """sha256 of the file's bytes, or None when it cannot be read."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def read_png(path: Path, image_shape: Sequence[int]) -> np.ndarray | None:
    """The image [H, W, C] if ``path`` decodes completely with the expected size and mode, else None."""
    c, h, w = image_shape
    try:
        with Image.open(path) as im:
            if im.size != (w, h) or im.mode != PIL_MODES[c]:
                return None
            arr = np.asarray(im)  # decodes every row: a truncated file raises here
    except IMAGE_ERRORS:
        return None
    return arr[..., None] if arr.ndim == 2 else arr


def missing_indices(save_dir: Path, indices: Sequence[int], image_shape: Sequence[int],
                    digests: dict | None = None) -> tuple[list[int], list[int], dict]:
    """Which of ``indices`` must be (re)generated: (absent or without a recorded digest, present but not the
    recorded image, digests of the kept PNGs not yet recorded). ``digests`` None (a manifest from before digests): every
    PNG that decodes with the expected size and mode is kept, and its digest returned for recording."""
    missing, replaced, found = [], [], {}
    for i in indices:
        path = save_dir / sample_name(i)
        if digests is None:
            if read_png(path, image_shape) is None:
                missing.append(i)
            else:
                found[path.name] = file_digest(path)
            continue
        digest, recorded = file_digest(path), digests.get(path.name)
        if digest is None or recorded is None:  # absent, or written by a run killed before recording it
            missing.append(i)
        elif digest != recorded:
            replaced.append(i)
    return missing, replaced, found


def _read_journals(save_dir: Path) -> dict:
    """The digests that killed runs' ranks recorded (a torn last line is skipped: its image is regenerated)."""
    digests = {}
    for journal in sorted(save_dir.glob(JOURNAL.format(rank="*"))):
        for line in journal.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                digests.update({k: v for k, v in entry.items() if isinstance(k, str) and isinstance(v, str)})
    return digests


def _write_manifest(save_dir: Path, manifest: dict) -> None:
    atomic_write(save_dir / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=2).encode()))
    for journal in save_dir.glob(JOURNAL.format(rank="*")):  # merged into the manifest now
        journal.unlink(missing_ok=True)


def _prepare_dir(save_dir: Path, manifest: dict) -> tuple[str | None, dict | None]:
    """Rank 0: create ``save_dir``, refuse foreign contents, write the manifest.

    Returns (an error or None, the recorded digests, or None for a manifest from before digests).
    """
    if save_dir.exists() and not save_dir.is_dir():
        return f"--save-dir {save_dir} is a file, not a folder; choose another --save-dir", None
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot create --save-dir {save_dir} ({exc.strerror or exc}); choose a writable folder", None
    for stale in save_dir.glob(".*.tmp*"):  # left by a killed run
        stale.unlink(missing_ok=True)
    path = save_dir / MANIFEST
    digests: dict | None = {}
    if path.is_file():
        try:
            old = read_json_file(path, "manifest", MANIFEST)
            if not isinstance(old, dict):
                raise UserError(f"manifest {path} is not a JSON object")
        except UserError as exc:
            return (f"{exc}; it was not written by this version of generate.py or was edited: delete "
                    f"{save_dir} or choose another --save-dir"), None
        old = {**old, "sampler": normalize_sampler_dict(old.get("sampler"))}  # {"use_ddim": …} of older mains
        diff = [k for k in MANIFEST_KEYS if old.get(k) != manifest[k]]
        if diff:
            return (f"{save_dir} holds images generated with other settings ({', '.join(diff)} differ: "
                    f"{old.get(diff[0])} vs {manifest[diff[0]]}); choose another --save-dir"), None
        if isinstance(old.get(DIGESTS), dict):
            digests = {**old[DIGESTS], **_read_journals(save_dir)}
        else:
            digests = None
    elif any(save_dir.glob("*.png")):
        return f"{save_dir} already holds PNG files not written by generate.py; choose an empty --save-dir", None
    try:
        _write_manifest(save_dir, {**manifest, DIGESTS: digests or {}})
    except OSError as exc:
        return f"cannot write to --save-dir {save_dir} ({exc.strerror or exc}); choose a writable folder", None
    return None, digests


@dataclass
class GenerateResult:
    save_dir: Path
    num_samples: int
    generated: int  # images produced by this call (the rest existed already)
    seconds: float  # wall time of the sampling loop (slowest rank)
    npz: Path | None = None
    grid: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def images_per_sec(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else 0.0


def network_fingerprint(net) -> str:
    """sha1 of the network's weights and the diffusion config: identifies what a folder was sampled from."""
    import hashlib

    h = hashlib.sha1(json.dumps(net.config.to_dict()["diffusion"], sort_keys=True).encode())
    for key, value in sorted(net.model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _sample_shard(net, spec, indices, seed, batch_size, image_shape, device, save_dir, progress,
                  conditioning: dict | None = None) -> tuple[float, dict]:
    """Sample and write this rank's ``indices``; returns (the seconds spent, the digests of the PNGs)."""
    from tqdm.auto import tqdm

    model = net.model.to(device).eval()
    if net.config.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    bar = tqdm(total=len(indices), unit="img", desc=f"sampling (rank 0 of {dist.world_size()})",
               disable=not (progress and dist.is_main()), dynamic_ncols=True)
    digests = {}
    start = time.perf_counter()
    with open(save_dir / JOURNAL.format(rank=dist.rank()), "a") as journal:
        for lo in range(0, len(indices), batch_size):
            batch = indices[lo:lo + batch_size]
            labels, w = None, 0.0
            if conditioning is not None:
                labels = image_labels(conditioning["classes"], batch, net.config.model.num_classes)
                w = conditioning["guidance"]
            images = to_uint8(sample_batch(net.diffusion, model, spec, batch, seed, image_shape, device,
                                           labels=labels, guidance=w)).numpy()
            written = {sample_name(i): write_png(save_dir / sample_name(i), image)
                       for i, image in zip(batch, images, strict=True)}
            journal.write(json.dumps(written) + "\n")  # after the renames: a listed PNG is complete
            journal.flush()
            digests.update(written)
            bar.update(len(batch))
    bar.close()
    return time.perf_counter() - start, digests


def generate_to_folder(net, spec: SamplerSpec, save_dir, num_samples: int, batch_size: int, seed: int,
                       device, npz: str | Path | None = None, grid: int = 64, progress: bool = True,
                       classes: int | str | None = None, guidance: float = 0.0) -> GenerateResult:
    """Write images 0 … num_samples−1 of ``net`` (a ``LoadedNetwork``) into ``save_dir``; see the module doc.

    Class-conditional networks: ``classes`` = K (every image class K) or ``"balanced"`` (image i has class
    i mod num_classes; the default), ``guidance`` = w of ``guidance.py``; image i is then a function of
    (seed, i, its class, w). Unconditional networks take neither.

    Collective under torchrun (every rank calls it): ranks scan a share of the folder, agree on the missing
    indices and each samples every world-th one of them. ``npz``: path of the ``.npz`` to write ("" = the
    default name in save_dir, None = none). ``grid``: number of images in the preview grid (0 = none).
    """
    from ..training.builders import image_shape as config_image_shape

    save_dir = Path(save_dir)
    shape = config_image_shape(net.config)  # (C, H, W)
    if shape[0] not in PIL_MODES:
        raise UserError(f"{shape[0]}-channel images cannot be saved as PNG; sample a 1-, 3- or 4-channel model")
    spec.validate(net.diffusion.timesteps)
    conditioning = check_conditioning(net, classes, guidance)
    manifest = {"checkpoint": str(net.source), "step": net.step, "weights": net.weights,
                "fingerprint": network_fingerprint(net), "seed": seed, "image_shape": list(shape),
                "sampler": spec.to_dict(), "conditioning": conditioning, "num_samples": num_samples}
    error, digests = _prepare_dir(save_dir, manifest) if dist.is_main() else (None, None)
    error, digests = dist.broadcast_object((error, digests))
    if error:
        raise UserError(error)

    rank, world = dist.rank(), dist.world_size()
    found = dist.all_gather_object(missing_indices(save_dir, range(rank, num_samples, world), shape, digests))
    missing = sorted(i for part in found for i in part[0] + part[1])
    replaced = sorted(i for part in found for i in part[1])
    seconds, written = _sample_shard(net, spec, shard(missing, rank, world), seed, batch_size, shape, device,
                                     save_dir, progress, conditioning)
    seconds = max(dist.all_gather_object(seconds))
    written = dist.all_gather_object(written)
    result = GenerateResult(save_dir, num_samples, len(missing), seconds)
    if digests is None:
        result.notes.append(f"{MANIFEST} predates per-image digests: the existing PNGs were checked by decoding "
                            f"only; their digests are recorded now")
    if replaced:
        names = ", ".join(sample_name(i) for i in replaced[:5]) + (" …" if len(replaced) > 5 else "")
        result.notes.append(f"{len(replaced)} PNG(s) did not match the digest recorded when they were written "
                            f"and were regenerated: {names}")
    dist.barrier()
    if dist.is_main():
        recorded = dict(digests or {})
        for part in found:
            recorded.update(part[2])
        for part in written:
            recorded.update(part)
        _write_manifest(save_dir, {**manifest, DIGESTS: dict(sorted(recorded.items()))})
        if npz is not None:
            result.npz = write_npz(save_dir, num_samples, shape, Path(npz) if npz else None)
        if grid > 0:
            result.grid = write_grid(save_dir, min(grid, num_samples), shape)
    return result


def check_conditioning(net, classes: int | str | None, guidance: float) -> dict | None:
    """The manifest's ``conditioning`` entry ({classes, guidance, class_names}; None for unconditional networks),
    after checking the request against the network."""
    k = net.config.model.num_classes
    if not k:
        if classes is not None or guidance:
            raise UserError(f"{net.source} is unconditional (model.num_classes = 0); drop --class-label, --classes "
                            f"and --guidance")
        return None
    classes = "balanced" if classes is None else classes
    image_labels(classes, [0], k)  # raises for a label out of range
    if not math.isfinite(guidance) or guidance < 0:
        raise UserError(f"--guidance {guidance} is not a finite number ≥ 0; use 0 (conditional, no guidance) or "
                        f"e.g. 1-3")
    if guidance and net.config.train.cond_drop_prob == 0:
        raise UserError(f"--guidance {guidance:g} needs the unconditional branch, but {net.source} was trained with "
                        f"train.cond_drop_prob = 0 (no null-label training); use --guidance 0")
    return {"classes": classes, "guidance": float(guidance), "class_names": list(net.config.dataset.class_names)}


def load_folder(save_dir: Path, num_samples: int, image_shape: Sequence[int]) -> np.ndarray:
    """Images 0 … num_samples−1 of a generated folder → uint8 [N, H, W, C]."""
    c, h, w = image_shape
    out = np.empty((num_samples, h, w, c), dtype=np.uint8)
    for i in range(num_samples):
        image = read_png(save_dir / sample_name(i), image_shape)
        if image is None:
            raise UserError(f"{save_dir / sample_name(i)} is missing or damaged; rerun generate.py to repair it")
        out[i] = image
    return out


def write_npz(save_dir: Path, num_samples: int, image_shape: Sequence[int], path: Path | None = None) -> Path:
    """All images as ``arr_0`` uint8 [N, H, W, C] in ``path`` (default ``samples_NxHxWxC.npz``)."""
    c, h, w = image_shape
    path = path or save_dir / f"samples_{num_samples}x{h}x{w}x{c}.npz"
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    arr = load_folder(save_dir, num_samples, image_shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.savez(f, arr_0=arr))  # a file object: numpy appends no ".npz"
    return path


def write_grid(save_dir: Path, count: int, image_shape: Sequence[int]) -> Path:
    """The first ``count`` images as one grid PNG in ``save_dir/preview/``."""
    from torchvision.utils import make_grid

    images = torch.from_numpy(load_folder(save_dir, count, image_shape)).permute(0, 3, 1, 2)
    grid = make_grid(images, nrow=max(1, int(count ** 0.5)), padding=2, pad_value=255)  # uint8 [C, H, W]
    path = save_dir / PREVIEW
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(path, grid.permute(1, 2, 0).numpy())
    return path
