"""Where evaluated images come from: a folder of image files, an ``.npz`` array, or a configured dataset.

Every source yields uint8 images [B, H, W, C] (C = 3, or 1 for grayscale), the form saved samples have,
so generated and real images pass through identical preprocessing. Bad input is a one-line UserError that
names the file: an empty folder, an unreadable image, an image whose size differs from the others.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..data import evenly_spaced
from ..data.images import IMAGE_ERRORS, IMAGE_EXTENSIONS
from ..errors import UserError


class FolderImages:
    """The image files at the top level of ``folder`` (like pytorch-fid; subfolders such as ``preview/`` are
    ignored), in sorted name order. Grayscale files stay 1-channel, everything else is read as RGB."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if self.folder.is_file():
            raise UserError(f"{self.folder} is a file, not a folder of images; pass its folder, or an .npz file")
        if not self.folder.is_dir():
            raise UserError(f"image folder not found: {self.folder}; pass an existing folder or an .npz file")
        self.files = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS
                            and p.is_file() and not p.name.startswith("."))
        if not self.files:
            raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {self.folder}; point at the folder "
                            f"generate.py wrote (or an .npz)")
        self.shape = self._read(self.files[0]).shape  # (H, W, C)
        self._check_headers()
        self.description = f"folder {self.folder}"

    def __len__(self) -> int:
        return len(self.files)

    def _check_headers(self) -> None:
        """Fail before any feature extraction when a file is not an image or has another size (headers only,
        ≈20 µs a file; damaged pixel data is caught when the file is decoded)."""
        for path in self.files[1:]:
            try:
                with Image.open(path) as im:
                    shape = (im.size[1], im.size[0], 1 if im.mode == "L" else 3)
            except IMAGE_ERRORS as exc:
                raise _unreadable(path, exc) from None
            self._check_shape(path, shape)

    def _check_shape(self, path: Path, shape) -> None:
        if tuple(shape) != tuple(self.shape):
            raise UserError(f"image {path} is {_fmt(shape)} but {self.files[0].name} is {_fmt(self.shape)}; "
                            f"all images must have one size and channel count")

    @staticmethod
    def _read(path: Path) -> np.ndarray:
        try:
            with Image.open(path) as im:
                arr = np.asarray(im if im.mode == "L" else im.convert("RGB"))
        except IMAGE_ERRORS as exc:
            raise _unreadable(path, exc) from None
        return arr[..., None] if arr.ndim == 2 else arr

    def load(self, indices: Sequence[int]) -> np.ndarray:
        out = np.empty((len(indices), *self.shape), dtype=np.uint8)
        for row, i in enumerate(indices):
            arr = self._read(self.files[i])
            self._check_shape(self.files[i], arr.shape)
            out[row] = arr
        return out


def _unreadable(path: Path, exc: Exception) -> UserError:
    return UserError(f"cannot read image {path} ({type(exc).__name__}); remove or replace the file")


class NpzImages:
    """uint8 [N, H, W, C] under ``arr_0`` (ADM / ddpm-torch / generate.py --npz), or the file's only array."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"image file not found: {self.path}; pass an .npz of uint8 images (generate.py --npz)")
        try:
            with np.load(self.path, allow_pickle=False) as f:
                key = "arr_0" if "arr_0" in f.files else (f.files[0] if len(f.files) == 1 else None)
                if key is None:
                    raise UserError(f"{self.path} has arrays {f.files} but no 'arr_0'; store the images under arr_0")
                self.array = f[key]
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"cannot read {self.path} ({type(exc).__name__}); pass an .npz of uint8 images") from None
        a = self.array
        if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] not in (1, 3):
            raise UserError(f"{self.path}: expected uint8 images [N, H, W, 1 or 3] (NHWC), got {a.dtype} "
                            f"{list(a.shape)}; save samples as uint8 NHWC")
        if len(a) == 0:
            raise UserError(f"{self.path} holds no images")
        self.shape = a.shape[1:]
        self.description = f"npz {self.path}"

    def __len__(self) -> int:
        return len(self.array)

    def load(self, indices: Sequence[int]) -> np.ndarray:
        return self.array[np.asarray(indices, dtype=np.int64)]


class DatasetImages:
    """A configured dataset's images, quantised to uint8 as saved samples are (``--dataset-config``); with
    ``limit`` < the dataset's size, ``limit`` images evenly spaced over it (``evenly_spaced``)."""

    def __init__(self, cfg, split: str = "train", limit: int | None = None):
        from ..training.builders import make_dataset

        self.dataset = make_dataset(cfg, split)
        self.count = len(self.dataset) if limit is None else min(limit, len(self.dataset))
        self.indices = evenly_spaced(len(self.dataset), self.count)
        c, h, w = self.dataset[0][0].shape
        self.shape = (h, w, c)
        self.description = f"dataset {cfg.dataset.name} ({split} split)"

    def __len__(self) -> int:
        return self.count

    def load(self, indices: Sequence[int]) -> np.ndarray:
        import torch

        from ..sampling import to_uint8

        return to_uint8(torch.stack([self.dataset[self.indices[int(i)]][0] for i in indices])).numpy()


def open_images(path: str | Path):
    """A folder or an ``.npz`` of images."""
    path = Path(path)
    if path.suffix == ".npz":
        return NpzImages(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; pass a folder of images or an .npz file")
    return FolderImages(path)


def _fmt(shape) -> str:
    h, w, c = shape
    return f"{w}x{h} with {c} channel{'s' if c != 1 else ''}"
