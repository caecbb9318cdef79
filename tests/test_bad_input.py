"""Hostile and careless input: a crafted CIFAR-10 pickle must not run code, and every kind of bad input
(sizes, JSON, --set, devices, DataLoader workers, generate folders) is one line naming the problem, exit 2,
no traceback. Most cases run through each script's ``main`` under ``run_cli`` (what the script does); one of
each kind also runs as a real subprocess."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ddpm_curriculum.data import build_dataset
from ddpm_curriculum.errors import UserError, run_cli
from ddpm_curriculum.sampling import SamplerSpec, generate_to_folder, sample_name
from ddpm_curriculum.training.checkpoint import load_network

from .helpers import ROOT, TINY

CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def script(*args, timeout=120):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def assert_one_line(res, fragment):
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and fragment in errors[0], res.stderr[-2000:]


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return path


# ------------------------------------------------------------------------------- CIFAR-10 pickles


class _SystemPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _OpenPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def write_cifar(folder, n=3, protocol=None, payload=None):
    """A tiny cifar-10-batches-py; ``payload`` replaces data_batch_1's array."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for name in CIFAR_FILES:
        arrays[name] = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        data = payload if payload is not None and name == "data_batch_1" else arrays[name]
        batch = {b"batch_label": name.encode(), b"labels": list(range(n)), b"data": data,
                 b"filenames": [f"{i}.png".encode() for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    return arrays


@pytest.mark.parametrize("payload", [_SystemPayload, _OpenPayload])
def test_crafted_cifar_batch_does_not_run_code(tmp_path, payload):
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, payload=payload(marker))
    with pytest.raises(UserError, match="data_batch_1 is malformed") as err:
        build_dataset("cifar10", root=str(folder))
    assert not marker.exists()
    assert "\n" not in str(err.value) and "which a CIFAR-10 batch never holds" in str(err.value)


@pytest.mark.slow
def test_crafted_cifar_batch_through_the_script(tmp_path, capsys):
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, payload=_SystemPayload(marker))
    cfg = json.loads(json.dumps(TINY))
    cfg["dataset"] = {"name": "cifar10", "root": str(folder)}
    path = write_json(tmp_path / "cifar.json", cfg)
    assert run_cli(_mains()["train"], ["--config-path", str(path), "--dry-run"]) == 0  # reports, exits 0
    assert not marker.exists() and "data_batch_1 is malformed" in capsys.readouterr().out
    real = script("train_curriculum.py", "--config-path", str(path), "--run-dir", str(tmp_path / "run"),
                  "--device", "cpu", "--no-progress")
    assert_one_line(real, f"{folder / 'data_batch_1'} is malformed")
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_style_batches_still_load(tmp_path, protocol):
    arrays = write_cifar(tmp_path / "c", protocol=protocol)
    ds = build_dataset("cifar10", root=str(tmp_path / "c"))
    assert len(ds) == 15
    np.testing.assert_array_equal(ds.images[:3], arrays["data_batch_1"].reshape(3, 3, 32, 32).transpose(0, 2, 3, 1))


def test_python2_numpy_core_spelling_loads(tmp_path):
    # the original CIFAR-10 files were written by Python 2 numpy: numpy.core.multiarray._reconstruct
    from ddpm_curriculum.data.images import read_cifar_batch

    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072) % 251
    raw = pickle.dumps({b"data": data, b"labels": [3, 4]}, protocol=2)
    assert b"numpy._core.multiarray" in raw
    path = tmp_path / "data_batch_1"
    path.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    images, labels = read_cifar_batch(path)
    np.testing.assert_array_equal(images, data.reshape(2, 3, 32, 32))
    assert labels == [3, 4]


# ----------------------------------------------------------------------------- configs and flags


def _cases(tmp):
    """(script, argv, fragment of the one error line) for the in-process checks."""
    tiny = write_json(tmp / "tiny.json", TINY)
    (tmp / "dup.json").write_text('{"train": {"steps": 3, "lr": 1e-3, "lr": 1e-2}}')
    (tmp / "deep.json").write_text("[" * 100000 + "]" * 100000)
    (tmp / "list.json").write_text("[1, 2]")
    (tmp / "latin1.json").write_bytes('{"_comment": "café"}'.encode("latin-1"))
    (tmp / "bigint.json").write_text('{"train": {"steps": 3, "lr": 1%s}}' % ("0" * 400))
    (tmp / "truncated.json").write_text(json.dumps(TINY)[:50])
    (tmp / "bad.png").write_bytes(b"not an image")
    dry = ["--config-path", str(tiny), "--dry-run"]
    return [
        ("train", dry + ["--set", "train.batch_size=0"], "'train.batch_size' = 0 must be >= 1"),
        ("train", dry + ["--set", "dataset.image_size=1000000000"], "'dataset.image_size' = 1000000000 must be <="),
        ("train", dry + ["--set", "dataset.image_size=-8"], "'dataset.image_size' = -8 must be >="),
        ("train", dry + ["--set", "dataset.num_samples=-1"], "'dataset.num_samples' = -1"),
        ("train", dry + ["--set", "diffusion.timesteps=0"], "'diffusion.timesteps' = 0"),
        ("train", dry + ["--set", "diffusion.timesteps=1000000000"], "'diffusion.timesteps' = 1000000000 must be <="),
        ("train", dry + ["--set", f"train.seed={10 ** 30}"], "'train.seed'"),
        ("train", dry + ["--set", 'train.lr="fast"'], "'train.lr' must be float, got 'fast'"),
        ("train", dry + ["--set", "train.lr.x=1"], "'train.lr' is a value, not a section"),
        ("train", dry + ["--set", "curriculum.stages.0.t_min.y=1"], "'curriculum.stages.0.t_min' is a value"),
        ("train", dry + ["--set", "curriculum.stages.x=1"], "'curriculum.stages' is a list of 2 (index 0 … 1)"),
        ("train", dry + ["--set", "curriculum.stages.7.steps=1"], "'curriculum.stages' is a list of 2 (index 0 … 1)"),
        ("train", dry + ["--set", "train.lr"], "--set expects section.key=value"),
        ("train", dry + ["--set", "train.=1"], "--set expects section.key=value"),
        ("train", dry + ["--set", "=1"], "--set expects section.key=value"),
        ("train", dry + ["--set", "trian.lr=1"], "unknown config section 'trian' (did you mean 'train'?)"),
        ("train", dry + ["--set", "train.betas=" + "[" * 100000], "nested too deeply"),
        ("train", dry + ["--set", 'train.betas={"a": 1, "a": 2}'], "gives the key 'a' twice"),
        ("train", ["--config-path", str(tmp / "dup.json"), "--dry-run"], "dup.json gives the key 'lr' twice"),
        ("train", ["--config-path", str(tmp / "deep.json"), "--dry-run"], "deep.json is nested too deeply"),
        ("train", ["--config-path", str(tmp / "list.json"), "--dry-run"], "must be a JSON object at the top level"),
        ("train", ["--config-path", str(tmp / "latin1.json"), "--dry-run"], "latin1.json is not UTF-8 text"),
        ("train", ["--config-path", str(tmp / "bigint.json"), "--dry-run"], "'train.lr' has 401 digits"),
        ("train", ["--config-path", str(tmp / "truncated.json"), "--dry-run"], "truncated.json is not valid JSON"),
        ("eval", ["--sample-folder", str(tmp), "--dataset-config", str(tmp / "list.json")], "JSON object"),
        ("eval", ["--sample-folder", str(tmp), "--ref-folder", str(tmp), "--json", "/proc/no/x.json"],
         "--json /proc/no/x.json: cannot create /proc/no"),
        ("eval", ["--sample-folder", str(tmp), "--ref-folder", str(tmp), "--save-stats", str(tmp)], "is a folder"),
        ("eval", ["--sample-folder", str(tmp), "--ref-folder", str(tmp), "--device", "cpu"],
         f"cannot read image {tmp / 'bad.png'}"),
        ("eval", ["--sample-folder", str(tmp / "bad.png"), "--ref-folder", str(tmp)], "is a file, not a folder"),
    ]


DEVICES = [("foo", "--device 'foo' is not a device"), ("mps", "--device 'mps' is not a device"),
           ("cuda:-1", "is not a device"), ("cuda:7", "cuda:7")]


def _mains():
    from ddpm_curriculum.evaluation.cli import main as evaluate
    from ddpm_curriculum.pruning.cli import main as prune
    from ddpm_curriculum.sampling.cli import main as generate
    from ddpm_curriculum.training.cli import main as train

    return {"train": train, "generate": generate, "eval": evaluate, "prune": prune}


def run_main(name, argv, capsys):
    code = run_cli(_mains()[name], argv)  # any other exception escapes here and fails the test
    err = capsys.readouterr().err
    return code, err


@pytest.mark.slow
def test_bad_configs_and_flags_are_one_line(tmp_path, capsys):
    for name, argv, fragment in _cases(tmp_path):
        code, err = run_main(name, argv, capsys)
        assert code == 2 and err.count("\n") == 1 and fragment in err, (argv[-1][:60], err)


@pytest.mark.slow
@pytest.mark.parametrize("device,fragment", DEVICES)
def test_unknown_devices_in_every_script(tiny_run, tmp_path, capsys, device, fragment):  # noqa: F811
    import torch

    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    tiny = write_json(tmp_path / "tiny.json", TINY)
    (tmp_path / "img.png").write_bytes(b"x")
    argvs = {"train": ["--config-path", str(tiny), "--run-dir", str(tmp_path / "run"), "--no-progress"],
             "generate": ["--chkpt-path", str(tiny_run), "--save-dir", str(tmp_path / "gen"), "--num-samples", "1"],
             "eval": ["--sample-folder", str(tmp_path), "--ref-folder", str(tmp_path)],
             "prune": ["--model_path", str(tiny_run), "--save_path", str(tmp_path / "pruned")]}
    for name, argv in argvs.items():
        code, err = run_main(name, [*argv, "--device", device], capsys)
        assert code == 2 and err.count("\n") == 1 and fragment in err, (name, err)
    from ddpm_curriculum.bench.cli import parse_args

    with pytest.raises(UserError, match="--device"):
        parse_args(["--device", device])


@pytest.mark.slow
def test_generate_flags(tiny_run, tmp_path, capsys):  # noqa: F811
    base = ["--chkpt-path", str(tiny_run), "--device", "cpu", "--no-progress", "--grid", "0",
            "--use-ddim", "--ddim-steps", "2"]
    cases = [(["--num-samples", str(10 ** 15)], "--num-samples 1000000000000000 exceeds 1000000"),
             (["--num-samples", "-5"], "--num-samples must be ≥ 1"),
             (["--batch-size", "-3"], "--batch-size must be ≥ 1"),
             (["--seed", "-1"], "--seed must be ≥ 0"),
             (["--eta", "nan"], "--eta nan is not a finite number"),
             (["--npz", "/proc/no/x.npz"], "--npz /proc/no/x.npz: cannot create")]
    for extra, fragment in cases:
        code, err = run_main("generate", [*base, "--save-dir", str(tmp_path / "g"), "--num-samples", "2", *extra],
                             capsys)
        assert code == 2 and err.count("\n") == 1 and fragment in err, (extra, err)


@pytest.mark.slow
def test_representative_bad_inputs_through_the_real_scripts(tmp_path):
    (tmp_path / "dup.json").write_text('{"train": {"steps": 3}, "train": {"steps": 4}}')
    assert_one_line(script("train_curriculum.py", "--config-path", str(tmp_path / "dup.json"), "--dry-run",
                           "--device", "mps"), "gives the key 'train' twice")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert_one_line(script("eval.py", "--sample-folder", str(tmp_path), "--ref-folder", str(tmp_path),
                           "--device", "mps"), "--device 'mps'")


@pytest.mark.slow
def test_out_of_memory_is_one_line(tmp_path):
    tiny = write_json(tmp_path / "tiny.json", TINY)
    res = script("train_curriculum.py", "--config-path", str(tiny), "--run-dir", str(tmp_path / "r"), "--device",
                 "cpu", "--no-progress", "--set", "model.hid_channels=100000000")
    assert_one_line(res, "out of memory")


# ------------------------------------------------------------------------------- DataLoader workers


@pytest.mark.slow
def test_corrupt_image_in_a_dataloader_worker_is_one_line(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    (folder / "07.png").write_bytes(b"not an image")
    cfg = json.loads(json.dumps(TINY))
    cfg["dataset"] = {"name": "image_folder", "root": str(folder), "image_size": 8}
    cfg["train"].update(num_workers=2, batch_size=4)
    res = script("train_curriculum.py", "--config-path", str(write_json(tmp_path / "c.json", cfg)), "--run-dir",
                 str(tmp_path / "run"), "--device", "cpu", "--no-progress")
    assert_one_line(res, f"cannot read image {folder / '07.png'}")
    assert "worker" not in res.stderr


# ------------------------------------------------------------------------------- generate folders


def _gen(tiny_run, save_dir, *extra):  # noqa: F811
    return script("generate.py", "--chkpt-path", str(tiny_run), "--device", "cpu", "--no-progress", "--grid", "0",
                  "--use-ddim", "--ddim-steps", "2", "--num-samples", "3", "--save-dir", str(save_dir), *extra)


@pytest.mark.slow
def test_generate_save_dir_problems(tiny_run, tmp_path, capsys):  # noqa: F811
    (tmp_path / "afile").write_text("x")
    base = ["--chkpt-path", str(tiny_run), "--device", "cpu", "--no-progress", "--grid", "0", "--use-ddim",
            "--ddim-steps", "2", "--num-samples", "3"]
    for save_dir, fragment in [(tmp_path / "afile", "is a file, not a folder"),
                               (tmp_path / "afile" / "sub", "cannot create --save-dir"),
                               ("/proc/no/such/dir", "cannot create --save-dir")]:
        code, err = run_main("generate", [*base, "--save-dir", str(save_dir)], capsys)
        assert code == 2 and err.count("\n") == 1 and fragment in err, err
    assert run_main("generate", [*base, "--save-dir", str(tmp_path / "g")], capsys)[0] == 0
    manifest = tmp_path / "g" / "generate.json"
    manifest.write_text("[1, 2]")
    code, err = run_main("generate", [*base, "--save-dir", str(tmp_path / "g")], capsys)
    assert code == 2 and "is not a JSON object" in err
    manifest.write_text(json.dumps({"seed": 0, "sampler": {}})[:20])  # half-written
    assert_one_line(_gen(tiny_run, tmp_path / "g"), "generate.json is not valid JSON")


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.glob("*.png")}


@pytest.mark.slow
def test_replaced_png_is_regenerated_from_its_digest(tiny_run, tmp_path):  # noqa: F811
    net = load_network(tiny_run)
    spec = SamplerSpec(use_ddim=True, steps=3)
    run = lambda d: generate_to_folder(net, spec, d, 4, batch_size=1, seed=2, device="cpu", grid=0,  # noqa: E731
                                       progress=False)
    run(tmp_path / "fresh")
    fresh = _files(tmp_path / "fresh")
    folder = tmp_path / "a"
    run(folder)
    digests = json.loads((folder / "generate.json").read_text())["sha256"]
    assert sorted(digests) == [sample_name(i) for i in range(4)] and not list(folder.glob("*.jsonl"))
    # image 2 replaced by another valid PNG of the right size and mode: decoding alone would keep it
    (folder / sample_name(2)).write_bytes((folder / sample_name(0)).read_bytes())
    again = run(folder)
    assert again.generated == 1 and any("000002.png" in n for n in again.notes)
    assert _files(folder) == fresh


@pytest.mark.slow
def test_old_manifest_without_digests_is_kept_and_upgraded(tiny_run, tmp_path):  # noqa: F811
    net = load_network(tiny_run)
    spec = SamplerSpec(use_ddim=True, steps=3)
    run = lambda: generate_to_folder(net, spec, tmp_path, 3, batch_size=1, seed=2, device="cpu", grid=0,  # noqa: E731
                                     progress=False)
    run()
    path = tmp_path / "generate.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in manifest.items() if k != "sha256"}))
    (tmp_path / sample_name(1)).unlink()
    again = run()
    assert again.generated == 1 and any("predates per-image digests" in n for n in again.notes)
    assert json.loads(path.read_text())["sha256"] == manifest["sha256"]  # recorded again, identical


@pytest.mark.slow
def test_digests_journalled_by_a_killed_run_are_used(tiny_run, tmp_path):  # noqa: F811
    net = load_network(tiny_run)
    spec = SamplerSpec(use_ddim=True, steps=3)
    run = lambda: generate_to_folder(net, spec, tmp_path, 3, batch_size=1, seed=2, device="cpu", grid=0,  # noqa: E731
                                     progress=False)
    run()
    path = tmp_path / "generate.json"
    manifest = json.loads(path.read_text())
    # as a kill after two batches leaves it: the manifest without digests yet, a journal with a torn last line
    path.write_text(json.dumps({**manifest, "sha256": {}}))
    first_two = {k: manifest["sha256"][k] for k in (sample_name(0), sample_name(1))}
    (tmp_path / "generate.digests.0.jsonl").write_text(json.dumps(first_two) + '\n{"000002.png": "ab')
    again = run()
    assert again.generated == 1 and not again.notes  # image 2 has no complete record: regenerated
    assert json.loads(path.read_text())["sha256"] == manifest["sha256"]
    assert not list(tmp_path.glob("*.jsonl"))


@pytest.mark.slow
def test_jsonl_logs_skip_a_torn_last_line_only(tiny_run, tmp_path):  # noqa: F811
    from ddpm_curriculum.config import read_jsonl
    from ddpm_curriculum.training.plots import plot_run

    lines = (tiny_run / "metrics.jsonl").read_text().splitlines()
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(lines) + '\n{"step": 99, "lo')  # a kill in the middle of a write
    assert read_jsonl(path) == [json.loads(line) for line in lines] and len(lines) >= 2
    assert plot_run(tmp_path)  # the figures are still drawn
    path.write_text(lines[0] + '\n{"step": 3, "lo\n' + lines[1] + "\n")
    with pytest.raises(UserError, match="metrics.jsonl line 2 is not valid JSON"):
        read_jsonl(path)
