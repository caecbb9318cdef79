"""``scripts/bench.py``: one benchmark entry point; prints a table and writes JSON.

Parts (``--parts``, default all):
  peaks           fp32 matmul and channels_last 3×3 convolution GFLOP/s: the machine's ceilings
  train           CIFAR-10 DDPM UNet training step, ours vs diffusers UNet2DModel (same layout and weights)
  train_twoscale  the same for the twoscale quickstart UNet
  modes           baseline, C, CS, CR trainer steps and a MaskPro update on the twoscale model
  ddim            DDIM sampling, ours vs a diffusers DDIMScheduler loop, and the sampler's own overhead
  inception       FID Inception features, ours vs pytorch-fid (identical random weights)
  fid             Fréchet distance at 2048 dims, ours vs pytorch-fid

Within a part the candidates run alternately, round after round, in one process, and the fastest round
counts, so background load hits all of them alike. Peak memory: each candidate is then built and run alone in
a child process (peak RSS on the CPU, ``max_memory_allocated`` on CUDA). Where bf16 is native (CUDA, or a CPU
with AVX512-BF16/AMX) the training parts add bf16 autocast candidates; ``--compile`` adds ``torch.compile``
candidates on the CIFAR-10 UNet, with their compile time (warm-up call minus the eager twin's) reported apart.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from functools import partial

import torch

from .. import dist
from ..config import load_config
from . import evaluation, modes, train
from .timing import best, sync, time_interleaved

PARTS = ["peaks", "train", "train_twoscale", "modes", "ddim", "inception", "fid"]


# --- the candidates of each part: {name: factory}, a factory building the callable to time -----------------

def train_setting(part: str, args) -> tuple[str, list[str], int]:
    """(config path, overrides, batch) of a training part."""
    if part == "train":
        return args.train_config, args.train_set, args.batch
    return args.twoscale_config, args.twoscale_set, args.twoscale_batch


def train_cases(args, part: str, out: dict) -> dict:
    cfg_path, overrides, batch = train_setting(part, args)
    cfg = out["cfg"] = load_config(cfg_path, overrides)
    cases = {"ours": partial(train.make_train_step, cfg, "ours", batch, args.device, True),
             "ours_nchw": partial(train.make_train_step, cfg, "ours", batch, args.device, False),
             "diffusers": partial(train.make_train_step, cfg, "diffusers", batch, args.device, False),
             "diffusers_channels_last": partial(train.make_train_step, cfg, "diffusers", batch, args.device, True)}
    bf16 = bf16_available(args.device)
    if bf16:
        cases["ours_bf16"] = partial(train.make_train_step, cfg, "ours", batch, args.device, True, True)
        cases["diffusers_bf16"] = partial(train.make_train_step, cfg, "diffusers", batch, args.device, False, True)
    if args.compile and part == "train":
        cases["ours_compiled"] = partial(train.make_train_step, cfg, "ours", batch, args.device, True, False, True)
        if bf16:
            cases["ours_bf16_compiled"] = partial(train.make_train_step, cfg, "ours", batch, args.device, True,
                                                  True, True)
    return cases


def bf16_available(device: str) -> bool:
    """bf16 autocast candidates: on CUDA GPUs that support bf16 and on CPUs with native bf16 (as training)."""
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    from ..training.trainer import cpu_bf16_supported

    return device == "cpu" and cpu_bf16_supported()


def peaks_cases(args) -> dict:
    return {"matmul": partial(train.matmul_peak_case, args.device),
            "conv_channels_last": partial(train.conv_peak_case, args.device)}


def modes_cases(args, tmp: str) -> dict:
    cases = {m: partial(modes.make_mode_step, args.modes_config, m, args.modes_batch, f"{tmp}/{m}",
                        args.modes_set, args.device) for m in modes.MODES}
    cases["MaskPro"] = partial(modes.make_maskpro_step, args.modes_config, args.modes_batch, args.modes_set,
                               args.device)
    return cases


def part_cases(part: str, args, out: dict, tmp: str) -> dict:
    if part == "peaks":
        return peaks_cases(args)
    if part in ("train", "train_twoscale"):
        return train_cases(args, part, out)
    if part == "modes":
        return modes_cases(args, tmp)
    return {"ddim": evaluation.ddim_cases, "inception": evaluation.inception_cases,
            "fid": evaluation.fid_cases}[part](args, out)


# --- what each part reports -------------------------------------------------------------------------------

def train_summary(args, part: str, secs: dict, cfg, peaks: dict | None, first_call: dict) -> dict:
    cfg_path, _, batch = train_setting(part, args)
    flops = train.step_flops(cfg, batch)
    ips = {k: batch / s for k, s in secs.items()}
    res = {"config": cfg_path, "batch": batch, "img_per_sec": ips,
           "speedup_vs_diffusers": ips["ours"] / ips["diffusers"],
           "speedup_vs_diffusers_channels_last": ips["ours"] / ips["diffusers_channels_last"],
           "gflop_per_step": flops / 1e9, "ours_gflop_per_sec": flops / secs["ours"] / 1e9,
           "max_abs_output_diff_vs_diffusers": train.outputs_max_diff(cfg),
           # the warm-up call of each candidate; for a compiled one, minus its eager twin's, the compile time
           "first_call_sec": first_call}
    for name, eager in (("ours_compiled", "ours"), ("ours_bf16_compiled", "ours_bf16")):
        if name in ips:
            res.setdefault("compile_sec", {})[name] = first_call[name] - first_call[eager]
            res.setdefault("compiled_vs_eager", {})[name] = ips[name] / ips[eager]
    if "ours_bf16" in ips:
        res["bf16_vs_fp32"] = {"ours": ips["ours_bf16"] / ips["ours"],
                               "diffusers": ips["diffusers_bf16"] / ips["diffusers"]}
        res["bf16_output_rel_diff"] = train.bf16_output_rel_diff(cfg, args.device)
    if peaks:
        res["fraction_of_matmul_peak"] = res["ours_gflop_per_sec"] / peaks["gflop_per_sec"]["matmul"]
        res["fraction_of_conv_peak"] = res["ours_gflop_per_sec"] / peaks["gflop_per_sec"]["conv_channels_last"]
    return res


def summarize(part: str, args, secs: dict, out: dict, results: dict, first_call: dict) -> dict:
    if part == "peaks":
        flops = train.peak_flops()
        return {"gflop_per_sec": {k: flops[k] / secs[k] / 1e9 for k in secs}, "shapes": train.PEAK_SHAPES}
    if part in ("train", "train_twoscale"):
        return train_summary(args, part, secs, out["cfg"], results.get("peaks"), first_call)
    if part == "modes":
        ips = {k: args.modes_batch / s for k, s in secs.items()}
        return {"config": args.modes_config, "batch": args.modes_batch, "img_per_sec": ips,
                "ratio_vs_baseline": {k: v / ips["baseline"] for k, v in ips.items()},
                "ratio_vs_C": {k: v / ips["C"] for k, v in ips.items()},
                "targets": {"CS": ">= 0.98 x C", "CR": ">= 0.95 x C"}}
    return {"ddim": evaluation.ddim_summary, "inception": evaluation.inception_summary,
            "fid": evaluation.fid_summary}[part](args, secs, out)


# --- peak memory: each candidate alone in a child process ----------------------------------------------

def _memory_mb(field: str) -> float:
    """``VmHWM`` (peak) or ``VmRSS`` (current) resident memory of this process in MB, from /proc (Linux). Not
    ``getrusage``: its ru_maxrss survives fork + exec, so a child would report its parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / (1024 if sys.platform == "darwin" else 1)


def child_memory(args) -> None:
    """``--memory-child PART:NAME``: build and run one candidate twice; print its peak memory as JSON."""
    part, name = args.memory_child.split(":")
    cuda = args.device.startswith("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        before = _memory_mb("VmRSS")
        fn = part_cases(part, args, {}, tmp)[name]()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        fn(), fn()
        sync(args.device)
        res = {"peak_rss_mb": _memory_mb("VmHWM"), "rss_before_build_mb": before}
        if cuda:
            res["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    print("MEMORY " + json.dumps(res), flush=True)


def measure_memory(part: str, names, argv: list[str]) -> dict:
    out = {}
    for name in names:
        proc = subprocess.run([sys.executable, "-m", "ddpm_curriculum.bench.cli", *argv, "--memory-child",
                               f"{part}:{name}"], capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEMORY ")]
        if proc.returncode or not lines:
            out[name] = {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
        else:
            out[name] = json.loads(lines[-1][len("MEMORY "):])
    return out


# --- table ------------------------------------------------------------------------------------------------

def _mem(res: dict, name: str) -> str:
    m = res.get("memory", {}).get(name, {})
    if "cuda_max_allocated_mb" in m:
        return f"{m['cuda_max_allocated_mb']:.0f} MB cuda"
    if "peak_rss_mb" not in m:
        return ""
    return f"{m['peak_rss_mb']:.0f} MB (+{m['peak_rss_mb'] - m['rss_before_build_mb']:.0f})"


TRAIN_TARGETS = {("train", "ours"): ">= 1.25x", ("train", "ours_bf16"): ">= 2.5x"}  # vs diffusers fp32


def _train_note(r: dict, k: str, frac: str) -> str:
    if k == "ours":
        return f"{r['ours_gflop_per_sec']:.1f} GFLOP/s{frac}; |out diff| {r['max_abs_output_diff_vs_diffusers']:.1e}"
    notes = []
    if k == "ours_bf16":
        notes.append(f"{r['bf16_vs_fp32']['ours']:.2f}x ours fp32; rel out diff {r['bf16_output_rel_diff']:.1e}")
    if k in r.get("compile_sec", {}):
        notes.append(f"{r['compiled_vs_eager'][k]:.2f}x eager; compile {r['compile_sec'][k]:.0f} s")
    return "; ".join(notes)


def table(results: dict) -> str:
    rows = [("part", "candidate", "speed", "ratio", "target", "peak mem", "notes")]
    if "peaks" in results:
        r = results["peaks"]
        for k, v in r["gflop_per_sec"].items():
            rows.append(("peaks", k, f"{v:.1f} GFLOP/s", "", "", _mem(r, k), r["shapes"][k]))
    for part in ("train", "train_twoscale"):
        if part in results:
            r = results[part]
            frac = (f"; {100 * r['fraction_of_matmul_peak']:.0f}% of matmul, {100 * r['fraction_of_conv_peak']:.0f}% "
                    f"of conv peak" if "fraction_of_conv_peak" in r else "")
            for k, v in r["img_per_sec"].items():
                ratio = v / r["img_per_sec"]["diffusers"]
                rows.append((f"{part} b{r['batch']}", k, f"{v:.1f} img/s", f"{ratio:.2f}x",
                             TRAIN_TARGETS.get((part, k), ""), _mem(r, k), _train_note(r, k, frac)))
    if "modes" in results:
        r = results["modes"]
        for k, v in r["img_per_sec"].items():
            target = {"CS": ">= 0.98x C", "CR": ">= 0.95x C"}.get(k, "")
            rows.append((f"modes b{r['batch']}", k, f"{v:.1f} img/s", f"{r['ratio_vs_baseline'][k]:.3f}x base",
                         target, _mem(r, k), f"{r['ratio_vs_C'][k]:.3f}x C"))
    if "ddim" in results:
        r = results["ddim"]
        diff = r["max_abs_diff_vs_diffusers"]
        for k, _ref in (("ours", "diffusers"), ("diffusers", "ours")):
            ips = r[f"{k}_img_per_sec"]
            rows.append((f"ddim {r['steps']} steps b{r['batch']}", k, f"{ips:.2f} img/s",
                         f"{ips / r['diffusers_img_per_sec']:.2f}x", ">= 1.0x, overhead < 2%" if k == "ours" else "",
                         _mem(r, k), f"overhead {100 * r[f'{k}_overhead']:.2f}%"
                         + (f"; |x0 diff| {diff:.1e}" if diff is not None and k == "ours" else "")))
    if "inception" in results:
        r = results["inception"]
        for k in ("ours", "pytorch_fid"):
            ips = r[f"{k}_img_per_sec"]
            rows.append((f"inception b{r['batch']}", k, f"{ips:.1f} img/s",
                         f"{ips / r['pytorch_fid_img_per_sec']:.2f}x",
                         ">= 1.0x" if k == "ours" else "", _mem(r, k),
                         f"|feature diff| {r['max_abs_feature_diff']:.1e}" if k == "ours" else ""))
    if "fid" in results:
        r = results["fid"]
        for k in ("ours", "pytorch_fid"):
            rows.append((f"frechet {r['dims']}-d", k, f"{r[f'{k}_sec']:.2f} s",
                         f"{r['pytorch_fid_sec'] / r[f'{k}_sec']:.1f}x", ">= 5x" if k == "ours" else "", _mem(r, k),
                         f"rel diff {r['rel_diff']:.1e}" if k == "ours" else ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


# --- entry point ------------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rounds", type=int, default=5, help="alternating timed rounds; the fastest counts")
    p.add_argument("--steps", type=int, default=3, help="calls per timed round (training and mode steps)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-candidate peak-memory child runs")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--compile", action="store_true",
                   help="part train: add our UNet under torch.compile (model.compile; compiling takes minutes)")
    p.add_argument("--batch", type=int, default=16, help="part train: batch size")
    p.add_argument("--train-config", default="configs/cifar10_c.json")
    p.add_argument("--train-set", action="append", default=[], help="override for --train-config (repeatable)")
    p.add_argument("--twoscale-config", default="configs/quickstart.json")
    p.add_argument("--twoscale-set", action="append", default=[])
    p.add_argument("--twoscale-batch", type=int, default=128)
    p.add_argument("--modes-config", default="configs/twoscale_c.json", help="a mode-C config")
    p.add_argument("--modes-set", action="append", default=[])
    p.add_argument("--modes-batch", type=int, default=128)
    p.add_argument("--ddim-config", default="configs/cifar10_c.json")
    p.add_argument("--ddim-set", action="append", default=[])
    p.add_argument("--ddim-batch", type=int, default=4)
    p.add_argument("--ddim-steps", type=int, default=10)
    p.add_argument("--ddim-eta", type=float, default=0.0, help="η > 0 also times the per-image noise draws")
    p.add_argument("--inception-images", type=int, default=64)
    p.add_argument("--inception-batch", type=int, default=16)
    p.add_argument("--fid-dims", type=int, default=2048)
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    dist.parse_device(args.device)  # an unknown or absent device is a one-line error
    unknown = [x for x in args.parts.split(",") if x not in PARTS]
    if unknown:
        p.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.memory_child:
        child_memory(args)
        return 0
    results = {"device": args.device, "threads": torch.get_num_threads(), "torch": torch.__version__,
               "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    if args.device.startswith("cuda"):
        results["gpu"] = torch.cuda.get_device_name()
    for part in args.parts.split(","):
        out: dict = {}
        with tempfile.TemporaryDirectory() as tmp:
            fns = {name: factory() for name, factory in part_cases(part, args, out, tmp).items()}
            steps = args.steps if part in ("train", "train_twoscale", "modes", "peaks") else 1
            first_call: dict = {}
            secs = best(time_interleaved(fns, args.rounds, steps, args.device, first_call))
            del fns
        results[part] = summarize(part, args, secs, out, results, first_call)
        if not args.no_memory:
            results[part]["memory"] = measure_memory(part, list(secs), argv)
        print(f"{part}: done", flush=True)
        if args.json:  # after every part, so an interrupted run keeps what it measured
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
    print(table(results))
    return 0


if __name__ == "__main__":
    from ..errors import run_cli

    raise SystemExit(run_cli(main))
