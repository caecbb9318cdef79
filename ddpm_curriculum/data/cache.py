"""Decoded-image cache: an image dataset decoded once into one uint8 array [N, H, W, 3], stored as ``.npy``.

Decoding 50,000 JPEGs costs minutes per run; reading the array back costs well under a second. The file name
holds a sha256 key of everything the pixels depend on: the folder, every file's relative path, size and
mtime (so an edited, added or removed image gives a new key), the image size and crop, and ``CACHE_VERSION``
(bump it when ``load_image`` changes). The array is written atomically, so a killed run leaves no partial
cache; a damaged cache file is decoded afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..atomic import atomic_write
from ..errors import UserError

CACHE_VERSION = 1
DEFAULT_CACHE_DIR = Path("~/.cache/ddpm_curriculum")


def resolve_cache_dir(cache_dir: str | None) -> Path:
    """``cache_dir``, else ``$DDPM_CACHE_DIR`` (a ``.env`` in the working directory counts), else the default."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    from dotenv import find_dotenv, load_dotenv

    load_dotenv(find_dotenv(usecwd=True), override=False)
    return Path(os.environ.get("DDPM_CACHE_DIR") or DEFAULT_CACHE_DIR).expanduser()


def cache_key(folder: Path, files: Sequence[Path], size: int, crop) -> str:
    """sha256 of (version, folder, [(relative path, bytes, mtime_ns)], size, crop)."""
    h = hashlib.sha256(json.dumps([CACHE_VERSION, str(Path(folder).resolve()), size,
                                   list(crop) if crop else None]).encode())
    for f in files:  # paths below ``folder`` as listed (no per-file resolve: 50k of them would take seconds)
        st = os.stat(f)
        h.update(f"{os.path.relpath(f, folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cached_images(folder: Path, files: Sequence[Path], size: int, crop, cache_dir: str | None,
                  decode: Callable[[Path], np.ndarray]) -> np.ndarray:
    """uint8 [len(files), size, size, 3]: the cache file's array (memory-mapped) or, on a miss, every file
    decoded with ``decode`` and then cached."""
    directory = resolve_cache_dir(cache_dir)
    path = directory / f"{Path(folder).name}-{size}px-{len(files)}-{cache_key(folder, files, size, crop)[:20]}.npy"
    expected = (len(files), size, size, 3)
    if path.is_file():
        try:
            arr = np.load(path, mmap_mode="r")
            if arr.shape == expected and arr.dtype == np.uint8:
                return arr
        except (OSError, ValueError):
            pass  # damaged or foreign: decode again and replace it
    arr = np.empty(expected, dtype=np.uint8)
    for i, f in enumerate(files):
        arr[i] = decode(f)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda fh: np.save(fh, arr))
    except OSError as exc:
        raise UserError(f"cannot write the image cache {path} ({exc.strerror or exc}); set dataset.cache_dir or "
                        f"DDPM_CACHE_DIR to a writable folder, or dataset.cache=false") from None
    return arr
