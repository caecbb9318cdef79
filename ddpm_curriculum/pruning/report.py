"""Compression report: dense, structured, N:M and hybrid networks side by side (``scripts/compression_report.py``).

For every candidate (any network ``load_network`` reads):

- **size**: parameters, nonzero parameters (masked weights are exact zeros), MACs per image (``cost.py``: every
  weight counts, zero or not), bytes of the dense state dict, and for N:M-masked networks the bytes of the
  compact N:M form (``nm.export_compact``: kept values + index patterns);
- **speed**: DDIM sampling of ``batch`` images with ``steps`` steps on this machine, all candidates timed in
  the same process in interleaved rounds (``bench.timing.time_interleaved``; one warm-up each), so a change of
  machine load hits all alike; median and fastest round, images per second, and the ratio to the reference;
- **peak memory**: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of a fresh subprocess per candidate (Linux: KiB
  → bytes) after loading the network and after one sampling batch (the whole process, torch included); on Linux
  also what the batch added: its peak RSS (VmHWM, reset after loading via ``/proc/self/clear_refs``) minus the
  RSS before it;
- **quality**: the twoscale oracle metrics (``metrics/oracle.py``) of ``eval_samples`` DDIM samples, same seeds
  for every candidate, where the network was trained on twoscale.

Only structured pruning makes a network cheaper to run with dense kernels: it has fewer channels. Masked
networks (N:M, magnitude) keep every multiplication on a CPU, so they save storage (compact form) but no time;
N:M speed needs sparse kernels (2:4 sparse tensor cores, ``semistructured.py``), which this report does not use.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import atomic_write
from ..errors import UserError
from .cost import count_macs, count_nonzeros, state_dict_bytes

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Settings:
    batch: int = 16
    steps: int = 20  # DDIM steps
    rounds: int = 5
    eval_samples: int = 256
    eval_steps: int = 50
    threads: int = 0  # 0: torch's default
    memory: bool = True
    seed: int = 0

    def check(self) -> None:
        for name in ("batch", "steps", "rounds"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} {getattr(self, name)} must be ≥ 1")
        if self.eval_samples < 0 or self.eval_steps < 1:
            raise UserError("--eval_samples must be ≥ 0 and --eval_steps ≥ 1")


QUICK = Settings(batch=2, steps=3, rounds=3, eval_samples=16, eval_steps=3, memory=False)


def parse_candidates(items: list[str]) -> dict[str, str]:
    """``NAME=PATH`` items → {name: path} in the given order (the first is the reference)."""
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--candidate {item!r} must be NAME=PATH (e.g. dense=runs/quickstart-…)")
        if name in out:
            raise UserError(f"--candidate name {name!r} is given twice; give each candidate its own name")
        out[name] = path
    if not out:
        raise UserError("give at least one --candidate NAME=PATH (the first is the reference, e.g. dense)")
    return out


def kind(net) -> str:
    """dense, structured, N:M, hybrid (structured + N:M) or masked (other zero patterns)."""
    from .nm import nm_compliance

    structured = bool(net.config.model.widths)
    masks = net.masks or {}
    nm = bool(masks) and all(nm_compliance(k, net.config.maskpro.n, net.config.maskpro.m) == 1.0
                             for k in masks.values())
    if masks and not nm:
        return "structured + masked" if structured else "masked"
    return {(False, False): "dense", (True, False): "structured", (False, True): "N:M",
            (True, True): "hybrid"}[(structured, nm)]


def _compact_bytes(net) -> int | None:
    import io

    from .nm import export_compact, nm_compliance

    mp = net.config.maskpro
    if not net.masks or not all(nm_compliance(k, mp.n, mp.m, mp.order) == 1.0 for k in net.masks.values()):
        return None
    obj, _ = export_compact(net.model.state_dict(), net.masks, mp.n, mp.m, mp.order, net.config.to_dict())
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()


def size_row(net) -> dict:
    from ..training import builders

    shape = builders.image_shape(net.config)
    return {"kind": kind(net), "params": sum(p.numel() for p in net.model.parameters()),
            "nonzeros": count_nonzeros(net.model), "macs_per_image": count_macs(net.model, shape),
            "state_dict_bytes": state_dict_bytes(net.model), "nm_compact_bytes": _compact_bytes(net),
            "checkpoint_file_bytes": Path(net.source).stat().st_size, "source": str(net.source)}


def _sampler(net, s: Settings):
    """One timed unit: DDIM with ``s.steps`` steps on images 0 … batch−1 of ``generate.py --seed s.seed``."""
    from ..sampling import sample_batch, spec_from_sample_steps
    from ..training import builders

    shape, spec = builders.image_shape(net.config), spec_from_sample_steps(s.steps)
    return lambda: sample_batch(net.diffusion, net.model, spec, range(s.batch), s.seed, shape, "cpu")


def _proc_status_bytes(key: str) -> int | None:
    """``VmRSS``/``VmHWM`` of /proc/self/status in bytes (Linux), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS: Linux ``clear_refs`` value 5."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def sampling_peak_rss(path: str, s: Settings) -> dict:
    """Memory of this process (bytes): ``ru_maxrss`` after loading ``path`` and after one sampling batch; on
    Linux also the peak RSS of the sampling alone (VmHWM reset after loading) minus the RSS before it."""
    import resource

    from ..training.checkpoint import load_network

    scale = 1 if sys.platform == "darwin" else 1024  # Linux reports KiB
    net = load_network(path)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    rss_before = _proc_status_bytes("VmRSS")
    reset = _reset_peak_rss()
    _sampler(net, s)()
    # Linux: the VmHWM reset also resets ru_maxrss, so the process peak is the larger of the two readings
    peak = max(loaded, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)
    hwm = _proc_status_bytes("VmHWM") if reset else None
    return {"maxrss_loaded_bytes": loaded, "maxrss_after_sampling_bytes": peak,
            "sampling_added_bytes": None if hwm is None or rss_before is None else hwm - rss_before}


def _memory_child(path: str, settings: dict) -> None:
    s = Settings(**settings)
    if s.threads:
        torch.set_num_threads(s.threads)
    print(json.dumps(sampling_peak_rss(path, s)))


def measure_memory(path: str, s: Settings) -> dict:
    """``sampling_peak_rss`` in a fresh subprocess (so one candidate's peak does not hide another's)."""
    code = "import json, sys; from ddpm_curriculum.pruning.report import _memory_child; " \
           "_memory_child(sys.argv[1], json.loads(sys.argv[2]))"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", code, str(path), json.dumps(s.__dict__)], capture_output=True,
                         check=False, text=True, env=env)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"the memory subprocess for {path} failed ({last[:200]}); rerun with --memory none")
    return json.loads(res.stdout.strip().splitlines()[-1])


def quality(net, s: Settings) -> dict | None:
    if net.config.dataset.name != "twoscale" or s.eval_samples == 0:
        return None
    from ..training import builders
    from ..training.reporting import sample_oracle_metrics

    return sample_oracle_metrics(net.diffusion, net.model, builders.make_dataset(net.config), s.eval_samples,
                                 s.eval_steps, s.seed, max(s.batch, 64), "cpu")


def compare(candidates: dict[str, str], s: Settings, progress=print) -> dict:
    """Every measurement of every candidate → the ``evaluation_results.json`` object."""
    from ..training import builders
    from ..training.checkpoint import load_network

    s.check()
    if s.threads:
        torch.set_num_threads(s.threads)
    nets = {name: load_network(path) for name, path in candidates.items()}
    for net in nets.values():
        net.model = net.model.to(memory_format=torch.contiguous_format).float()
    if len({builders.image_shape(n.config) for n in nets.values()}) > 1:
        raise UserError("the candidates generate images of different sizes; compare networks of one dataset")
    rows = {name: size_row(net) for name, net in nets.items()}
    progress(f"timing DDIM-{s.steps} sampling of {s.batch} images, {s.rounds} interleaved rounds")
    times = time_candidates(nets, s)
    ref = next(iter(nets))
    for name, t in times.items():
        rows[name]["latency_sec"] = {"median": statistics.median(t), "min": min(t), "rounds": t}
        rows[name]["images_per_sec"] = s.batch / statistics.median(t)
    for name in rows:
        rows[name]["latency_vs_reference"] = rows[name]["latency_sec"]["median"] / rows[ref]["latency_sec"]["median"]
        rows[name]["speedup_vs_reference"] = 1.0 / rows[name]["latency_vs_reference"]
        for key in ("params", "nonzeros", "macs_per_image", "state_dict_bytes"):
            rows[name][f"{key}_vs_reference"] = rows[name][key] / rows[ref][key]
    for name, path in candidates.items():
        if s.memory:
            progress(f"peak memory of {name} (fresh subprocess)")
            rows[name]["memory"] = measure_memory(path, s)
        else:
            rows[name]["memory"] = None
        progress(f"quality of {name}")
        rows[name]["oracle_metrics"] = quality(nets[name], s)
    return {"reference": ref, "settings": dict(s.__dict__, torch_threads=torch.get_num_threads(),
                                                cpu_count=os.cpu_count(), torch=torch.__version__),
            "how": {"latency": "DDIM sampling (eta 0) of `batch` images, all candidates in one process, interleaved "
                               "rounds after one warm-up each; median and fastest round",
                    "memory": "resource ru_maxrss of a fresh subprocess per candidate, after loading and after one "
                              "sampling batch (includes the Python/torch runtime); 'sampling added' = peak RSS "
                              "during the batch (Linux VmHWM, reset after loading) minus the RSS before it",
                    "macs": "Conv2d, Linear and attention matmuls, one image, zeros counted (dense kernels)",
                    "speed_note": "structured pruning removes channels, so dense CPU kernels do less work; N:M and "
                                  "other masks only zero weights: without sparse kernels they save storage (the "
                                  "compact N:M form), not time"},
            "candidates": rows}


def time_candidates(nets: dict, s: Settings) -> dict[str, list[float]]:
    from ..bench.timing import time_interleaved

    return time_interleaved({name: _sampler(net, s) for name, net in nets.items()}, s.rounds)


# --------------------------------------------------------------------------------------------- output


def _mb(x) -> str:
    return "–" if x is None else f"{x / 2 ** 20:.2f}"


def table(results: dict) -> str:
    s = results["settings"]
    ref = results["reference"]
    lines = [f"Reference: `{ref}`. Sampling: DDIM-{s['steps']}, batch {s['batch']}, {s['rounds']} interleaved rounds, "
             f"{s['torch_threads']} torch threads, {s['cpu_count']} CPUs, torch {s['torch']}.", "",
             "| network | kind | params | nonzeros | MACs/image | dense weights MiB | N:M compact MiB | "
             "latency median s | ×ref | images/s | peak RSS MiB | sampling added MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["candidates"].items():
        mem = r["memory"] or {}
        lines.append(f"| {name} | {r['kind']} | {r['params']:,} | {r['nonzeros']:,} | {r['macs_per_image']:,} | "
                     f"{_mb(r['state_dict_bytes'])} | {_mb(r['nm_compact_bytes'])} | "
                     f"{r['latency_sec']['median']:.3f} | {r['latency_vs_reference']:.2f} | "
                     f"{r['images_per_sec']:.1f} | {_mb(mem.get('maxrss_after_sampling_bytes'))} | "
                     f"{_mb(mem.get('sampling_added_bytes'))} |")
    metrics = [(n, r["oracle_metrics"]) for n, r in results["candidates"].items() if r["oracle_metrics"]]
    if metrics:
        keys = ["major_coverage", "minor_coverage", "major_amplitude", "minor_amplitude", "major_present",
                "minor_present", "residual_ratio"]
        lines += ["", f"Quality: twoscale oracle metrics of {metrics[0][1]['num_samples']} DDIM-{s['eval_steps']} "
                      f"samples (seed {s['seed']}).", "", "| network | " + " | ".join(keys) + " |",
                  "|---|" + "---|" * len(keys)]
        lines += [f"| {n} | " + " | ".join(f"{m[k]:.3f}" for k in keys) + " |" for n, m in metrics]
    note = results["how"]["speed_note"]
    lines += ["", note[0].upper() + note[1:] + ".", ""]
    return "\n".join(lines)


def figure(results: dict, path: Path) -> str | None:
    """A bar chart per measure, relative to the reference; None, or why it was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[plot]'): no comparison.png"
    names = list(results["candidates"])
    measures = [("params_vs_reference", "parameters"), ("nonzeros_vs_reference", "nonzeros"),
                ("macs_per_image_vs_reference", "MACs / image"), ("latency_vs_reference", "sampling latency")]
    fig, axes = plt.subplots(1, len(measures), figsize=(3.2 * len(measures), 3.2), sharey=True)
    for ax, (key, title) in zip(axes, measures, strict=True):
        ax.bar(names, [results["candidates"][n][key] for n in names], color="tab:blue")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=45)
    axes[0].set_ylabel(f"relative to {results['reference']}")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return None


def write_outputs(results: dict, out: Path) -> list[str]:
    """``evaluation_results.json``, ``comparison_table.md`` and ``comparison.png`` in ``out``; returns notes."""
    out.mkdir(parents=True, exist_ok=True)
    note = figure(results, out / "comparison.png")
    results["figure"] = None if note else "comparison.png"
    if note:
        results["figure_note"] = note
    atomic_write(out / "evaluation_results.json", lambda f: f.write(json.dumps(results, indent=2).encode()))
    atomic_write(out / "comparison_table.md", lambda f: f.write(table(results).encode()))
    return [note] if note else []


# ------------------------------------------------------------------------------------------ command line


def parse_args(argv=None):
    import argparse

    p = argparse.ArgumentParser(description="Dense, structured, N:M and hybrid networks side by side: size, "
                                            "CPU sampling speed, peak memory, twoscale quality. See README.md, "
                                            "'Pruning'.")
    p.add_argument("--candidate", action="append", default=[], metavar="NAME=PATH",
                   help="a network (run dir, checkpoint, pruned.pt); repeat; the first is the reference")
    p.add_argument("--out", required=True, help="output folder")
    d = Settings()
    p.add_argument("--batch", type=int, default=d.batch, help="images per sampling call")
    p.add_argument("--steps", type=int, default=d.steps, help="DDIM steps of the timed sampling")
    p.add_argument("--rounds", type=int, default=d.rounds, help="interleaved timing rounds")
    p.add_argument("--eval_samples", type=int, default=d.eval_samples, help="twoscale: samples for the metrics")
    p.add_argument("--eval_steps", type=int, default=d.eval_steps, help="twoscale: DDIM steps for the metrics")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (0: torch's default)")
    p.add_argument("--memory", choices=["subprocess", "none"], default="subprocess",
                   help="peak memory by ru_maxrss of one fresh subprocess per candidate, or skip it")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--quick", action="store_true", help="tiny settings (batch 2, 3 steps, 3 rounds, 16 "
                   "samples, no memory subprocess): checks the workflow, measures nothing meaningful")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    candidates = parse_candidates(args.candidate)
    s = Settings(**QUICK.__dict__) if args.quick else Settings(
        args.batch, args.steps, args.rounds, args.eval_samples, args.eval_steps, args.threads,
        args.memory == "subprocess", args.seed)
    s.threads = args.threads
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder")
    results = compare(candidates, s)
    results["quick"] = args.quick
    notes = write_outputs(results, out)
    print(table(results))
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {out}/evaluation_results.json, comparison_table.md" + ("" if notes else ", comparison.png"))
    return 0
