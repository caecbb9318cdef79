"""The FID Inception-v3 (pytorch-fid's port of the TF graph), written with torchvision's module names so the
published weight file ``pt_inception-2015-12-05-6726825d.pth`` loads with ``strict=True``.

Differences from torchvision's InceptionV3 (REFERENCE §5): 1008 classes, no aux head, the pool branches of
Mixed_5b–5d, Mixed_6b–6e and Mixed_7b average with ``count_include_pad=False`` (TF semantics) and Mixed_7c's
pool branch is a *max* pool. BatchNorm eps 0.001. Input: images in [0, 1] → bilinear resize to 299×299
(``align_corners=False``) → 2x − 1. Features: 64 (after the first max-pool), 192 (second max-pool),
768 (Mixed_6e) or 2048 (pool_3), each globally average-pooled like pytorch-fid.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..atomic import atomic_write
from ..errors import UserError

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_NAME}"
FID_WEIGHTS_SHA256_PREFIX = "6726825d"  # torch.hub's naming convention: the file's sha256 starts with this
BLOCK_DIMS = (64, 192, 768, 2048)
FEATURE_NAMES = {64: "first max-pool", 192: "second max-pool", 768: "Mixed_6e (pre-aux)", 2048: "pool_3"}


class BasicConv2d(nn.Module):
    """conv (no bias) → BatchNorm(eps 1e-3) → ReLU; attribute names ``conv``/``bn`` as in torchvision."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _tf_avg_pool(x):
    # TF's 3×3/1 SAME average ignores the zero padding, hence count_include_pad=False
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b/5c/5d: 1×1 | 1×1→5×5 | 1×1→3×3→3×3 | avg-pool→1×1 (out 224 + pool_features channels)."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x),
                          self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionB(nn.Module):
    """Mixed_6a (grid reduction): 3×3/2 | 1×1→3×3→3×3/2 | max-pool 3×3/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    """Mixed_6b–6e: 1×1 | 1×1→1×7→7×1 | 1×1→7×1→1×7→7×1→1×7 | avg-pool→1×1 (768 channels)."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = conv(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionD(nn.Module):
    """Mixed_7a (grid reduction): 1×1→3×3/2 | 1×1→1×7→7×1→3×3/2 | max-pool 3×3/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = conv(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """Mixed_7b/7c: 1×1 | 1×1→(1×3, 3×1) | 1×1→3×3→(1×3, 3×1) | pool→1×1 (2048 channels).

    ``pool="avg"`` (Mixed_7b, TF average without padding) or ``"max"`` (Mixed_7c, the FID graph's quirk).
    """

    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _tf_avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x),
                          self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd),
                          self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """Feature extractor for FID and precision/recall.  ``model(images, dims)`` → {dim: [B, dim]}.

    images: [B, 3, H, W] floats in [0, 1] (any H, W: resized to 299×299). ``dims`` ⊆ (64, 192, 768, 2048);
    the forward stops after the deepest block it needs. ``fc`` (1008 classes) only exists so that the
    published state dict loads with ``strict=True``; it is never evaluated.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)

    def _blocks(self):
        """The four feature blocks in order (pytorch-fid's block indices 0–3)."""
        pool = lambda x: F.max_pool2d(x, kernel_size=3, stride=2)  # noqa: E731
        return [
            [self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3, pool],
            [self.Conv2d_3b_1x1, self.Conv2d_4a_3x3, pool],
            [self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,
             self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e],
            [self.Mixed_7a, self.Mixed_7b, self.Mixed_7c],
        ]

    def forward(self, images: torch.Tensor, dims=(2048,)) -> dict[int, torch.Tensor]:
        dims = tuple(dims)
        bad = [d for d in dims if d not in BLOCK_DIMS]
        if bad:
            raise UserError(f"Inception feature dims {bad} not available; choose from {list(BLOCK_DIMS)}")
        x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        # the weights' layout decides: channels_last on CPU (faster), plain NCHW elsewhere (pytorch-fid's)
        channels_last = next(self.parameters()).is_contiguous(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        out = {}
        for block_dim, block in zip(BLOCK_DIMS, self._blocks(), strict=True):
            for layer in block:
                x = layer(x)
            if block_dim in dims:
                out[block_dim] = x.mean(dim=(2, 3))  # global average pool (pytorch-fid's adaptive pool)
            if len(out) == len(dims):
                break
        return out


# ----------------------------------------------------------------------------------------- weights


def default_weights_path() -> Path:
    """The torch hub cache location: ``$TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_NAME


def _missing_weights_message(reason: str) -> str:
    return (f"FID Inception weights not found ({reason}); download {FID_WEIGHTS_URL} and put it at "
            f"{default_weights_path()} or pass --inception-weights PATH")


def download_weights(dest: Path, timeout_sec: float = 30.0) -> Path:
    """Fetch the published weights to ``dest`` (temporary file, sha256 prefix check, rename)."""
    import urllib.request

    def fetch(f) -> None:
        sha = hashlib.sha256()
        with urllib.request.urlopen(FID_WEIGHTS_URL, timeout=timeout_sec) as resp:
            while chunk := resp.read(1 << 20):
                sha.update(chunk)
                f.write(chunk)
        if not sha.hexdigest().startswith(FID_WEIGHTS_SHA256_PREFIX):
            raise UserError(_missing_weights_message("the download's checksum is wrong"))

    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        return atomic_write(dest, fetch)
    except OSError as exc:  # URLError, timeouts and disk errors are all OSErrors
        raise UserError(_missing_weights_message(f"offline? download failed: {exc}")) from None


def find_weights(path: str | Path | None = None, download: bool = True) -> Path:
    """``path`` if given, else the torch hub cache file, else a download when ``download`` (and online)."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"--inception-weights {path} does not exist; pass the path of {FID_WEIGHTS_NAME}")
        return path
    cached = default_weights_path()
    if cached.is_file():
        return cached
    if not download:
        raise UserError(_missing_weights_message(f"not at {cached}"))
    return download_weights(cached)


def load_fid_inception(path: str | Path, device="cpu") -> FIDInceptionV3:
    """The FID Inception with the weights in ``path`` (``weights_only`` load, strict key check), eval mode."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"cannot read Inception weights {path} ({type(exc).__name__}); "
                        f"re-download {FID_WEIGHTS_NAME}") from None
    model = FIDInceptionV3()
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a state dict; pass {FID_WEIGHTS_NAME}")
    # The published file predates BatchNorm's num_batches_tracked buffer; fill it so strict loading works
    # whatever the file's recorded module versions.
    state = dict(state)
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            state.setdefault(key, value)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise UserError(f"{path} is not the FID Inception weight file ({first[:160]}); "
                        f"pass {FID_WEIGHTS_NAME}") from None
    model = model.eval().requires_grad_(False).to(device)
    if torch.device(device).type == "cpu":
        # channels_last convolutions are markedly faster on CPU (oneDNN); same math
        model = model.to(memory_format=torch.channels_last)
    return model


def random_state_dict(seed: int = 0) -> dict:
    """A random but well-scaled state dict of the FID Inception (for tests and benchmarks without the
    published weights): He-normal convolutions and BatchNorm statistics near identity, so activations
    neither explode nor vanish through the 94 layers."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in FIDInceptionV3().state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = value
            continue
        shape = value.shape
        if key.endswith("conv.weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            state[key] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif key.endswith("bn.weight"):
            state[key] = 0.8 + 0.4 * torch.rand(shape, generator=g)
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(shape, generator=g)
        else:  # bn.bias, running_mean, fc
            state[key] = 0.1 * torch.randn(shape, generator=g)
    return state


@contextmanager
def no_tf32():
    """Full fp32 matmuls/convolutions on CUDA (TF32 changes Inception features at the 1e-3 level)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
