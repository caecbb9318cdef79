"""Checkpoint safety: the one atomic writer (fsyncs, crashes), pruning by step, the run-directory lock, stale
temporary files, and damaged or incomplete checkpoints as one line with exit code 2 in every script."""

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddpm_curriculum import atomic
from ddpm_curriculum.errors import UserError, run_cli
from ddpm_curriculum.models.convert import diffusers_unet_config
from ddpm_curriculum.training import runlock
from ddpm_curriculum.training.checkpoint import (LATEST, checkpoint_name, latest_checkpoint, load_checkpoint,
                                                 save_checkpoint)
from ddpm_curriculum.training.runlock import LOCK_NAME, RunLock

from .helpers import ROOT, TINY, run_script as script

# ------------------------------------------------------------------------------- the atomic writer


def test_the_writer_fsyncs_the_file_and_then_its_directory(tmp_path, monkeypatch):
    synced = []  # per fsync call: whether its fd is a directory
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic.atomic_write(tmp_path / "a.bin", lambda f: f.write(b"abc"))
    assert synced == [False, True] and (tmp_path / "a.bin").read_bytes() == b"abc"
    synced.clear()
    save_checkpoint(tmp_path / "ck", {"step": 3, "model": {}}, {"step": 3})
    assert synced == [False, True] * 3  # checkpoint, sidecar, latest: each file, then the directory
    synced.clear()
    atomic.atomic_write(tmp_path / "b.bin", lambda f: f.write(b"x"), durable=False)
    assert synced == []


def test_a_directory_that_cannot_be_opened_is_not_an_error(tmp_path, monkeypatch):
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, flags, *a: (_ for _ in ()).throw(PermissionError("no dirs here"))
                        if Path(p).is_dir() else real_open(p, flags, *a))
    atomic.atomic_write(tmp_path / "a.bin", lambda f: f.write(b"abc"))  # as on Windows
    assert (tmp_path / "a.bin").read_bytes() == b"abc"


def test_a_crash_mid_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    atomic.atomic_write(path, lambda f: f.write(b"old contents"))

    def crash(f):
        f.write(b"new, half")
        raise KeyboardInterrupt  # killed while writing

    with pytest.raises(KeyboardInterrupt):
        atomic.atomic_write(path, crash)
    assert path.read_bytes() == b"old contents" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
    monkeypatch.setattr(os, "replace", lambda a, b: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        atomic.atomic_write(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"old contents" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_there_is_one_atomic_writer():
    """Every rename-into-place in the package goes through ddpm_curriculum/atomic.py."""
    package = ROOT / "ddpm_curriculum"
    others = [str(p.relative_to(ROOT)) for p in package.rglob("*.py")
              if p != package / "atomic.py" and ("os.replace(" in p.read_text() or "os.rename(" in p.read_text())]
    assert others == []


def test_remove_stale_temps_takes_only_the_writers_names(tmp_path):
    for name in (".ckpt_00000002.pt.tmp4242", ".latest.tmp7", ".ckpt_00000002.json.tmp99", "ckpt_00000002.pt",
                 "latest", ".notes", "x.tmp12", ".ckpt_00000002.pt.tmpfoo"):
        (tmp_path / name).write_bytes(b"x")
    removed = atomic.remove_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == [".ckpt_00000002.json.tmp99", ".ckpt_00000002.pt.tmp4242",
                                               ".latest.tmp7"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ckpt_00000002.pt.tmpfoo", ".notes", "ckpt_00000002.pt",
                                                          "latest", "x.tmp12"]
    assert atomic.remove_stale_temps(tmp_path / "missing") == []


# ------------------------------------------------------------------------------------------ pruning


def _fake_save(ckpt_dir, step, keep):
    return save_checkpoint(ckpt_dir, {"step": step, "model": {"w": torch.full((2,), float(step))}},
                           {"step": step}, keep)


def _steps(ckpt_dir):
    return sorted(int(p.stem[5:]) for p in ckpt_dir.glob("ckpt_*.pt") if p.stem[5:].isdigit())


def test_pruning_keeps_the_checkpoint_just_written_after_a_resume_from_an_earlier_step(tmp_path):
    ck = tmp_path / "checkpoints"
    for step in (100, 200, 300, 400):
        _fake_save(ck, step, keep=0)
    _fake_save(ck, 250, keep=1)  # resumed from 200, keep lowered to 1
    assert _steps(ck) == [250] and latest_checkpoint(tmp_path).name == checkpoint_name(250)
    assert not (ck / "ckpt_00000400.json").exists() and (ck / "ckpt_00000250.json").exists()
    assert torch.load(latest_checkpoint(tmp_path), weights_only=True)["model"]["w"][0] == 250
    _fake_save(ck, 260, keep=2)
    assert _steps(ck) == [250, 260]


def test_pruning_orders_by_step_not_by_name(tmp_path):
    ck = tmp_path / "checkpoints"
    _fake_save(ck, 99_999_999, keep=0)
    _fake_save(ck, 100_000_000, keep=1)  # "ckpt_100000000.pt" sorts before "ckpt_99999999.pt" by name
    assert _steps(ck) == [100_000_000] and latest_checkpoint(tmp_path).name == "ckpt_100000000.pt"
    for step in (5, 7, 3):
        _fake_save(ck, step, keep=0)
    (ck / "ckpt_final.pt").write_bytes(b"not ours to order")
    _fake_save(ck, 8, keep=3)  # keeps 8 (just written) and the two of highest step
    assert _steps(ck) == [7, 8, 100_000_000] and (ck / "ckpt_final.pt").exists()


def test_pruning_keeps_the_checkpoint_latest_names(tmp_path):
    from ddpm_curriculum.training.checkpoint import prune_checkpoints

    ck = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        _fake_save(ck, step, keep=0)
    (ck / LATEST).write_text(checkpoint_name(1))  # e.g. written by another writer meanwhile
    assert sorted(p.name for p in prune_checkpoints(ck, 1, protect=ck / checkpoint_name(3))) == [checkpoint_name(2)]
    assert _steps(ck) == [1, 3] and latest_checkpoint(tmp_path).name == checkpoint_name(1)


# ------------------------------------------------------------------------- end to end through the script

CFG = json.loads(json.dumps(TINY))
CFG["train"].update(steps=6, num_samples=0, image_intv=0, log_intv=1)
CFG["eval"] = {"num_samples": 0}
CFG["dataset"]["num_samples"] = 8  # one step per epoch: a checkpoint after every step


def train(*args, **kw):
    return script("train_curriculum.py", *args, "--device", "cpu", "--no-progress", **kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 6-step run with a checkpoint after every step, written by the script."""
    d = tmp_path_factory.mktemp("trained")
    (d / "tiny.json").write_text(json.dumps(CFG))
    res = train("--config-path", str(d / "tiny.json"), "--run-dir", str(d / "run"))
    assert res.returncode == 0, res.stderr
    return d / "run"


def _copy(run_dir, tmp_path):
    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.slow
def test_a_finished_run_leaves_no_lock(trained):
    assert _steps(trained / "checkpoints") == [1, 2, 3, 4, 5, 6] and not (trained / LOCK_NAME).exists()


@pytest.mark.slow
def test_resume_with_fewer_kept_checkpoints_keeps_the_new_one(trained, tmp_path):
    run_dir = _copy(trained, tmp_path)
    ck = run_dir / "checkpoints"
    (ck / ".ckpt_00000003.pt.tmp999999").write_bytes(b"\0" * 4096)  # a killed save's leftover
    res = train("--resume", str(ck / checkpoint_name(2)), "--set", "train.keep_checkpoints=1",
                "--stop-at-step", "3")
    assert res.returncode == 0, res.stderr
    assert "removed 1 temporary file(s) of interrupted checkpoint saves" in res.stdout
    assert _steps(ck) == [3] and not (ck / ".ckpt_00000003.pt.tmp999999").exists()
    latest = latest_checkpoint(run_dir)
    assert latest.name == checkpoint_name(3) and load_checkpoint(latest)["step"] == 3
    assert not (run_dir / LOCK_NAME).exists()


# ------------------------------------------------------------------------------------------- the lock


@pytest.mark.slow
def test_a_live_lock_refuses_a_second_training_and_a_resume(trained, tmp_path):
    run_dir = _copy(trained, tmp_path)
    temp = run_dir / "checkpoints" / ".ckpt_00000005.pt.tmp1"  # could be the live writer's
    temp.write_bytes(b"x")
    lock = RunLock(run_dir)
    assert lock.acquire() is None
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    try:
        with pytest.raises(UserError, match=f"pid {os.getpid()} .*holds {run_dir / LOCK_NAME}"):
            RunLock(run_dir).acquire()  # this very process is alive
        res = train("--run-dir", str(run_dir), "--resume", "--set", "train.steps=6")
        assert res.returncode == 2, res.stderr
        assert res.stderr.strip().splitlines() == [res.stderr.strip()] and "Traceback" not in res.stderr
        assert f"pid {os.getpid()}" in res.stderr and str(run_dir / LOCK_NAME) in res.stderr
        assert "--force-unlock" in res.stderr
        assert {p.name: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before  # nothing written or removed
    finally:
        lock.release()
    assert not (run_dir / LOCK_NAME).exists()


@pytest.mark.slow
def test_a_new_run_into_a_locked_fresh_directory_is_refused(tmp_path):
    (tmp_path / "tiny.json").write_text(json.dumps(CFG))
    lock = RunLock(tmp_path / "run")
    lock.acquire()
    try:
        res = train("--config-path", str(tmp_path / "tiny.json"), "--run-dir", str(tmp_path / "run"))
    finally:
        lock.release()
    assert res.returncode == 2 and "holds" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []  # no config.json, no metrics


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.slow
def test_a_stale_lock_is_taken_over_with_a_note(tmp_path):
    path = tmp_path / LOCK_NAME
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "started": "yesterday"}))
    lock = RunLock(tmp_path)
    note = lock.acquire()
    assert note and "took over the stale lock" in note and "is gone" in note
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not path.exists()
    path.write_text("")  # killed between creating and writing the file
    lock = RunLock(tmp_path)
    assert "unreadable" in lock.acquire()
    lock.release()


def test_another_hosts_lock_needs_force_unlock(tmp_path):
    path = tmp_path / LOCK_NAME
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "now"}))
    with pytest.raises(UserError, match="pid 1 on elsewhere"):
        RunLock(tmp_path).acquire()
    lock = RunLock(tmp_path)
    assert "--force-unlock" in lock.acquire(force=True)
    assert json.loads(path.read_text())["host"] == socket.gethostname()
    lock.release()
    assert not path.exists()


def test_release_leaves_a_lock_this_process_does_not_hold(tmp_path):
    lock = RunLock(tmp_path)
    lock.acquire()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": 1}))  # forcibly taken over
    lock.release()
    assert (tmp_path / LOCK_NAME).exists()


def test_the_lock_goes_on_an_error_and_on_sigterm(tmp_path, monkeypatch):
    from ddpm_curriculum.training import cli, trainer

    (tmp_path / "tiny.json").write_text(json.dumps(CFG))
    seen = []

    def boom(self):
        seen.append((self.run_dir / LOCK_NAME).exists())
        raise RuntimeError("boom")

    monkeypatch.setattr(trainer.CurriculumTrainer, "train", boom)
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["--config-path", str(tmp_path / "tiny.json"), "--run-dir", str(tmp_path / "run"), "--device", "cpu"])
    assert seen == [True] and not (tmp_path / "run" / LOCK_NAME).exists()

    if signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        pytest.skip("SIGTERM is handled by the test runner")
    lock = RunLock(tmp_path / "other")
    lock.acquire()
    try:
        assert signal.getsignal(signal.SIGTERM) is runlock._exit_on_sigterm
        with pytest.raises(SystemExit) as exc:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises at the next bytecode, which interrupts the sleep
        assert exc.value.code == 128 + signal.SIGTERM
    finally:
        lock.release()
    assert not (tmp_path / "other" / LOCK_NAME).exists() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


# ---------------------------------------------------------------- damaged checkpoints: one line, exit 2


def _without(key):
    return lambda state: {k: v for k, v in state.items() if k != key}


def _with(key, value):
    return lambda state: {**state, key: value}


def _first_entry(key, value):
    return lambda state: {**state, key: {**state[key], next(iter(state[key])): value}}


# name → how to damage a good training state (saved with torch.save). The error must name the entry.
DAMAGED_STATES = {
    "no model": (_without("model"), "'model'"),
    "no config": (_without("config"), "'config'"),
    "step a string": (_with("step", "12"), "'step'"),
    "step a bool": (_with("step", True), "'step'"),
    "model a tensor": (_with("model", torch.zeros(3)), "'model'"),
    "model value not a tensor": (_first_entry("model", "weights"), "entry 'model' has 'embed.0.weight' = a str"),
    "config a list": (_with("config", [1, 2]), "'config'"),
    "ema a string": (_with("ema", "ema"), "'ema'"),
    "masks not tensors": (_with("masks", {"conv": 1}), "'masks'"),
    "not a dict": (lambda state: state["model"][next(iter(state["model"]))], "not a checkpoint dict"),
    "a list": (lambda state: [1, 2, 3], "not a checkpoint dict"),
}
# only a resume reads these
TRAINING_ONLY = {
    "no optimizer": (_without("optimizer"), "'optimizer'"),
    "optimizer without param_groups": (_with("optimizer", {"state": {}}), "'optimizer'"),
    "rng of strings": (_with("rng", ["x"]), "'rng'"),
    "stage_entered a float": (_with("stage_entered", 1.5), "'stage_entered'"),
    "ema keys differ": (lambda state: {**state, "ema": dict(list(state["ema"].items())[1:])}, "'ema' does not match"),
}


def _damaged_files(trained, tmp_path):
    """name → (path to pass, fragment of the expected message) for files that are not good checkpoints."""
    good = trained / "checkpoints" / checkpoint_name(4)
    state = torch.load(good, weights_only=True)
    cases = {}
    for name, (damage, fragment) in {**DAMAGED_STATES, **TRAINING_ONLY}.items():
        path = tmp_path / f"{name.replace(' ', '_')}.pt"
        torch.save(damage(state), path)
        cases[name] = (path, fragment)
    (tmp_path / "truncated.pt").write_bytes(good.read_bytes()[:2000])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "no_checkpoints").mkdir()
    missing = _copy(trained, tmp_path / "missing")
    (missing / "checkpoints" / checkpoint_name(6)).unlink()
    garbage = _copy(trained, tmp_path / "garbage")
    (garbage / "checkpoints" / LATEST).write_bytes(b"\xff\xfe\x00junk")
    no_weights = tmp_path / "diffusers_no_weights"
    (no_weights / "unet").mkdir(parents=True)
    (no_weights / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    unet_config = json.dumps(diffusers_unet_config(state["config"]["model"], 8))
    truncated_st = tmp_path / "diffusers_truncated"
    truncated_st.mkdir()
    (truncated_st / "config.json").write_text(unet_config)
    (truncated_st / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10\x00\x00")
    header_only = tmp_path / "diffusers_header_only"  # a download cut off after the header
    header_only.mkdir()
    (header_only / "config.json").write_text(unet_config)
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    (header_only / "diffusion_pytorch_model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    bad_json = tmp_path / "diffusers_bad_config"
    bad_json.mkdir()
    (bad_json / "config.json").write_text(unet_config[:30])
    (bad_json / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10\x00\x00")
    cases.update({
        "truncated file": (tmp_path / "truncated.pt", "truncated"),
        "zero-byte file": (tmp_path / "empty.pt", "is empty (0 bytes"),
        "directory without checkpoints": (tmp_path / "no_checkpoints", "no checkpoint in"),
        "latest names a missing file": (missing, "which is missing"),
        "latest is not a name": (garbage, "latest"),
        "diffusers folder without weights": (no_weights, "no weights file"),
        "diffusers folder with truncated weights": (truncated_st, "not a valid .safetensors file"),
        "diffusers weights cut after the header": (header_only, "truncated?"),
        "diffusers config.json cut off": (bad_json, "config.json"),
    })
    return cases


NETWORK_CASES = [*DAMAGED_STATES, "truncated file", "zero-byte file", "directory without checkpoints",
                 "latest names a missing file", "latest is not a name", "diffusers folder without weights",
                 "diffusers folder with truncated weights", "diffusers weights cut after the header",
                 "diffusers config.json cut off"]
RESUME_CASES = [*DAMAGED_STATES, *TRAINING_ONLY, "truncated file", "zero-byte file", "directory without checkpoints",
                "latest names a missing file", "latest is not a name"]


@pytest.fixture(scope="module")
def damaged(trained, tmp_path_factory):
    return _damaged_files(trained, tmp_path_factory.mktemp("damaged"))


def _entry_points(path, out):
    return {"train": (["--resume", str(path), "--device", "cpu"], "ddpm_curriculum.training.cli"),
            "generate": (["--chkpt-path", str(path), "--num-samples", "1", "--save-dir", str(out / "gen"),
                          "--device", "cpu"], "ddpm_curriculum.sampling.cli"),
            "prune": (["--model_path", str(path), "--save_path", str(out / "pruned"), "--device", "cpu"],
                      "ddpm_curriculum.pruning.cli")}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(set(NETWORK_CASES) | set(RESUME_CASES)))
def test_damaged_checkpoints_are_one_line_in_every_entry_point(damaged, tmp_path, capsys, case):
    """In-process through each script's main (fast): train --resume, generate.py, prune.py."""
    import importlib

    path, fragment = damaged[case]
    for name, (argv, module) in _entry_points(path, tmp_path).items():
        if case not in (RESUME_CASES if name == "train" else NETWORK_CASES):
            continue
        code = run_cli(importlib.import_module(module).main, argv)
        err = capsys.readouterr().err.strip()
        assert code == 2, (name, err)
        assert len(err.splitlines()) == 1 and fragment in err, (name, err)


# one subprocess per case, spread over the three scripts (a subprocess costs seconds)
SCRIPT_CASES = [("train_curriculum.py", "step a string"), ("train_curriculum.py", "latest is not a name"),
                ("generate.py", "no config"), ("generate.py", "diffusers folder with truncated weights"),
                ("prune.py", "truncated file"), ("prune.py", "not a dict")]


@pytest.mark.slow
@pytest.mark.parametrize("script_name, case", SCRIPT_CASES)
def test_damaged_checkpoints_through_the_scripts(damaged, tmp_path, script_name, case):
    path, fragment = damaged[case]
    argv = _entry_points(path, tmp_path)[{"train_curriculum.py": "train", "generate.py": "generate",
                                          "prune.py": "prune"}[script_name]][0]
    res = script(script_name, *argv)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert fragment in res.stderr


def test_a_run_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "run").write_text("not a directory")
    with pytest.raises(UserError, match="is a file; choose a directory"):
        RunLock(tmp_path / "run").acquire()
