"""Importers for the pretrained DDPMs users start from: ddpm-torch checkpoints and diffusers folders.

The project's UNet uses tqch/ddpm-torch's exact state-dict keys (see ``unet.py``), so a ddpm-torch
checkpoint needs only its ``module.`` prefixes stripped and its architecture read off the tensor shapes.
diffusers' ``UNet2DModel`` with the DDPM CIFAR-10 layout (``google/ddpm-cifar10-32``) is the same network
under other names, with q/k/v as three linear layers instead of one 1×1 conv; ``diffusers_key`` names
the counterpart of each of our keys, and the two state-dict converters are built on it.

Formats read here (REFERENCE §1):

- ddpm-torch ``.pt``: ``{"model": state, "ema": {"decay", "shadow": state, "num_updates"}, "optimizer",
  "scheduler", "epoch"}``; DDP-trained states carry ``module.`` key prefixes. A bare state dict also loads.
- diffusers folder: ``config.json`` + ``diffusion_pytorch_model.safetensors`` (or ``.bin``), possibly inside
  a pipeline folder (``unet/``) with a ``scheduler_config.json`` next to it.

``.safetensors`` files are read with the ``safetensors`` package when it is installed (diffusers depends on
it) and otherwise with the small parser here (``read_safetensors``), so the core dependencies stay
torch/numpy: the format is an 8-byte little-endian header length, a JSON header (dtype, shape, byte offsets
per tensor) and raw little-endian data, so a reader is ~30 lines and holds no code. ``load_safetensors``
picks between them; both give the same tensors. Everything is loaded as data only
(``torch.load(weights_only=True)`` for ``.bin``).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from .unet import UNet

# GroupNorm eps of ddpm-torch's UNet. Its code used PyTorch's default 1e-5 until the July 2023 update
# (issue tqch/ddpm-torch#8, 2023-07-16), which set eps=1e-6 in ddpm_torch/models/unet.py and released the
# retrained checkpoints: cifar10_2040.pt (795.6k steps) replaced ddpm_cifar10_2160.pt (842.4k steps, 1e-5).
# The released checkpoints need 1e-6; pass norm_eps=1e-5 (``--set model.norm_eps=1e-5``) for older ones.
DDPM_TORCH_NORM_EPS = 1e-6
DIFFUSERS_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                          "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin")
# The DDPM paper's CIFAR-10 process (REFERENCE §1), used when a checkpoint does not say otherwise.
DDPM_DIFFUSION = {"timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
                  "model_mean_type": "eps", "model_var_type": "fixed-large", "loss_type": "mse"}
SHOW_KEYS = 5  # how many offending keys an error message lists


@dataclass
class ImportedNetwork:
    """A foreign checkpoint translated into the project's terms (config sections as plain dicts)."""

    state_dict: dict[str, torch.Tensor]  # ddpm-torch/project key names
    model: dict  # the ``model`` config section (architecture)
    diffusion: dict = field(default_factory=lambda: dict(DDPM_DIFFUSION))
    dataset: dict = field(default_factory=lambda: {"name": "cifar10"})
    step: int = 0
    weights: str = "model"  # "ema" or "model"
    format: str = ""


def _keys(keys, n=SHOW_KEYS) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


# ------------------------------------------------------------------------------------ safetensors

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, with ``safetensors.torch.load_file`` when the package is installed,
    else with ``read_safetensors``. A damaged file is a one-line UserError either way."""
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        return read_safetensors(path)
    try:
        return load_file(path, device="cpu")
    except SafetensorError as exc:  # header too small, incomplete metadata (truncated data), bad JSON, ...
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0].removeprefix(
            "Error while deserializing header: ")[:200]
        raise UserError(f"{path} is not a valid .safetensors file ({why}; truncated?); re-download or "
                        f"re-save it") from None


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The fallback parser (``load_safetensors`` without the ``safetensors`` package).

    Tensors of a ``.safetensors`` file: u64-LE header size N, N bytes of JSON
    ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the data
    (offsets relative to its start, little-endian, row-major)."""
    path = Path(path)
    data = bytearray(path.read_bytes())
    bad = f"{path} is not a valid .safetensors file"
    if len(data) < 8:
        raise UserError(f"{bad} (shorter than its 8-byte header); re-download or re-save it")
    n = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{bad} (unreadable JSON header); re-download or re-save it") from None
    body = memoryview(data)[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise UserError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}; "
                            f"supported: {sorted(SAFETENSORS_DTYPES)}")
        shape, (begin, end) = list(info["shape"]), info["data_offsets"]
        numel = 1
        for s in shape:
            numel *= s
        if not 0 <= begin <= end <= len(body) or end - begin != numel * dtype.itemsize:
            raise UserError(f"{bad} (tensor {name} has inconsistent offsets; truncated?); re-download it")
        t = torch.frombuffer(body[begin:end], dtype=dtype) if numel else torch.empty(0, dtype=dtype)
        if sys.byteorder == "big" and dtype.itemsize > 1:
            t = torch.from_numpy(t.numpy().byteswap())
        out[name] = t.reshape(shape).clone()
    return out


# ------------------------------------------------------------------------------- key correspondence

_RES = {"fc": "time_emb_proj", "skip": "conv_shortcut"}  # other res-block parts keep their names
_ATTN = {"norm": "group_norm", "project_out": "to_out.0", "project_in": "to_qkv"}
_FIXED = [(r"embed\.0\.", "time_embedding.linear_1."), (r"embed\.2\.", "time_embedding.linear_2."),
          (r"in_conv\.", "conv_in."), (r"out_conv\.0\.", "conv_norm_out."), (r"out_conv\.2\.", "conv_out.")]
_LEVEL = re.compile(r"(down|up)samples\.level_(\d+)\.(\d+)\.(.+)")
_MIDDLE = re.compile(r"middle\.([012])\.(.+)")
_LEGACY = [(".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."), (".proj_attn.", ".to_out.0.")]


def _part(kind: str, index: int, rest: str) -> str:
    """``resnets.{index}.<part>`` / ``attentions.{index}.<part>`` with diffusers' part names."""
    name, param = rest.split(".", 1)
    return f"{kind}.{index}.{(_RES if kind == 'resnets' else _ATTN).get(name, name)}.{param}"


def diffusers_key(key: str, levels: int, num_res_blocks: int) -> str:
    """The ``UNet2DModel`` key of one of our (ddpm-torch) keys. Our ``project_in`` (q, k, v stacked in one
    1×1 conv) maps to a pseudo-key ``...attentions.j.to_qkv.*`` that stands for ``to_q``/``to_k``/``to_v``."""
    for pattern, repl in _FIXED:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key, count=1)
    m = _MIDDLE.fullmatch(key)
    if m:
        i, rest = int(m.group(1)), m.group(2)
        return "mid_block." + (_part("attentions", 0, rest) if i == 1 else _part("resnets", i // 2, rest))
    m = _LEVEL.fullmatch(key)
    if not m:
        raise KeyError(key)
    kind, level, j, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    prefix = f"{kind}_blocks.{level if kind == 'down' else levels - 1 - level}."
    if j == (num_res_blocks if kind == "down" else num_res_blocks + 1):  # the resampling conv, ``.1.``
        return prefix + f"{kind}samplers.0.conv.{rest.split('.', 1)[1]}"
    if rest.startswith("0."):  # res block inside an attention level's (res, attn) pair
        return prefix + _part("resnets", j, rest[2:])
    if rest.startswith("1."):
        return prefix + _part("attentions", j, rest[2:])
    return prefix + _part("resnets", j, rest)


def to_diffusers_state(sd: dict, levels: int, num_res_blocks: int) -> dict[str, torch.Tensor]:
    """Our state dict → diffusers ``UNet2DModel`` keys (q/k/v split, 1×1 convs flattened to linear)."""
    out = {}
    for key, value in sd.items():
        k = diffusers_key(key, levels, num_res_blocks)
        if ".to_qkv." in k:
            for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0), strict=True):
                out[k.replace("to_qkv", name)] = part.flatten(1) if part.ndim > 1 else part
        else:
            out[k] = value.flatten(1) if ".to_out.0.weight" in k else value
    return out


def from_diffusers_state(dsd: dict, model_kwargs: dict) -> dict[str, torch.Tensor]:
    """A diffusers ``UNet2DModel`` state dict → our keys for a UNet built with ``model_kwargs``.

    Accepts diffusers' legacy attention names (query/key/value/proj_attn). Raises UserError listing the
    diffusers keys that did not map and the ones that are missing.
    """
    dsd = dict(dsd)
    for key in list(dsd):
        if ".attentions." in key:
            new = key
            for old, repl in _LEGACY:
                new = new.replace(old, repl)
            dsd[new] = dsd.pop(key)
    levels, nrb = len(model_kwargs["ch_multipliers"]), model_kwargs["num_res_blocks"]
    out, missing, wrong, used = {}, [], [], set()
    for key, like in meta_state(model_kwargs).items():
        dk = diffusers_key(key, levels, nrb)
        names = [dk.replace("to_qkv", n) for n in ("to_q", "to_k", "to_v")] if ".to_qkv." in dk else [dk]
        used.update(n for n in names if n in dsd)
        if not all(n in dsd for n in names):
            missing += [n for n in names if n not in dsd]
            continue
        value = torch.cat([dsd[n] for n in names]) if len(names) > 1 else dsd[dk]
        if value.numel() != like.numel():
            wrong.append(f"{dk} {tuple(value.shape)}")
            continue
        out[key] = value.reshape(like.shape)
    unmapped = [k for k in dsd if k not in used]
    _raise_unless_clean("diffusers UNet2DModel", unmapped, missing, wrong)
    return out


def describe_mismatch(unmapped, missing, wrong) -> str:
    """One line naming the first few keys of each kind ('' when there are none)."""
    parts = [f"{len(keys)} {what}: {_keys(keys)}" for keys, what in
             ((unmapped, "keys did not map"), (missing, "expected keys are missing"), (wrong, "have the wrong shape"))
             if keys]
    return "; ".join(parts)


def _raise_unless_clean(what: str, unmapped, missing, wrong) -> None:
    problems = describe_mismatch(unmapped, missing, wrong)
    if problems:
        raise UserError(f"unsupported {what} layout ({problems}); only the DDPM UNet "
                        f"(ddpm-torch / google/ddpm-cifar10-32 layout) can be imported")


def meta_state(model_kwargs: dict) -> dict[str, torch.Tensor]:
    """Keys and shapes (meta tensors, no memory) of the UNet built with ``model_kwargs``."""
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in model_kwargs.items()}
    try:
        with torch.device("meta"):
            return UNet(**kw).state_dict()
    except ValueError as exc:
        raise UserError(f"cannot build the imported UNet: {exc}") from None


# ------------------------------------------------------------------------------------ ddpm-torch


def _strip_module(sd: dict) -> dict:
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def is_ddpm_torch(state) -> bool:
    """Whether a loaded ``.pt`` object looks like a ddpm-torch checkpoint or a bare UNet state dict."""
    if not isinstance(state, dict):
        return False
    if _is_state_dict(state.get("model")):
        return True
    ema = state.get("ema")
    return (isinstance(ema, dict) and _is_state_dict(ema.get("shadow"))) or _is_state_dict(state)


def infer_unet_kwargs(sd: dict[str, torch.Tensor]) -> dict:
    """The ``model`` config section of a ddpm-torch-keyed UNet state dict, read off its keys and shapes."""
    if "in_conv.weight" not in sd or "embed.0.weight" not in sd:
        raise UserError(f"not a DDPM UNet state dict (no in_conv/embed keys; it has {_keys(sorted(sd))}); "
                        f"only ddpm-torch / google/ddpm-cifar10-32 UNets can be imported")
    hid, in_ch = sd["in_conv.weight"].shape[:2]
    levels = len({m.group(1) for k in sd if (m := re.match(r"downsamples\.level_(\d+)\.", k))})
    level0 = {int(m.group(1)) for k in sd if (m := re.match(r"downsamples\.level_0\.(\d+)\.(?:0\.)?conv1\.", k))}
    num_res_blocks = len(level0)
    apply_attn, mults = [], []
    for i in range(levels):
        attn = f"downsamples.level_{i}.0.1.project_in.weight" in sd
        conv1 = sd.get(f"downsamples.level_{i}.0.{'0.' if attn else ''}conv1.weight")
        if conv1 is None or conv1.shape[0] % hid:
            raise UserError(f"cannot read the width of level {i} from the state dict; not a DDPM UNet layout")
        apply_attn.append(attn)
        mults.append(int(conv1.shape[0] // hid))
    kwargs = {"in_channels": int(in_ch), "hid_channels": int(hid), "ch_multipliers": mults,
              "num_res_blocks": num_res_blocks, "apply_attn": apply_attn,
              "resample_with_conv": levels == 1 or f"downsamples.level_0.{num_res_blocks}.1.weight" in sd}
    if sd["embed.0.weight"].shape[0] != 4 * hid or sd["out_conv.2.weight"].shape[0] != in_ch:
        raise UserError("the UNet's time-embedding width is not 4×hid or its output channels differ from its "
                        "input channels; such variants have no config keys here and cannot be imported")
    return kwargs


def state_mismatch(expected: dict, given: dict) -> tuple[list[str], list[str], list[tuple]]:
    """How ``given`` differs from ``expected`` (state dicts): (unexpected keys, missing keys,
    [(key, given shape, expected shape)] for shape mismatches)."""
    unexpected = [k for k in given if k not in expected]
    missing = [k for k in expected if k not in given]
    wrong = [(k, tuple(given[k].shape), tuple(v.shape)) for k, v in expected.items()
             if k in given and tuple(given[k].shape) != tuple(v.shape)]
    return unexpected, missing, wrong


def check_state(sd: dict, model_kwargs: dict, what: str) -> None:
    """UserError naming the first few keys that do not fit the UNet built with ``model_kwargs``."""
    unmapped, missing, wrong = state_mismatch(meta_state(model_kwargs), sd)
    _raise_unless_clean(what, unmapped, missing, [f"{k} {shape}" for k, shape, _ in wrong])


def import_ddpm_torch(state: dict, use_ema: bool = True, norm_eps: float = DDPM_TORCH_NORM_EPS) -> ImportedNetwork:
    """A ddpm-torch checkpoint (or bare state dict) → ImportedNetwork; EMA ``shadow`` weights when present
    and ``use_ema``. The diffusion is DDPM's CIFAR-10 process and the dataset CIFAR-10 (ddpm-torch
    checkpoints store neither); GroupNorm eps is ``norm_eps`` (the checkpoints do not store it either;
    see ``DDPM_TORCH_NORM_EPS`` for which one a checkpoint needs)."""
    ema = state.get("ema") if isinstance(state.get("ema"), dict) else None
    if use_ema and ema is not None and _is_state_dict(ema.get("shadow")):
        sd, weights, step = ema["shadow"], "ema", int(ema.get("num_updates", 0) or 0)
    elif _is_state_dict(state.get("model")):
        sd, weights, step = state["model"], "model", 0
    else:
        sd, weights, step = state, "model", 0
    sd = _strip_module(sd)
    model = infer_unet_kwargs(sd)
    model.update(norm_eps=float(norm_eps), drop_rate=0.1)  # ddpm-torch's CIFAR-10 dropout
    check_state(sd, model, "ddpm-torch checkpoint")
    return ImportedNetwork(sd, model, step=step, weights=weights, format="ddpm-torch")


# -------------------------------------------------------------------------------------- diffusers

# UNet2DModel options that must have these values for the network to be the DDPM UNet
# (None as the expected value means "must be unset"); missing keys take diffusers' defaults.
_DIFFUSERS_FIXED = {"act_fn": ("silu", "silu"), "time_embedding_type": ("positional", "positional"),
                    "flip_sin_to_cos": (True, False), "freq_shift": (0, 1), "downsample_padding": (1, 0),
                    "center_input_sample": (False, False), "mid_block_scale_factor": (1, 1),
                    "resnet_time_scale_shift": ("default", "default"), "add_attention": (True, True),
                    "downsample_type": ("conv", "conv"), "upsample_type": ("conv", "conv"),
                    "class_embed_type": (None, None), "num_class_embeds": (None, None),
                    "time_embedding_dim": (None, None), "attn_norm_num_groups": (None, None),
                    "mid_block_type": ("UNetMidBlock2D", "UNetMidBlock2D")}


def unet_kwargs_from_diffusers(conf: dict) -> dict:
    """Our ``model`` config section for a diffusers ``UNet2DModel`` config; UserError if it is not the DDPM UNet."""
    bad = [f"{k}={conf.get(k, default)!r} (need {need!r})" for k, (default, need) in _DIFFUSERS_FIXED.items()
           if conf.get(k, default) != need]
    down, up = list(conf.get("down_block_types", [])), list(conf.get("up_block_types", []))
    channels = list(conf.get("block_out_channels", []))
    attn = [t == "AttnDownBlock2D" for t in down]
    if not channels or len(down) != len(channels) or len(up) != len(channels) \
            or any(t not in ("DownBlock2D", "AttnDownBlock2D") for t in down) \
            or up != [("AttnUpBlock2D" if a else "UpBlock2D") for a in reversed(attn)]:
        bad.append(f"blocks {down} / {up} with channels {channels} (need DownBlock2D/AttnDownBlock2D mirrored "
                   f"by UpBlock2D/AttnUpBlock2D)")
    hid = channels[0] if channels else 1
    if any(c % hid for c in channels):
        bad.append(f"block_out_channels {channels} (need multiples of the first)")
    head_dim = conf.get("attention_head_dim", 8)
    # Single-head attention everywhere (the middle block always has attention): head_dim = width, or unset.
    widths = {c for c, a in zip(channels, attn, strict=False) if a} | set(channels[-1:])
    if head_dim is not None and widths != {head_dim}:
        bad.append(f"attention_head_dim={head_dim} (need null: single-head attention)")
    if conf.get("out_channels", 3) != conf.get("in_channels", 3):
        bad.append(f"out_channels={conf.get('out_channels', 3)} (need in_channels={conf.get('in_channels', 3)})")
    if bad:
        raise UserError(f"unsupported diffusers UNet2DModel config: {'; '.join(bad)}; only the DDPM UNet "
                        f"(google/ddpm-cifar10-32 layout) can be imported")
    return {"in_channels": int(conf.get("in_channels", 3)), "hid_channels": int(hid),
            "ch_multipliers": [int(c // hid) for c in channels], "num_res_blocks": int(conf.get("layers_per_block", 2)),
            "apply_attn": attn, "resample_with_conv": True, "norm_groups": int(conf.get("norm_num_groups", 32)),
            "norm_eps": float(conf.get("norm_eps", 1e-5)), "drop_rate": float(conf.get("dropout", 0.0))}


def diffusers_unet_config(model: dict, image_size: int) -> dict:
    """The diffusers ``UNet2DModel`` keyword arguments with the same layout as our ``model`` config section
    (the inverse of ``unet_kwargs_from_diffusers``): load ``to_diffusers_state`` weights into it and it computes
    what our UNet computes. Used by the benchmark to compare against diffusers on equal terms."""
    hid, attn = int(model["hid_channels"]), [bool(a) for a in model["apply_attn"]]
    if not model.get("resample_with_conv", True):
        raise UserError("diffusers' UNet2DModel always resamples with convolutions; set model.resample_with_conv=true")
    conf = {k: need for k, (_, need) in _DIFFUSERS_FIXED.items()}
    conf.update(sample_size=int(image_size), in_channels=int(model["in_channels"]),
                out_channels=int(model["in_channels"]),
                block_out_channels=[hid * int(c) for c in model["ch_multipliers"]],
                layers_per_block=int(model["num_res_blocks"]), attention_head_dim=None,
                down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
                up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
                norm_num_groups=int(model["norm_groups"]), norm_eps=float(model["norm_eps"]),
                dropout=float(model["drop_rate"]))
    return conf


# DDPMScheduler config → our diffusion section.
_SCHEDULES = {"linear": "linear", "scaled_linear": "quad", "squaredcos_cap_v2": "cosine"}
_PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
_VARIANCES = {"fixed_small": "fixed-small", "fixed_small_log": "fixed-small", "fixed_large": "fixed-large",
              "fixed_large_log": "fixed-large"}


def diffusion_from_scheduler(conf: dict | None) -> dict:
    """Our ``diffusion`` section from a diffusers DDPMScheduler config (DDPM CIFAR-10 values without one)."""
    if conf is None:
        return dict(DDPM_DIFFUSION)
    picks = {"beta_schedule": (_SCHEDULES, conf.get("beta_schedule", "linear")),
             "model_mean_type": (_PREDICTIONS, conf.get("prediction_type", "epsilon")),
             "model_var_type": (_VARIANCES, conf.get("variance_type", "fixed_small"))}
    out = dict(DDPM_DIFFUSION, timesteps=int(conf.get("num_train_timesteps", 1000)),
               beta_start=float(conf.get("beta_start", 1e-4)), beta_end=float(conf.get("beta_end", 0.02)))
    for key, (table, value) in picks.items():
        if value not in table:
            raise UserError(f"scheduler config: {value!r} is not supported for {key}; supported: {sorted(table)}")
        out[key] = table[value]
    if conf.get("trained_betas") is not None:
        raise UserError("scheduler config has trained_betas; only named beta schedules can be imported")
    return out


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and (_unet_dir(path) is not None)


def _unet_dir(path: Path) -> Path | None:
    for d in (path, path / "unet"):
        if (d / "config.json").is_file() and any((d / f).is_file() for f in DIFFUSERS_WEIGHT_FILES):
            return d
    return None


def _read_json_dict(path: Path) -> dict:
    try:
        conf = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"cannot read {path} ({exc}); the diffusers folder is incomplete, download it again") from None
    if not isinstance(conf, dict):
        raise UserError(f"{path} holds a JSON {type(conf).__name__}, not an object; download the folder again")
    return conf


def _scheduler_config(unet_dir: Path) -> dict | None:
    for p in (unet_dir / "scheduler_config.json", unet_dir / "scheduler" / "scheduler_config.json",
              unet_dir.parent / "scheduler" / "scheduler_config.json"):
        if p.is_file():
            return _read_json_dict(p)
    return None


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` or ``.bin`` state dict (the latter with ``torch.load(weights_only=True)``)."""
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated file, pickled code, ...
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read {path} ({first}); re-download or re-save it") from None
    if not _is_state_dict(sd):
        raise UserError(f"{path} does not hold a state dict of tensors")
    return sd


def import_diffusers(path: str | Path) -> ImportedNetwork:
    """A diffusers ``UNet2DModel`` folder (or pipeline folder with ``unet/``) → ImportedNetwork.

    These folders hold one set of weights (google/ddpm-cifar10-32 ships the non-EMA ones, REFERENCE §4).
    """
    path = Path(path)
    unet_dir = _unet_dir(path)
    if unet_dir is None:
        raise UserError(f"{path} is not a diffusers model folder (need config.json and one of "
                        f"{', '.join(DIFFUSERS_WEIGHT_FILES[:2])})")
    conf = _read_json_dict(unet_dir / "config.json")
    if conf.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise UserError(f"{unet_dir / 'config.json'} describes a {conf['_class_name']}; only UNet2DModel "
                        f"(the DDPM UNet) can be imported")
    model = unet_kwargs_from_diffusers(conf)
    weights_file = next(unet_dir / f for f in DIFFUSERS_WEIGHT_FILES if (unet_dir / f).is_file())
    sd = from_diffusers_state(read_weights_file(weights_file), model)
    size = conf.get("sample_size", 32)
    size = size[0] if isinstance(size, (list, tuple)) else size
    dataset = {"name": "cifar10"} if (size, model["in_channels"]) == (32, 3) else \
        {"name": "image_folder", "image_size": int(size)}
    return ImportedNetwork(sd, model, diffusion_from_scheduler(_scheduler_config(unet_dir)), dataset,
                           format="diffusers")
