"""The Python steps of ``scripts/gpu_check.sh`` (one-shot GPU check) and its report.

``python -m ddpm_curriculum.bench.gpu_check STEP OUT_JSON [ARGS]``: each step writes its numbers as JSON to
OUT_JSON; the shell script times each step, applies its timeout and records pass/fail in ``steps.jsonl``;
``report OUT_DIR`` turns that into ``gpu_check.json`` and ``gpu_check.md`` (a table for docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path


def env() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "python": platform.python_version(),
            "cpu_cores": os.cpu_count(), "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                    gpu_memory_gb=torch.cuda.get_device_properties(0).total_memory / 2 ** 30,
                    bf16_supported=torch.cuda.is_bf16_supported(),
                    nccl_available=torch.distributed.is_nccl_available())
    return info


def run_metrics(run_dir: str) -> dict:
    """A training run's last logged loss and speed (metrics.jsonl) and whether it left a checkpoint."""
    lines = [json.loads(x) for x in Path(run_dir, "metrics.jsonl").read_text().splitlines() if x.strip()]
    last = lines[-1]
    cfg = json.loads(Path(run_dir, "config.json").read_text())
    return {"step": last["step"], "loss": last["loss"], "img_per_sec": last["img_per_sec"],
            "amp": cfg["train"]["amp"], "checkpoints": len(list(Path(run_dir, "checkpoints").glob("*.pt")))}


def ddp_nccl(steps: int = 5) -> dict:
    """Under torchrun: an nccl process group (any world size, 1 included), DDP training steps of the quickstart
    UNet and an all-reduce; rank 0 reports."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ..config import load_config
    from ..training import builders

    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl")
    cfg = load_config("configs/quickstart.json")
    torch.manual_seed(0)
    model = DDP(builders.make_model(cfg).to(device), device_ids=[local])
    diffusion = builders.make_diffusion(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x0 = torch.randn(128, *builders.image_shape(cfg), device=device)
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        t = torch.randint(0, diffusion.timesteps, (x0.shape[0],), device=device)
        loss = diffusion.training_losses(model, x0, t).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    ones = torch.ones(1, device=device)
    dist.all_reduce(ones)
    res = {"backend": dist.get_backend(), "world_size": dist.get_world_size(), "all_reduce": ones.item(),
           "step_sec_best": min(times[1:] or times), "loss": loss.item()}
    dist.destroy_process_group()
    return res if rank == 0 else {}


def semistructured(config: str = "configs/cifar10_c.json", batch: int = 64, steps: int = 10) -> dict:
    """2:4 semi-structured sampling: magnitude 2:4 masks on every eligible layer, fp16, DDIM ``steps`` steps on a
    batch, dense vs ``to_sparse_semi_structured`` (same weights); speed and max |x0 difference|."""
    import torch

    from ..config import load_config
    from ..pruning.nm import nm_mask
    from ..pruning.semistructured import semi_structured_eligible, to_semi_structured, weight_2d
    from ..sampling import SamplerSpec, sample_batch
    from ..training import builders

    cfg = load_config(config)
    torch.manual_seed(0)
    model = builders.make_model(cfg).cuda().eval()
    with torch.no_grad():
        for p in model.parameters():  # the output convolution starts at zero: give every weight a value
            p.add_(0.05 * torch.randn_like(p))
        for m in model.modules():
            w = weight_2d(m)
            if w is not None and w.shape[0] >= 64 and w.shape[1] % 64 == 0:
                m.weight.mul_(nm_mask(m.weight.flatten(1), 2, 4).view_as(m.weight))
    eligible = sum(semi_structured_eligible(m) for m in model.modules())
    model = model.half()
    diffusion, shape = builders.make_diffusion(cfg), builders.image_shape(cfg)
    spec = SamplerSpec(name="ddim", steps=steps)

    def net(x, t):
        with torch.autocast("cuda", dtype=torch.float16):
            return model(x, t).float()

    def timed():
        sample_batch(diffusion, net, spec, range(batch), 0, shape, "cuda")  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        x = sample_batch(diffusion, net, spec, range(batch), 0, shape, "cuda")
        torch.cuda.synchronize()
        return x, time.perf_counter() - t0

    dense, dense_sec = timed()
    converted = to_semi_structured(model)
    sparse, sparse_sec = timed()
    return {"config": config, "batch": batch, "ddim_steps": steps, "eligible_layers": eligible,
            "converted_layers": len(converted), "dense_img_per_sec": batch / dense_sec,
            "sparse_img_per_sec": batch / sparse_sec, "speedup": dense_sec / sparse_sec,
            "max_abs_x0_diff": float((dense - sparse).abs().max())}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def report(out_dir: str) -> dict:
    """steps.jsonl (one line per step, written by gpu_check.sh) → gpu_check.json and gpu_check.md."""
    out = Path(out_dir)
    steps = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines() if x.strip()]
    env_numbers = next((s.get("numbers", {}) for s in steps if s["name"] == "env"), {})
    res = {"env": env_numbers, "steps": steps, "passed": sum(s["status"] == "pass" for s in steps),
           "failed": [s["name"] for s in steps if s["status"] in ("fail", "timeout")],
           "total_sec": sum(s.get("wall_s", 0) for s in steps)}
    (out / "gpu_check.json").write_text(json.dumps(res, indent=2))
    head = (f"GPU check: {env_numbers.get('gpu', 'no GPU')}, torch {env_numbers.get('torch', '?')} "
            f"(CUDA {env_numbers.get('cuda_build')}), {res['passed']}/{len(steps)} steps passed in "
            f"{res['total_sec']:.0f} s")
    rows = ["| step | status | seconds (limit) | numbers |", "|---|---|---|---|"]
    for s in steps:
        nums = "; ".join(f"{k} {_fmt(v)}" for k, v in s.get("numbers", {}).items() if k != "parts")
        if s["status"] != "pass" and s.get("note"):
            nums = (nums + "; " if nums else "") + s["note"].replace("|", "/")
        rows.append(f"| {s['name']} | {s['status']} | {s.get('wall_s', 0):.1f} ({s.get('limit_s', '')}) | {nums} |")
    (out / "gpu_check.md").write_text(head + "\n\n" + "\n".join(rows) + "\n")
    return res


def bench_numbers(path: str) -> dict:
    """The headline ratios of a bench.py JSON (training: img/s and ratios to diffusers fp32; ddim: img/s)."""
    r = json.loads(Path(path).read_text())
    out = {}
    for part in ("train", "train_twoscale"):
        if part in r:
            ips = r[part]["img_per_sec"]
            out[f"{part}_img_per_sec"] = {k: round(v, 1) for k, v in ips.items()}
            out[f"{part}_vs_diffusers_fp32"] = {k: round(v / ips["diffusers"], 2) for k, v in ips.items()}
    if "ddim" in r:
        out["ddim_img_per_sec"] = {k: round(r["ddim"][f"{k}_img_per_sec"], 1) for k in ("ours", "diffusers")}
    return out


STEPS = {"env": env, "run_metrics": run_metrics, "ddp_nccl": ddp_nccl, "semistructured": semistructured,
         "bench_numbers": bench_numbers}


def main(argv: list[str]) -> int:
    if argv[:1] == ["report"]:
        res = report(argv[1])
        print(f"gpu_check: {res['passed']}/{len(res['steps'])} passed; failed: {', '.join(res['failed']) or 'none'}")
        return 0
    step, out_json, *rest = argv
    res = STEPS[step](*rest)
    if res:
        Path(out_json).write_text(json.dumps(res, indent=2))
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
