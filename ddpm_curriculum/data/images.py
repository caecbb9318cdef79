"""Natural-image datasets: CIFAR-10 (python-pickle batches), CelebA (aligned JPEGs), any image folder.

Items are ``(x [3,H,W] float32 in [-1, 1], label)``. Roots come from the config, else from the
environment / ``.env`` (``CIFAR10_PATH``, ``CELEBA_PATH``, ``DATA_ROOT``; ``IMAGE_FOLDER_PATH`` for image folders).
A missing or malformed dataset raises a one-line UserError saying what was expected where and how to set it.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# what PIL raises for a file that is not an image, is truncated or damaged, or is a decompression bomb
IMAGE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)
# ddpm-torch's CelebA crop (top, left, height, width) of the 178×218 aligned faces, then resize.
CELEBA_CROP = (40, 15, 148, 148)


def env_path(var: str, data_root_sub: str) -> str | None:
    """``$VAR``, else ``$DATA_ROOT/<sub>``, reading a ``.env`` in the working directory first."""
    from dotenv import find_dotenv, load_dotenv

    load_dotenv(find_dotenv(usecwd=True), override=False)
    if os.environ.get(var):
        return os.environ[var]
    if os.environ.get("DATA_ROOT"):
        return str(Path(os.environ["DATA_ROOT"]) / data_root_sub)
    return None


def env_value(var: str) -> str | None:
    """``$VAR`` (a ``.env`` in the working directory counts), or None."""
    from dotenv import find_dotenv, load_dotenv

    load_dotenv(find_dotenv(usecwd=True), override=False)
    return os.environ.get(var) or None


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 HWC → float32 CHW in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


# ------------------------------------------------------------------------------- CIFAR-10


CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
# batches.meta's label_names, in label order
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _latin1_bytes(text: str, encoding: str) -> bytes:
    """``_codecs.encode`` as protocol-2 pickles of Python 3 ``bytes`` use it, and only that use."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} is not allowed")
    return text.encode("latin1")


def _numpy_global(submodule: str, name: str):
    # numpy 2 renamed numpy.core to numpy._core (1.26 has both); either spelling in a pickle is this function
    import importlib

    for package in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{package}.{submodule}"), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"numpy has no {submodule}.{name}")


# The only globals a CIFAR-10 python batch needs: numpy array and dtype reconstruction (the original
# Python 2 files and protocols 2-4 use _reconstruct, protocol 5 _frombuffer) and, for bytes written by
# Python 3 with protocol 2, latin-1 encoding. Dicts, lists, ints and bytes need no global at all.
SAFE_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): lambda: _numpy_global("multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): lambda: _numpy_global("multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"): lambda: _numpy_global("numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): lambda: _numpy_global("numeric", "_frombuffer"),
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: _latin1_bytes,
}


class _DataOnlyUnpickler(pickle.Unpickler):
    """Unpickles arrays, dicts, lists, numbers and bytes; any other global (os.system, builtins.eval, a
    class with a ``__reduce__``) raises instead of being imported, so a crafted file cannot run code."""

    def find_class(self, module: str, name: str):
        make = SAFE_PICKLE_GLOBALS.get((module, name))
        if make is None:
            raise pickle.UnpicklingError(f"it references {module}.{name}, which a CIFAR-10 batch never holds")
        return make()


def read_cifar_batch(path: Path) -> tuple[np.ndarray, list[int]]:
    """One ``cifar-10-batches-py`` file → (uint8 [N, 3, 32, 32], labels), read as data only."""
    try:
        with open(path, "rb") as f:
            batch = _DataOnlyUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = [int(v) for v in batch[b"labels"]]
        if len(labels) != len(data):
            raise ValueError(f"{len(data)} images but {len(labels)} labels")
    except Exception as exc:  # data only: truncated, wrong layout, forbidden global, ...
        raise UserError(f"CIFAR-10 file {path} is malformed ({type(exc).__name__}: "
                        f"{str(exc)[:200]}); re-download cifar-10-python.tar.gz") from None
    return data, labels


class CIFAR10(Dataset):
    """The standard ``cifar-10-batches-py`` pickles; ``root`` is that folder or its parent."""

    image_shape = (3, 32, 32)
    class_names = CIFAR_CLASSES
    default_size, fixed_size, natural_images = 32, True, True

    def __init__(self, root: str | None = None, split: str = "train", download: bool = False):
        given = root or env_path("CIFAR10_PATH", "cifar-10-batches-py")
        folder = self._find(given)
        if folder is None and download:
            folder = self._download(given or "data")
        if folder is None:
            where = given or "(no path set)"
            raise UserError(f"CIFAR-10 not found: expected cifar-10-batches-py/data_batch_1..5 and test_batch "
                            f"under {where}; set dataset.root in the config or CIFAR10_PATH in .env, "
                            f"or dataset.download=true when online")
        files = CIFAR_TRAIN if split == "train" else ["test_batch"]
        data, labels = [], []
        for name in files:
            images, batch_labels = read_cifar_batch(folder / name)
            data.append(images)
            labels += batch_labels
        self.images = np.concatenate(data).transpose(0, 2, 3, 1)  # NHWC uint8
        self.labels = labels

    @staticmethod
    def channels_of(d) -> int:
        return 3

    @classmethod
    def from_config(cls, d, size: int, split: str, use_cache: bool) -> CIFAR10:
        return cls(d.root, split=split, download=d.download)

    @staticmethod
    def _find(root: str | None) -> Path | None:
        if not root:
            return None
        for folder in (Path(root), Path(root) / "cifar-10-batches-py"):
            if all((folder / n).is_file() for n in CIFAR_TRAIN + ["test_batch"]):
                return folder
        return None

    @classmethod
    def _download(cls, root: str) -> Path | None:
        from torchvision.datasets import CIFAR10 as TV

        parent = Path(root).parent if Path(root).name == "cifar-10-batches-py" else Path(root)
        try:
            TV(str(parent), download=True)
        except Exception as exc:  # offline, bad checksum, disk full
            raise UserError(f"CIFAR-10 download into {parent} failed ({type(exc).__name__}); "
                            f"download cifar-10-python.tar.gz by hand and set CIFAR10_PATH") from None
        return cls._find(str(parent))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return to_tensor(self.images[i]), int(self.labels[i])


# --------------------------------------------------------------------------- image files


def load_image(path: Path, size: int, crop: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """RGB uint8 [size, size, 3]: optional fixed crop, else resize-shorter-side + center crop."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if crop is not None:
                top, left, h, w = crop
                im = im.crop((left, top, left + w, top + h))
            else:
                s = size / min(im.size)
                im = im.resize((max(size, round(im.width * s)), max(size, round(im.height * s))),
                               Image.BICUBIC)
                left, top = (im.width - size) // 2, (im.height - size) // 2
                im = im.crop((left, top, left + size, top + size))
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            return np.array(im, dtype=np.uint8)  # a writable copy
    except IMAGE_ERRORS as exc:
        raise UserError(f"cannot read image {path} ({type(exc).__name__}); remove or replace the file") from None


def find_classes(folder: Path) -> list[str]:
    """Class names of a labelled folder: its subfolders, sorted (torchvision ``ImageFolder.find_classes``)."""
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())


def image_files(folder: Path) -> list[Path]:
    """Every image below a class folder in torchvision's order: sorted ``os.walk`` (links followed), sorted names."""
    return [Path(root) / name for root, _, names in sorted(os.walk(folder, followlinks=True))
            for name in sorted(names) if name.lower().endswith(IMAGE_EXTENSIONS)]


class ImageFolder(Dataset):
    """Images below ``root`` (or ``root/split``), resized and center-cropped to ``image_size``.

    ``labels="none"``: every image below the folder (recursive), label −1. ``labels="subfolders"``: the
    torchvision ImageFolder convention: each subfolder is a class, class index = position of its name in
    sorted order (``class_names``), images anywhere below it; files directly in the folder are ignored.
    ``cache``: decode all images once into a cached uint8 array (``cache.py``) instead of on every access.
    """

    labels: list[int] | None = None
    class_names: list[str] | None = None
    images: np.ndarray | None = None  # the decoded cache, when used
    default_size, fixed_size, natural_images = None, False, True

    def __init__(self, root: str | None, image_size: int | None, labels: str = "none",
                 split: str | None = None, cache: bool = False, cache_dir: str | None = None):
        root = root or env_value("IMAGE_FOLDER_PATH")
        if not root:
            raise UserError("dataset 'image_folder' needs dataset.root (a folder of images), or IMAGE_FOLDER_PATH "
                            "in .env")
        if not image_size:
            raise UserError("dataset 'image_folder' needs dataset.image_size (e.g. 32)")
        folder = Path(root)
        if not folder.is_dir():
            raise UserError(f"image folder not found: {folder}; set dataset.root to an existing folder")
        if split:
            if not (folder / split).is_dir():
                raise UserError(f"split folder {folder / split} not found (dataset.split = {split!r}); "
                                f"subfolders of {folder}: {find_classes(folder)}")
            folder = folder / split
        if labels == "subfolders":
            self._read_classes(folder)
        else:  # the order of earlier versions, which existing runs' data order depends on
            self.files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.files:
            raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {folder}")
        self.folder = folder
        self.image_shape = (3, image_size, image_size)
        self.size, self.crop = image_size, None
        if cache:
            self.use_cache(cache_dir)

    @staticmethod
    def channels_of(d) -> int:
        return 3

    @classmethod
    def from_config(cls, d, size: int | None, split: str, use_cache: bool) -> ImageFolder:
        """``dataset.split`` is the subfolder; the held-out split of a ``train``/``test`` tree is ``root/test``, so
        ``split="test"`` with ``dataset.split = "train"`` reads it (evaluation never scores the training images)."""
        folder_split = "test" if split == "test" and d.split == "train" else d.split
        return cls(d.root, size, labels=d.labels, split=folder_split, cache=d.cache and use_cache,
                   cache_dir=d.cache_dir)

    def _read_classes(self, folder: Path) -> None:
        names = find_classes(folder)
        if not names:
            raise UserError(f"dataset.labels = 'subfolders' but {folder} has no subfolders; put each class's "
                            f"images in its own subfolder, or set dataset.labels=none")
        self.files, self.labels = [], []
        for index, name in enumerate(names):
            files = image_files(folder / name)
            if not files:
                raise UserError(f"class folder {folder / name} has no images ({', '.join(IMAGE_EXTENSIONS)}); "
                                f"remove it or add its images")
            self.files += files
            self.labels += [index] * len(files)
        self.class_names = names

    def use_cache(self, cache_dir: str | None) -> None:
        from .cache import cached_images

        self.images = cached_images(self.folder, self.files, self.size, self.crop, cache_dir,
                                    lambda f: load_image(f, self.size, self.crop))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        image = np.array(self.images[i]) if self.images is not None else load_image(self.files[i], self.size, self.crop)
        return to_tensor(image), (self.labels[i] if self.labels is not None else -1)


class CelebA(ImageFolder):
    """``img_align_celeba/*.jpg`` with ddpm-torch's 148×148 face crop, resized to ``image_size``.

    ``root`` is the folder holding ``img_align_celeba`` (and optionally ``list_eval_partition.txt``,
    which selects the split; without it every image is used), or ``img_align_celeba`` itself.
    """

    default_size = 64

    def __init__(self, root: str | None = None, image_size: int = 64, split: str = "train",
                 cache: bool = False, cache_dir: str | None = None):
        given = root or env_path("CELEBA_PATH", "celeba")
        folder = self._find(given)
        if folder is None:
            raise UserError(f"CelebA not found: expected img_align_celeba/*.jpg under {given or '(no path set)'}; "
                            f"set dataset.root in the config or CELEBA_PATH in .env")
        files = sorted(folder.glob("*.jpg"))
        partition = folder.parent / "list_eval_partition.txt"
        if partition.is_file():
            wanted = {"train": "0", "valid": "1", "test": "2"}.get(split)
            names = {line.split()[0] for line in partition.read_text().splitlines()
                     if len(line.split()) == 2 and line.split()[1] == wanted}
            files = [f for f in files if f.name in names]
        if not files:
            raise UserError(f"no CelebA images for split '{split}' in {folder}")
        self.files, self.size = files, image_size
        self.image_shape = (3, image_size, image_size)
        self.crop, self.folder = CELEBA_CROP, folder
        if cache:
            self.use_cache(cache_dir)

    @classmethod
    def from_config(cls, d, size: int, split: str, use_cache: bool) -> CelebA:
        return cls(d.root, image_size=size, split=split, cache=d.cache and use_cache, cache_dir=d.cache_dir)

    @staticmethod
    def _find(root: str | None) -> Path | None:
        if not root:
            return None
        for folder in (Path(root) / "img_align_celeba", Path(root)):
            if folder.is_dir() and folder.name == "img_align_celeba" and any(folder.glob("*.jpg")):
                return folder
        return None
