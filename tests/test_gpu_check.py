"""scripts/gpu_check.sh on a CPU machine: its syntax, its options, the clear exit without CUDA, the --cpu-smoke run
through the same step machinery, and the report it writes."""

import json
import os
import subprocess

import pytest
import torch

from ddpm_curriculum.bench import gpu_check

from .helpers import ROOT

SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def gpu_check_sh(tmp_path, *args, timeout=120):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=env)


@pytest.mark.slow
def test_syntax_and_options(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    res = gpu_check_sh(tmp_path, "--fast")
    assert res.returncode == 2 and "unknown option '--fast'" in res.stderr
    assert "--cpu-smoke" in gpu_check_sh(tmp_path, "--help").stdout


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_without_cuda_it_says_so_and_exits_2(tmp_path):
    res = gpu_check_sh(tmp_path, "--no-install")
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("gpu_check.sh: no CUDA device visible to torch")
    steps = json.loads((tmp_path / "out" / "gpu_check.json").read_text())["steps"]
    assert [(s["name"], s["status"]) for s in steps] == [("install", "skipped"), ("env", "pass")]
    assert steps[1]["numbers"]["cuda_available"] is False


@pytest.mark.slow
def test_cpu_smoke_runs_the_step_machinery(tmp_path):
    res = gpu_check_sh(tmp_path, "--no-install", "--cpu-smoke")
    assert res.returncode == 0, res.stdout + res.stderr
    out = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    status = {s["name"]: s["status"] for s in out["steps"]}
    assert status["env"] == status["train_fp32"] == "pass" and out["failed"] == []
    assert {status[k] for k in ("train_bf16", "ddp_nccl", "bench_train", "semistructured", "twoscale_quick")} \
        == {"skipped"}
    train = next(s for s in out["steps"] if s["name"] == "train_fp32")
    assert train["numbers"]["step"] == 2 and train["numbers"]["img_per_sec"] > 0 and train["wall_s"] > 0
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert md.count("\n| ") == len(out["steps"]) + 1 and "| train_fp32 | pass |" in md


def test_report_lists_failures_with_their_last_line(tmp_path):
    lines = [{"name": "env", "status": "pass", "rc": 0, "wall_s": 2.0, "limit_s": 30, "numbers": {"gpu": "X1"}},
             {"name": "ddp_nccl", "status": "fail", "rc": 1, "wall_s": 3.5, "limit_s": 45, "numbers": {},
              "note": "RuntimeError: NCCL error | unhandled"},
             {"name": "bench_train", "status": "timeout", "rc": 124, "wall_s": 120.0, "limit_s": 120, "numbers": {}}]
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    res = gpu_check.report(str(tmp_path))
    assert res["failed"] == ["ddp_nccl", "bench_train"] and res["passed"] == 1 and res["total_sec"] == 125.5
    md = (tmp_path / "gpu_check.md").read_text()
    assert md.startswith("GPU check: X1,") and "1/3 steps passed in 126 s" in md
    assert "| ddp_nccl | fail | 3.5 (45) | RuntimeError: NCCL error / unhandled |" in md
